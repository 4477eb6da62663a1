"""Fault injection on `moat train`: a process killed while writing a checkpoint, killed at an
epoch boundary, stopped by SIGTERM, or racing another run into the same folder; each ends with
`moat train --resume` giving the weights of an uninterrupted run (or a clear refusal).

Faults are injected by a driver that patches one function in a child process and then runs
the real command line (`moat.cli.main`), so nothing in the library knows about the tests.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moat.cli import main as cli
from moat.train.checkpoint import CheckpointManager, read_meta
from moat.integrity import read_safetensors

SRC = str(Path(__file__).resolve().parents[1] / "src")
# 3 classes x 4 images, batch 4: 3 steps per epoch, 2 epochs; a checkpoint every 2 steps too
FLAGS = ["--model", "tiny_moat_0", "--img-size", "32", "--batch-size", "4", "--lr", "2e-3",
         "--epochs", "2", "--workers", "0", "--no-progress", "--no-tensorboard",
         "--deterministic", "--save-every-steps", "2", "--ema-decay", "0.9",
         "--warmup-epochs", "0.5", "--set", "randaugment=[2,9]", "--mixup", "0.5"]

# Patches applied in the child before `moat train` runs; each ends the process on purpose.
FAULTS = {
    # SIGKILL half-way through writing state.pt of the third checkpoint (step 4: checkpoints
    # are written at steps 2, 3 (end of epoch 1), 4 and 6)
    "during checkpoint write": """
