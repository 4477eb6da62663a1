"""float16 training with a gradient scaler, on the CPU, through the real training loop (the path
CUDA runs take): it trains, and a step whose gradients overflow is skipped and halves the
scale. Also the device settings of `moat.device`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moat import device as moat_device
from moat.train.assemble import assemble
from moat.train.checkpoint import CheckpointManager, read_state
from moat.train.config import load_config
from moat.train.distributed import DistInfo
from moat.train.loop import Trainer, train
from moat.train.precision import amp_dtype, grad_scaler

# One batch of 8 images per epoch, the same images every step: nothing random but the model's
# initialisation, so the loss of a working run falls.
FIXED_BATCH = dict(model="tiny_moat_0", img_size=32, batch_size=8, workers=0, progress=False,
                   tensorboard=False, lr=2e-3, warmup_epochs=0, log_every_steps=1,
                   randaugment=None, mixup=0.0, cutmix=0.0, hflip=0.0, scale=[1.0, 1.0],
                   crop_pct=1.0, label_smoothing=0.0, drop_path_rate=0.0, ema=False,
                   eval_every_epochs=0, device="cpu", precision="fp16", weight_decay=0.0)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory) -> Path:
    """4 classes x 2 training images at 32x32: one batch of 8."""
    from moat.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("one_batch")
    write_shapes_dataset(root, num_classes=4, train_per_class=2, val_per_class=1, img_size=32)
    return root


def test_fp16_means_a_scaler_on_the_cpu_too():
    cpu = torch.device("cpu")
    assert amp_dtype("fp16", cpu) is torch.float16
    scaler = grad_scaler(torch.float16, cpu)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert grad_scaler(torch.bfloat16, cpu) is None and grad_scaler(None, cpu) is None


def test_fp16_training_on_cpu_loss_finite_and_falling(one_batch, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, [], data=str(one_batch), output=str(run), epochs=8, **FIXED_BATCH))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 8, records
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    state = read_state(CheckpointManager(run).latest())
    assert state["scaler"]["scale"] > 0  # the scaler ran and its state is checkpointed


def _one_step_run(data: Path, output: Path) -> Trainer:
    config = load_config(None, [], data=str(data), output=str(output), epochs=1, **FIXED_BATCH)
    config.validate()
    return Trainer(*assemble(config, DistInfo(), resume=False))


@pytest.mark.parametrize("overflow", [False, True])
def test_fp16_overflow_skips_exactly_that_step(one_batch, tmp_path, overflow):
    trainer = _one_step_run(one_batch, tmp_path / "run")
    run = trainer.run
    before = {k: v.detach().clone() for k, v in run.model.named_parameters()}
    # A scale at which this step's gradients fit float16 (the default 2**16 overflows here:
    # the scaler then lowers it over the first steps, as in the training test above)
    state = run.scaler.state_dict()
    run.scaler.load_state_dict({**state, "scale": 2.0 ** 8})
    scale = run.scaler.get_scale()
    if overflow:  # as float16 does when a product exceeds 65504: one gradient becomes inf
        run.model.logits_head.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    trainer.fit()
    changed = [k for k, v in run.model.named_parameters() if not torch.equal(v, before[k])]
    assert trainer.progress.step == 1
    if overflow:
        assert changed == [], changed[:5]  # no parameter moved ...
        assert not run.optimizer.state  # ... and the optimiser never stepped
        assert run.scaler.get_scale() == scale / 2
    else:
        assert len(changed) > 0.9 * len(before)  # all but a few with zero gradient
        assert run.optimizer.state
        assert run.scaler.get_scale() == scale


def test_configure_device_tf32_and_cudnn():
    cpu = torch.device("cpu")
    try:
        moat_device.configure_device(cpu, tf32=True)
        assert moat_device.tf32_enabled() and torch.backends.cudnn.benchmark
        moat_device.configure_device(cpu, tf32=False, deterministic=True)
        assert not moat_device.tf32_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        moat_device.configure_device(cpu)
    assert not torch.are_deterministic_algorithms_enabled()


def test_pick_device_and_transfers(monkeypatch):
    assert moat_device.pick_device("cpu") == torch.device("cpu")
    assert not moat_device.pins_memory(torch.device("cpu"))
    assert moat_device.pins_memory(torch.device("cuda", 0))
    x = torch.randn(2, 3, 4, 5)
    y = moat_device.to_device(x, torch.device("cpu"), torch.channels_last)
    assert torch.equal(x, y) and y.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert moat_device.pick_device("auto") == torch.device("cpu")
    with pytest.raises(moat_device.DeviceError, match="--device cpu"):
        moat_device.pick_device("cuda")
    with pytest.raises(moat_device.DeviceError, match="not a device name"):
        moat_device.pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert moat_device.pick_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert moat_device.pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(moat_device.DeviceError, match="2 CUDA device"):
        moat_device.pick_device("cuda:2")
