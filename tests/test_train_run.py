"""End-to-end training runs on a tiny generated dataset (tiny_moat_0 at 32x32, a few steps):
kill-and-resume equivalence, NaN stop, bad data, fine-tuning, eval/predict/plot output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moat.cli import main as cli
from moat.train.checkpoint import CheckpointManager, read_meta, read_state
from moat.train.config import load_config
from moat.train.loop import NonFiniteLossError, run_training, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = dict(model="tiny_moat_0", img_size=32, batch_size=8, workers=0, progress=False,
            tensorboard=False, lr=2e-3, warmup_epochs=0.5, log_every_steps=1,
            randaugment=[2, 9], scale=[0.5, 1.0], crop_pct=1.0, ema_decay=0.9)


def _flags(settings: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v) if isinstance(v, list) else v}"
            for k, v in settings.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 classes x 8 training images (4 steps of 8), 4 x 2 validation images, 32x32."""
    from moat.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_classes=4, train_per_class=8, val_per_class=2, img_size=32)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished 1-epoch run (used by the eval/predict/fine-tune tests)."""
    run = tmp_path_factory.mktemp("trained")
    train(load_config(None, [], data=str(data), output=str(run), epochs=1, **TINY))
    return run


def _weights(run: Path, which: str = "model") -> dict[str, torch.Tensor]:
    latest = CheckpointManager(run).latest()
    return load_file(str(latest / f"{which}.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted(data, tmp_path):
    """SIGKILL after the first checkpoint (mid-epoch), --resume, same final weights."""
    settings = dict(TINY, epochs=2, save_every_steps=2, deterministic=True, mixup=0.8,
                    cutmix=1.0, workers=1)
    full = tmp_path / "full"
    train(load_config(None, [], data=str(data), output=str(full), **settings))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moat.cli", "train", "--data", str(data), "--output",
           str(killed), *_flags(settings)]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {err.decode()}"
    first = CheckpointManager(killed).latest()
    assert first is not None and read_meta(first)["step"] < 8

    result = run_training(None, [], resume=True, output=str(killed), progress=False)
    assert read_meta(result["checkpoint"])["step"] == 8
    _assert_same(_weights(full), _weights(killed))
    _assert_same(_weights(full, "ema"), _weights(killed, "ema"))
    log = (killed / "train.log").read_text()
    assert "resumed from" in log


def test_nan_loss_stops_with_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    from moat.tasks.classification.task import ClassificationTask

    calls, loss = [], ClassificationTask.loss

    def nan_from_step_3(self, *args, **kwargs):  # one micro-batch per step here
        value, scalars = loss(self, *args, **kwargs)
        calls.append(1)
        return (value * float("nan") if len(calls) >= 3 else value), scalars

    monkeypatch.setattr(ClassificationTask, "loss", nan_from_step_3)
    run = tmp_path / "nan"
    code = cli(["train", "--data", str(data), "--output", str(run), "--epochs", "2",
                *_flags(dict(TINY, save_every_steps=1, ema=False,
                             precision="bf16"))])  # bf16 autocast on the CPU too
    err = capsys.readouterr().err
    assert code == 2
    assert "the loss is nan at epoch 1, step 3" in err and "step-000000002" in err
    last = CheckpointManager(run).latest()
    assert last.name == "step-000000002"  # nothing written after the last good step
    weights = _weights(run)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert read_state(last)["optimizer"]["state"]  # loads with weights_only=True
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        run_training(None, [], resume=True, output=str(run), progress=False)


def _corrupt_copy(data: Path, dest: Path) -> list[Path]:
    import shutil

    shutil.copytree(data, dest)
    good = next((dest / "train" / "circle").iterdir()).read_bytes()
    bad = [dest / "train" / "circle" / "random.png", dest / "train" / "square" / "cut.png",
           dest / "train" / "cross" / "notes.jpg", dest / "val" / "triangle" / "empty.png"]
    bad[0].write_bytes(os.urandom(300))
    bad[1].write_bytes(good[: len(good) // 2])
    bad[2].write_text("not an image")
    bad[3].write_bytes(b"")
    return bad


def test_bad_files_are_skipped_and_reported(data, tmp_path):
    root = tmp_path / "data"
    bad = _corrupt_copy(data, root)
    run = tmp_path / "run"
    # also exercises gradient accumulation, channels-last and gradient checkpointing
    result = train(load_config(None, [], data=str(root), output=str(run), epochs=1,
                               accum_steps=2, channels_last=True, grad_checkpointing=True,
                               **TINY))
    assert set(result["bad_images"]) == {str(p) for p in bad}
    log = (run / "train.log").read_text()
    assert all(str(p) in log for p in bad) and "4 unreadable image file(s)" in log
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "bad_images" and e["count"] == 4 for e in events)
    assert result["metrics"]["images"] == 8  # the empty val file was skipped

    from moat.data.images import BadImageError

    with pytest.raises(BadImageError, match="strict mode"):
        train(load_config(None, [], data=str(root), output=str(tmp_path / "strict"), epochs=1,
                          strict_data=True, **TINY))


def test_eval_and_predict_output(trained, data, tmp_path, capsys):
    assert cli(["eval", "--data", str(data), "--checkpoint", str(trained), "--workers", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("top-1: ") and "top-5: " in out[-1] and "(8 images)" in out[-1]
    assert any(line.strip().startswith("circle: ") for line in out)  # per-class accuracy
    assert (trained / "eval" / "confusion.png").stat().st_size > 0
    assert "circle" in (trained / "eval" / "per_class.csv").read_text()

    images = sorted((data / "val" / "circle").iterdir())
    json_path = tmp_path / "pred.json"
    assert cli(["predict", *map(str, images), "--checkpoint", str(trained), "--top-k", "3",
                "--json", str(json_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(images) and lines[0].startswith(str(images[0]) + ": ")
    results = json.loads(json_path.read_text())
    assert [r["path"] for r in results] == list(map(str, images))
    for r in results:
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert {t["label"] for t in r["top_k"]} <= {"circle", "square", "triangle", "cross"}

    # a checkpoint's weights file works alone: classes and preprocessing are in its header
    from moat.train.eval_predict import predict_checkpoint

    file = CheckpointManager(trained).latest() / "model.safetensors"
    again = predict_checkpoint(images[:1], file, top_k=3)
    assert again[0]["top_k"][0]["label"] in {"circle", "square", "triangle", "cross"}

    assert cli(["plot", str(trained)]) == 0
    assert (trained / "curves.png").stat().st_size > 0


def test_fine_tune_new_classes_resolution_layer_decay_frozen(trained, tmp_path):
    from moat.data.synthetic import write_shapes_dataset

    other = tmp_path / "three"
    write_shapes_dataset(other, num_classes=3, train_per_class=8, val_per_class=1, img_size=48)
    run = tmp_path / "ft"
    preferred = read_meta(CheckpointManager(trained).latest())["preferred_weights"]
    source = _weights(trained, preferred)  # what --init-from RUN_DIR loads
    result = train(load_config(None, [], data=str(other), output=str(run), epochs=1,
                               init_from=str(trained), layer_decay=0.7, frozen_stages=1,
                               **dict(TINY, img_size=48)))
    assert result["metrics"]["images"] == 3
    tuned = _weights(run)
    assert tuned["logits_head.weight"].shape == (3, source["logits_head.weight"].shape[1])
    for name, value in tuned.items():  # stem and stage 0 frozen: equal to the source
        if name.startswith(("stem.", "stages.0.")):
            assert torch.equal(value, source[name]), name
    trained_later = [k for k in tuned if k.startswith("stages.3.") and k.endswith("weight")]
    assert any(not torch.equal(tuned[k], source[k]) for k in trained_later)  # not frozen
    log = (run / "train.log").read_text()
    assert "classifier re-initialised" in log


def test_existing_run_needs_resume(trained, data):
    with pytest.raises(ValueError, match="--resume"):
        train(load_config(None, [], data=str(data), output=str(trained), epochs=1, **TINY))
