"""The package surface: `import moat` is cheap and lazy, timm registration still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_import_moat_is_lazy_and_timm_registers_on_import():
    out = _run("""
import sys, moat
heavy = ("moat.weights", "moat.export", "moat.models.flops", "moat.models.factory",
         "moat.integrations.timm_registry", "timm")
print(sorted(m for m in sys.modules if m.startswith(heavy)))
assert "create_model" in dir(moat) and "save_pretrained" in moat.__all__
model = moat.create_model("tiny_moat_0")            # a public name imports what it needs
import timm                                          # after moat: the variants register
print(type(timm.create_model("tiny_moat_0_no_pe")).__name__, "moat.export" in sys.modules)
""")
    assert out.splitlines() == ["[]", "MoatNet False"]


def test_timm_imported_first_also_sees_moat():
    assert _run("import timm, moat; print(timm.create_model('tiny_moat_1').num_classes)") == "1000"


# --- import structure (read from the source, nothing imported) ----------------------------

# Each package may import its own layer and those below, never one above: data flows from
# files and names through the model out to tasks, training, export and the command line.
LAYERS = [
    ("moat._lazy", "moat._version", "moat.allocator", "moat.atomic", "moat.cpu", "moat.device",
     "moat.errors", "moat.integrity", "moat.kernels", "moat.models", "moat.paths", "moat.text"),
    # create_model lives where models users look for it, but loads weights: it is the top
    # of the weights layer (moat.models resolves it on first use)
    ("moat.weights", "moat.data", "moat.models.factory"),
    ("moat.tasks", "moat.train", "moat.export"),
    ("moat.explain", "moat.app", "moat.bench", "moat.integrations"),
    ("moat.cli", "moat"),
]


def _imports() -> dict[str, set[str]]:
    """{module: moat modules it imports anywhere in its file (functions included)}."""
    import ast

    files = {}
    for path in (SRC / "moat").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package upwards
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found |= {owner(n) for n in names if n.split(".")[0] == "moat"} - {None, module}
        graph[module] = found
    return graph


def _layer(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer
                if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_no_import_circle():
    graph, done, path = _imports(), set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(
                path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_imports_go_one_way():
    upward = sorted(f"{m} -> {o}" for m, others in _imports().items() for o in others
                    if _layer(o) > _layer(m) and not m.startswith(o + "."))
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


# --- call structure (traced: tests/file_trace.py prints it for create_model and moat train) --

def test_create_model_pretrained_enters_each_file_once(ref_prefix, tmp_path, monkeypatch):
    # The rule: a file is entered once when no call comes back up into a file still waiting
    # below it (A -> B -> A) and each file inside a package is visited from one file only.
    # Lookups that answer without going on into another moat file (a catalogue entry, a
    # header read, a property) and the modules at the top of `moat` (errors, paths,
    # integrity) serve every layer and are not visits.
    from file_trace import FileTrace, release_bucket

    import moat

    monkeypatch.setenv("MOAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOAT_WEIGHTS_URL", release_bucket(tmp_path / "bucket", ref_prefix).as_uri())
    with FileTrace() as first:  # downloaded and converted once: the official names are read
        moat.create_model("tiny_moat_0", pretrained=True)  # through the checkpoint's reader
    assert first.callbacks() == []
    assert {"weights/convert.py", "weights/official.py"} <= set(first.path())
    with FileTrace() as trace:
        moat.create_model("tiny_moat_0", pretrained=True)
    assert trace.callbacks() == []
    assert {file: callers for file, callers in trace.callers().items() if len(callers) > 1} == {}
    # the known path, top down: names -> cache -> the architecture -> the one loader
    assert trace.callers() == {
        "weights/catalogue.py": ["models/factory.py"], "weights/cache.py": ["models/factory.py"],
        "models/registry.py": ["models/factory.py"], "models/moat.py": ["models/registry.py"],
        "models/blocks.py": ["models/moat.py"], "weights/loader.py": ["models/factory.py"],
        "weights/files.py": ["weights/loader.py"]}
    assert {"weights/adapt.py", "weights/variant.py"} <= set(trace.path())


def test_moat_train_enters_each_file_once(tmp_path):
    # One epoch of `moat train` (tiny-MOAT-0, 8 generated images), traced. No call comes back
    # into a file still waiting below it (the error boundary runs no callable of the command
    # line's, `walk_files` takes suffixes, not a filter). The run's objects (the task, the
    # settings, the loaders) serve the assembly, the loop and the checkpoints, but no two
    # files visit each other: the settings are resolved (train/config.py asks the task to
    # count the data) before anything reads them (train/settings.py, below the task), once.
    # The one pair is a task and its base class, one object whose template methods
    # (build_training_model) call the task's own (build_model).
    from file_trace import trace_train

    trace = trace_train(tmp_path)
    assert trace.callbacks() == []
    assert trace.mutual() == {("tasks/base.py", "tasks/classification/task.py")}
    callers = trace.callers()
    assert callers["train/config.py"] == ["train/loop.py"]  # resolved in one place, once
    assert callers["tasks/classification/task.py"][0] == "train/config.py"  # counts the data
    assert not any(e.caller == "train/settings.py" and (e.file.startswith("tasks/")
                                                        or e.file == "train/config.py")
                   for e in trace.visits())  # the settings call nothing above them
