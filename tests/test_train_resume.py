"""Resuming safely (issue 25): a damaged checkpoint is never overwritten or deleted, a run
with nothing intact is refused with how to go on, `--resume` reads the run's own settings and
refuses flags that change its model, task or classes. Every refusal leaves the run folder
byte for byte as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from moat.cli import main as cli
from moat.errors import EXIT_ERROR
from moat.train.run import run_settings

TINY = ["--model", "tiny_moat_0", "--img-size", "32", "--batch-size", "4", "--lr", "1e-3",
        "--workers", "0", "--no-progress", "--no-tensorboard", "--epochs", "1"]


@pytest.fixture(scope="module")
def trained(shapes3, tmp_path_factory) -> Path:
    """A finished one-epoch run (one checkpoint); tests work on copies of it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli(["train", "--data", str(shapes3), "--output", str(run), *TINY]) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in (".lock", "train.log")}


def _refused(capsys, argv: list[str], run: Path, *needles: str) -> str:
    before = _snapshot(run)
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == EXIT_ERROR, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert _snapshot(run) == before  # nothing the user owns changed
    return err


def _only_checkpoint(run: Path) -> Path:
    [checkpoint] = (run / "checkpoints").glob("step-*")
    return checkpoint


def test_damaged_only_checkpoint_is_never_trained_over(capsys, trained, shapes3, tmp_path):
    run = _copy(trained, tmp_path)
    meta = _only_checkpoint(run) / "meta.json"
    meta.write_text(meta.read_text()[:-40])  # weights intact, meta.json damaged
    err = _refused(capsys, ["train", "--data", str(shapes3), "--output", str(run), *TINY,
                            "--resume"], run, "no intact checkpoint", "meta.json",
                   "Nothing was changed", "--init-from")
    assert str(_only_checkpoint(run)) + "/model.safetensors" in err
    # and without --resume the damaged checkpoint is not a free folder either
    _refused(capsys, ["train", "--data", str(shapes3), "--output", str(run), *TINY], run,
             "already holds checkpoints", "--resume")


def test_resume_with_another_model_says_what_differs(capsys, trained, shapes3, tmp_path):
    run = _copy(trained, tmp_path)
    _refused(capsys, ["train", "--data", str(shapes3), "--output", str(run), *TINY,
                      "--model", "tiny_moat_1", "--resume"], run,
             "model: the run has 'tiny_moat_0', this command asks 'tiny_moat_1'",
             "another --output", "--init-from")


def test_resume_with_other_classes_says_what_differs(capsys, trained, shapes3, tmp_path):
    run = _copy(trained, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(shapes3, data)
    for split in ("train", "val"):
        shutil.copytree(data / split / "circle", data / split / "zebra")
    err = _refused(capsys, ["train", "--data", str(data), "--output", str(run), *TINY,
                            "--resume"], run, "classes differ", "new: zebra",
                   "the run has 3, the data 4")
    assert "size mismatch" not in err


def test_resume_reads_the_runs_own_config_yaml(capsys, trained, tmp_path):
    """A run stopped before its first checkpoint has only config.yaml: --resume continues
    with its settings (not the defaults), so a changed model is named, not trained."""
    run = _copy(trained, tmp_path)
    shutil.rmtree(run / "checkpoints")
    settings = run_settings(run)
    assert settings["model"] == "tiny_moat_0" and settings["img_size"] == 32
    assert settings == yaml.safe_load((run / "config.yaml").read_text())
    _refused(capsys, ["train", "--output", str(run), "--model", "moat_0", "--resume"], run,
             "model: the run has 'tiny_moat_0', this command asks 'moat_0'")


def test_resume_reads_each_checkpoint_file_once(trained, shapes3, tmp_path, monkeypatch):
    """`moat train --resume` finds the checkpoint (its settings, then the one to restore),
    verifies and loads it from one read of each file."""
    import moat.train.checkpoint_folder as checkpoint

    run = _copy(trained, tmp_path)
    start = _only_checkpoint(run)
    reads: list[str] = []
    original = checkpoint.read_verified

    def counted(path, record):
        if Path(path).parent == start:
            reads.append(Path(path).name)
        return original(path, record)

    monkeypatch.setattr(checkpoint, "read_verified", counted)
    assert cli(["train", "--data", str(shapes3), "--output", str(run), *TINY[:-1], "2",
                "--resume"]) == 0
    assert sorted(reads) == ["ema.safetensors", "model.safetensors", "state.pt",
                             "state.safetensors"]
