"""benchmarks/gpu.py: its CPU dry run exercises every section (parity, fp16/bf16 training eager
and compiled, `moat train` under torchrun killed and resumed, the attention kernels,
throughput) at tiny sizes, so the script that runs on a GPU is known to run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_verdicts_compare_per_multiply_add():
    gpu = _script()
    rows = [{"model": "moat_0", "mode": "train", "compiled": False, "gmacs_per_s": 100.0},
            {"model": "coatnet_0_224", "mode": "train", "compiled": False, "gmacs_per_s": 90.0},
            {"model": "maxvit_tiny_tf_224", "mode": "train", "compiled": False,
             "gmacs_per_s": 120.0},
            {"model": "moat_0", "mode": "inference", "compiled": True, "gmacs_per_s": 50.0},
            {"model": "convnext_tiny", "mode": "inference", "compiled": True,
             "gmacs_per_s": 50.0}]
    holds = {(v["claim"], v["compiled"]): v["holds"] for v in gpu.verdicts(rows)}
    assert holds == {("moat_0 train GMAC/s >= coatnet_0_224", False): True,
                     ("moat_0 train GMAC/s >= maxvit_tiny_tf_224", False): False,
                     ("moat_0 inference GMAC/s >= convnext_tiny", True): True}


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path, reference_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("OUT", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--output", str(tmp_path),
                             "--reference", str(reference_dir)],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["parity", "training", "torchrun", "attention", "throughput"]
    for name, section in sections.items():
        assert section["status"] == "ok" and not section["failures"], (name, section)

    parity = sections["parity"]["results"]
    fp32 = [r for r in parity if r["precision"] == "fp32"]
    assert {(r["case"], r["kernel"]) for r in fp32} == {
        (case, kernel) for case in ("case_224_global", "case_320_window")
        for kernel in ("sdpa", "flex")}
    assert all(r["within_fp32_tolerance"] and r["logits"] <= 1e-4 for r in fp32)
    assert {r["precision"] for r in parity} == {"fp32", "bf16", "fp16"}

    training = sections["training"]["results"]
    assert {(r["precision"], r["compiled"]) for r in training} == {
        (p, c) for p in ("bf16", "fp16") for c in (False, True)}
    for row in training:
        assert row["ok"] and row["losses"][-1] < row["losses"][0], row

    torchrun = {r["item"]: r for r in sections["torchrun"]["results"]}
    killed = torchrun["moat train under torchrun, killed"]
    assert killed["killed_while_running"] and killed["killed_at"] != "step-000000008"
    assert torchrun["moat train --resume under torchrun"]["resumed"]
    assert torchrun["moat train --resume under torchrun"]["ok"]

    throughput = sections["throughput"]["results"]
    assert {(r["model"], r["mode"], r["compiled"]) for r in throughput} >= {
        ("tiny_moat_0", mode, compiled) for mode in ("train", "inference")
        for compiled in (False, True)}
    assert all(r["img_per_s"] > 0 and r["gmacs"] > 0 for r in throughput)
    table = (tmp_path / "report.md").read_text()
    assert "## Parity" in table and "## Throughput" in table
