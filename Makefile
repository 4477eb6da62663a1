# `make demo` and `make test` work on a fresh machine: each builds .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: venv demo test test-learning bench clean

$(BIN)/moat: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt -e '.[full,test]'
	touch $(BIN)/moat

venv: $(BIN)/moat

demo: venv
	$(BIN)/moat demo

test: venv
	$(BIN)/python -m pytest -n 2 -q -m "not learning"

test-learning: venv
	$(BIN)/python -m pytest -n 2 -q -m learning

bench: venv
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/data_check.py
	for task in classification segmentation detection; do \
		$(BIN)/python benchmarks/demo.py --task $$task || exit 1; done

clean:
	rm -rf $(VENV) runs
