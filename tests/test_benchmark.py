"""`moat benchmark`: rows, multiply-adds, peers, CSV with versions; the process allocator."""

from __future__ import annotations

import csv

import pytest

import moat
from moat import allocator
from moat.bench.models import count_macs
from moat.bench.pytorch import run_benchmark
from moat.cli import main


def test_cli_measures_every_mode_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert main(["benchmark", "tiny_moat_0", "--img-size", "64", "--batch-size", "2",
                 "--mode", "inference", "train", "--optimized", "--warmup", "0",
                 "--repeats", "2", "--threads", "1", "--no-memory", "--csv", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tiny_moat_0 (optimized)" in table and "allocator:" in table
    rows = list(csv.DictReader(out.open()))
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("tiny_moat_0", "inference"), ("tiny_moat_0 (optimized)", "inference"),
        ("tiny_moat_0", "train")]
    macs = moat.count_flops(moat.create_model("tiny_moat_0"), (64, 64), method="macs")
    for row in rows:
        assert float(row["gmacs"]) == pytest.approx(macs / 1e9, rel=1e-9)
        assert float(row["gmacs_per_s"]) > 0 and float(row["time_ms"]) > 0
        assert row["torch"] and row["moat"] == moat.__version__ and row["threads"] == "1"


def test_peers_are_measured_and_compared_to_moat():
    rows = run_benchmark(["tiny_moat_0"], peers=True, img_sizes=[64], batch_sizes=[1],
                         warmup=0, repeats=1, latency=False, memory=False)
    by_model = {row["model"]: row for row in rows}
    assert set(by_model) == {"tiny_moat_0", "coatnet_0_rw_224", "maxvit_tiny_tf_224",
                             "convnext_tiny"}
    for name, row in by_model.items():
        ratio = row["gmacs_per_s"] / by_model["tiny_moat_0"]["gmacs_per_s"]
        assert row["ratio_to_moat"] == pytest.approx(ratio), name
    # timm's models are counted by torch's FLOP counter: ConvNeXt-T is 4.46 GMACs at 224.
    assert count_macs("convnext_tiny", (224, 224)) == pytest.approx(4.46e9, rel=0.01)


def test_peak_memory_is_measured_in_a_fresh_process():
    (row,) = run_benchmark(["tiny_moat_0"], img_sizes=[64], batch_sizes=[1], warmup=0,
                           repeats=1, latency=False, memory=True)
    assert 10 < row["peak_mem_mib"] < 4096


def test_preset_builds_moat_with_the_dense_attention_layout():
    # At 256 px the third stage is 16x16: 14x14 windows (cut at the edge) cost fewer
    # multiply-adds than global attention; the peers are built as they are.
    (row,) = run_benchmark(["tiny_moat_0"], preset="detection", img_sizes=[256],
                           batch_sizes=[1], warmup=0, repeats=1, latency=False, memory=False)
    assert row["model"] == "tiny_moat_0 [detection]"
    assert count_macs("tiny_moat_0", (256, 256), "detection") < count_macs("tiny_moat_0",
                                                                           (256, 256))
    assert row["gmacs"] * 1e9 == count_macs("tiny_moat_0", (256, 256), "detection")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        run_benchmark(["tiny_moat_0"], modes=["serve"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_benchmark(["tiny_moat_0"], dtypes=["int4"])
    with pytest.raises(ValueError, match="unknown preset"):
        count_macs("tiny_moat_0", (64, 64), "tracking")


def test_allocator_setting_respects_the_environment(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {"allocator": "system default"})
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert allocator.keep_freed_memory() == "set by the environment"
    assert not allocator.freed_memory_kept()  # unknown: eager inference keeps chunking
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    setting = allocator.keep_freed_memory()
    assert setting == allocator.allocator_setting()
    assert setting.startswith("glibc") or setting == "system default"
    assert allocator.freed_memory_kept() == setting.startswith("glibc, freed memory kept")