import io, moat.train.checkpoint as c
original, calls = c.torch.save, []
def save(obj, f, *args, **kwargs):  # state.pt is the one file written with torch.save
    calls.append(1)
    if len(calls) == 3:
        data = io.BytesIO()
        original(obj, data, *args, **kwargs)
        f.write(data.getvalue()[: len(data.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, f, *args, **kwargs)
c.torch.save = save
""",
    # SIGKILL right after the end-of-epoch-1 checkpoint is in place, before epoch 2 starts
    "at an epoch boundary": """
import moat.train.checkpoint as c
original = c.CheckpointManager.save
def save(self, step, **kw):
    path = original(self, step, **kw)
    if kw["meta"]["epoch_done"]:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return path
c.CheckpointManager.save = save
""",
    # SIGKILL in the background commit of the step-3 checkpoint (written, not yet synced)
    "during the background commit": """
import moat.train.checkpoint as c
original, calls = c.sync_files, []
def sync_files(paths):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(paths)
c.sync_files = sync_files
""",
    # hold the run folder (lock taken, config written), then wait to be killed
    "holding the run": """
import time, moat.train.loop as l
def wait(self):
    print("READY", flush=True)
    time.sleep(600)
l.Trainer._train_epoch = wait
""",
    "none": "",
}


def _child(fault: str, data: Path, run: Path, *extra: str) -> subprocess.Popen:
    argv = ["train", "--data", str(data), "--output", str(run), *FLAGS, *extra]
    return _child_argv(argv, fault)


def _child_argv(argv: list[str], fault: str = "none") -> subprocess.Popen:
    driver = ("import os, signal, sys\n" + FAULTS[fault] +
              "\nfrom moat.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", driver, *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _train(data: Path, run: Path, *extra: str, argv: list[str] | None = None) -> str:
    """`moat train` in a process of its own, as a user runs it (the reference run, a killed
    run and its resumption must not share a test process: state another test leaves in this
    one, such as torch's thread count, changes float rounding); its stderr."""
    child = _child("none", data, run, *extra) if argv is None else _child_argv(argv)
    _, err = child.communicate(timeout=900)
    assert child.returncode == 0, err[-3000:]
    return err


def _weights(run: Path, which: str) -> dict[str, torch.Tensor]:
    return read_safetensors(CheckpointManager(run).latest_intact() / f"{which}.safetensors")[0]


@pytest.fixture(scope="module")
def data(shapes3) -> Path:
    return shapes3


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    _train(data, run)
    return run


def _assert_same_as(reference: Path, run: Path) -> None:
    assert read_meta(CheckpointManager(run).latest_intact())["step"] == 6
    for which in ("model", "ema"):
        a, b = _weights(reference, which), _weights(run, which)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{which}: {len(different)} tensors differ, e.g. {different[:3]}"


# The runs killed, resumed and compared with `uninterrupted` below are separate processes:
# slow, and kept on one xdist worker (`xdist_group`, `--dist loadgroup` in pyproject.toml) so
# that the module's reference run is made once.
@pytest.mark.parametrize("fault", ["during checkpoint write", "during the background commit",
                                   "at an epoch boundary"])
@pytest.mark.slow
@pytest.mark.xdist_group("train_faults")
def test_kill_then_resume_matches_uninterrupted(fault, data, uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    child = _child(fault, data, run)
    _, err = child.communicate(timeout=900)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    checkpoints = run / "checkpoints"
    if fault == "during checkpoint write":  # the half-written step-4 never became a checkpoint
        assert CheckpointManager(run).latest().name == "step-000000003"
        assert any(p.name.startswith(".tmp-step-000000004") for p in checkpoints.iterdir())
    elif fault == "during the background commit":  # step 3 written, never put in place
        assert CheckpointManager(run).latest().name == "step-000000002"
        assert any(p.name.startswith(".tmp-step-000000003") for p in checkpoints.iterdir())
    else:
        assert CheckpointManager(run).latest().name == "step-000000003"
    _train(data, run, "--resume")
    _assert_same_as(uninterrupted, run)
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())  # cleaned up
    assert "resumed from" in (run / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("train_faults")
def test_sigterm_prints_the_command_that_resumes(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    child = _child("none", data, run)
    pointer = run / "checkpoints" / "latest"
    deadline = time.time() + 900
    while not pointer.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    command = re.search(r"^\s+(moat train .*--resume)$", err, re.M).group(1)
    _train(data, run, argv=shlex.split(command)[1:])  # the printed command, as printed
    _assert_same_as(uninterrupted, run)


@pytest.mark.slow
@pytest.mark.xdist_group("train_faults")
def test_damaged_newest_checkpoint_resumes_from_the_previous(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    child = _child("at an epoch boundary", data, run)
    child.communicate(timeout=900)
    newest = CheckpointManager(run).latest()  # step 3; step 2 is intact
    (newest / "ema.safetensors").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in newest.iterdir()}
    err = _train(data, run, "--resume")
    assert "step-000000003 is damaged" in err and "ema.safetensors" in err
    assert "step-000000003 is damaged" in (run / "train.log").read_text()  # kept with the run
    # moved aside, byte for byte, before the resumed run saved its own step 3
    kept = run / "checkpoints" / "damaged" / "step-000000003"
    assert "moved aside to " + str(kept) in err
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    _assert_same_as(uninterrupted, run)


def test_second_run_and_resume_of_a_live_run_are_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = _child("holding the run", data, run)
    try:
        assert holder.stdout.readline().strip() == "READY"
        config = (run / "config.yaml").read_text()
        for extra in ([], ["--resume"], ["--epochs", "5"]):
            code = cli(["train", "--data", str(data), "--output", str(run), *FLAGS, *extra])
            err = capsys.readouterr().err
            assert code == 2 and f"in use by process {holder.pid}" in err, err
        assert (run / "config.yaml").read_text() == config  # nothing of the live run touched
    finally:
        holder.kill()
        holder.wait()
    # the lock of the dead process is stale: taken over
    assert cli(["train", "--data", str(data), "--output", str(run), *FLAGS, "--resume",
                "--epochs", "1"]) == 0


def test_one_corrupt_image_in_a_batch_of_two_is_skipped(data, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    for split, names in (("train", ("circle", "square")), ("val", ("circle", "square"))):
        for name in names:
            shutil.copytree(data / split / name, root / split / name)
    min((root / "train" / "square").iterdir()).unlink()
    bad = root / "train" / "circle" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    # 8 training files, batch 2: the broken file leaves one image in its batch, whose 1x1
    # last feature map BatchNorm cannot normalise ("expected more than one value per channel")
    argv = ["train", "--data", str(root), "--output", str(tmp_path / "run"), *FLAGS[:-2],
            "--batch-size", "2", "--epochs", "1", "--seed", "1"]
    assert cli(argv) == 0, capsys.readouterr().err
    assert "broken.png" in (tmp_path / "run" / "train.log").read_text()


def test_output_folder_with_the_users_files_is_refused(data, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: settings\n")
    (project / "notes.md").write_text("mine\n")
    code = cli(["train", "--data", str(data), "--output", str(project), *FLAGS])
    assert code == 2 and "not a moat run's (notes.md)" in capsys.readouterr().err
    assert (project / "config.yaml").read_text() == "my: settings\n"
