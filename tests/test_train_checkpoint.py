"""Checkpoints: atomic writes, keep-last-N and best, safe loading, finding them again."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moat.train import checkpoint as ckpt
from moat.train import rng
from moat.train.checkpoint import CheckpointManager, read_state, read_weights, resolve_checkpoint


def _save(manager: CheckpointManager, step: int, value: float = 0.0, ema: bool = True):
    weights = {"w": torch.full((3, 2), float(step)), "b": torch.tensor([value])}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [
        {"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "name": "layer0"}]},
        "rng": [rng.rng_state()], "best": None}
    return manager.save(step, model=weights, ema=weights if ema else None, state=state,
                        meta={"epoch": 0, "batch_in_epoch": step, "config": {"model": "x"}},
                        weights_metadata={"format": "moat-train"})


def test_save_layout_and_safe_loading(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    path = _save(manager, 7)
    assert path.name == "step-000000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "meta.json", "model.safetensors", "state.pt", "state.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and "torch" in meta["versions"]
    # the optimiser state loads with weights_only=True (no arbitrary pickle), its tensors
    # from state.safetensors
    state = torch.load(path / "state.pt", weights_only=True)["state"]
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert read_state(path)["rng"][0]["torch"].dtype == torch.uint8
    weights, which = read_weights(path)
    assert which == "ema" and torch.equal(weights["w"], torch.full((3, 2), 7.0))
    assert read_weights(path, "model")[1] == "model"


def test_rng_state_round_trip():
    state = rng.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    rng.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_keep_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    first = _save(manager, 1)
    manager.mark_best(first, "top-1", 90.0, "ema")
    for step in range(2, 7):
        _save(manager, step)
    names = [p.name for p in manager.complete()]
    assert names == ["step-000000001", "step-000000005", "step-000000006"]  # best + last 2
    assert manager.best()["name"] == "step-000000001"
    assert manager.latest().name == "step-000000006"


def test_interrupted_save_leaves_previous_state(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = _save(manager, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        _save(manager, 2)
    monkeypatch.undo()
    assert manager.latest() == good  # pointer untouched, no half-written step-2
    assert not (tmp_path / "checkpoints" / "step-000000002").exists()
    # the failed write's files are removed at once (a full disk gets its space back)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    (tmp_path / "checkpoints" / ".tmp-step-000000002-999").mkdir()  # as a kill -9 leaves it
    _save(manager, 3)  # the next save removes the leftovers
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    assert manager.latest().name == "step-000000003"


def test_incomplete_checkpoint_is_ignored(tmp_path):
    manager = CheckpointManager(tmp_path)
    good = _save(manager, 1)
    newer = _save(manager, 2)
    (newer / "state.pt").unlink()  # e.g. a truncated copy
    (tmp_path / "checkpoints" / "latest").write_text("garbage\n")
    assert manager.latest() == good


def test_same_step_saved_twice(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 4, value=1.0)
    path = _save(manager, 4, value=2.0)
    assert read_weights(path, "model")[0]["b"].item() == 2.0


def test_resolve_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    path = _save(manager, 5)
    assert resolve_checkpoint(tmp_path / "run") == path
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints") == path
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(path / "model.safetensors") == path / "model.safetensors"
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_atomic_write_text(tmp_path):
    target = tmp_path / "a" / "pointer"
    ckpt.atomic_write_text(target, "one")
    ckpt.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["pointer"]


def test_load_pretrained_for_fine_tuning(tmp_path):
    """Our weights or official (TF-named) weights into a model with another head."""
    import numpy as np

    import moat
    from moat.train.finetune import load_pretrained
    from moat.weights.official import to_official

    torch.manual_seed(0)
    source = moat.create_model("tiny_moat_0", num_classes=1000)
    torch.manual_seed(1)
    target = moat.create_model("tiny_moat_0", num_classes=7)
    head = target.logits_head.weight.clone()

    np.savez(tmp_path / "official.npz", **to_official(source))
    message = load_pretrained(target, tmp_path / "official.npz")
    assert "classifier re-initialised" in message
    expected = source.state_dict()
    for name, value in target.state_dict().items():
        if name.startswith("logits_head."):
            continue
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(value, expected[name]), name
    assert torch.equal(target.logits_head.weight, head)

    from safetensors.torch import save_file

    save_file({f"module.{k}": v.contiguous() for k, v in expected.items()},
              str(tmp_path / "ours.safetensors"))
    torch.manual_seed(2)
    other = moat.create_model("tiny_moat_0", num_classes=7)
    message = load_pretrained(other, tmp_path / "ours.safetensors")
    assert "classifier re-initialised (logits_head" in message and "[1000] -> [7]" in message
    assert torch.equal(other.stem.conv_0.weight, source.stem.conv_0.weight)

    wrong = moat.create_model("tiny_moat_1", num_classes=7)
    with pytest.raises(ValueError, match="variant"):
        load_pretrained(wrong, tmp_path / "ours.safetensors")
