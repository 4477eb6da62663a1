"""Parameter groups, layer-wise lr decay, frozen stages, schedule and EMA."""

from __future__ import annotations

import math

import pytest
import torch

import moat
from moat.train.optim import ModelEma, WarmupCosine, build_optimizer, param_groups


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return moat.create_model("tiny_moat_0", num_classes=5)


def _group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


def test_no_weight_decay_on_norms_biases_and_position_tables(model):
    groups = param_groups(model, 0.05)
    owner = _group_of(groups)
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith("relative_position_embedding")
        assert owner[id(p)]["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert all(g["lr_scale"] == 1.0 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_wise_lr_decay(model):
    decay = 0.5
    groups = param_groups(model, 0.05, layer_decay=decay, backbone=model)
    owner = _group_of(groups)
    num_blocks = sum(len(s) for s in model.stages)  # 14 for tiny-MOAT-0
    head = num_blocks + 1
    scale = {name: owner[id(p)]["lr_scale"] for name, p in model.named_parameters()}
    assert scale["logits_head.weight"] == 1.0 and scale["final_layer_norm.weight"] == 1.0
    assert scale["stem.conv_0.weight"] == pytest.approx(decay ** head)
    block = 0
    for s, stage in enumerate(model.stages):
        for b in range(len(stage)):
            block += 1
            names = [n for n in scale if n.startswith(f"stages.{s}.{b}.")]
            assert names and all(scale[n] == pytest.approx(decay ** (head - block)) for n in names)
    # lr_scale reaches the optimiser's groups through the schedule
    opt = torch.optim.AdamW(groups, lr=1.0)
    WarmupCosine(peak_lr=1e-3, total_steps=10).apply(opt, 0)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in opt.param_groups)


def test_frozen_stages_have_no_grad_and_keep_bn_statistics():
    torch.manual_seed(0)
    m = moat.create_model("tiny_moat_0", num_classes=3)
    m.freeze_stages(2)  # stem + stages 0 and 1
    assert m.frozen_modules() == [m.stem, m.stages[0], m.stages[1]]
    groups = param_groups(m, 0.05)
    trainable = {id(p) for g in groups for p in g["params"]}
    stats = m.stages[0][0].pre_norm.running_mean.clone()
    m.train()
    loss = m(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    for name, p in m.named_parameters():
        is_frozen = name.startswith(("stem.", "stages.0.", "stages.1."))
        assert (p.grad is None) == is_frozen, name
        assert (id(p) in trainable) != is_frozen, name
    assert torch.equal(m.stages[0][0].pre_norm.running_mean, stats)  # eval mode kept
    assert not m.stem.training and m.stages[2].training


def test_freeze_everything_is_an_error():
    m = moat.create_model("tiny_moat_0", num_classes=3)
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(m, 0.05)


def test_build_optimizer_from_config(model):
    from moat.train.config import load_config

    opt = build_optimizer(model, load_config(None, ["lr=0.01", "betas=[0.8,0.9]"]), model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    opt = build_optimizer(model, load_config(None, ["optimizer=sgd", "lr=0.1"]), model)
    assert isinstance(opt, torch.optim.SGD)


def test_warmup_cosine():
    s = WarmupCosine(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_lr=0.0, min_lr=0.1)
    assert s.lr(0) == 0.0 and s.lr(5) == pytest.approx(0.5) and s.lr(10) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert s.lr(110) == pytest.approx(0.1) and s.lr(500) == pytest.approx(0.1)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 120))


def test_ema_warmup_and_average():
    lin = torch.nn.Linear(2, 2)
    start = lin.weight.detach().clone()
    ema = ModelEma(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)
    d = 2 / 11  # warm-up: min(0.5, (1 + n) / (10 + n)) with n = 1 update
    assert ema.current_decay() == pytest.approx(d)
    assert torch.allclose(ema.module.weight, d * start + (1 - d) * 1.0)
    assert not ema.module.weight.requires_grad
    for _ in range(100):
        ema.update(lin)
    assert ema.current_decay() == 0.5
    assert torch.allclose(ema.module.weight, torch.ones(2, 2), atol=1e-6)
