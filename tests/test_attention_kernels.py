"""The attention kernel switch: FlexAttention (the position bias as a score modification)
gives sdpa's numbers. On the CPU it runs forward only (FlexAttention has no CPU backward);
benchmarks/gpu.py compares both kernels, forward and backward, on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moat
from moat.models import layers
from moat.models.layers import attention_kernel, set_attention_kernel

# on the CPU FlexAttention runs its unfused reference, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex():
    previous = set_attention_kernel("flex")
    yield
    set_attention_kernel(previous)


def _model() -> moat.MoatNet:
    torch.manual_seed(0)
    # 40 px: stage 3 is 3x3 under 2x2 windows (cut windows with the cropped bias), stage 4
    # global; position tables far from zero so that a bias mistake shows
    model = moat.create_model("tiny_moat_0", num_classes=10,
                              window_size=[None, None, (2, 2), None])
    for module in model.modules():
        if isinstance(module, layers.Attention):
            torch.nn.init.normal_(module.relative_position_embedding, std=1.0)
    return model.eval()


def test_flex_inference_equals_sdpa(flex):
    model, x = _model(), torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        got = model(x)
        set_attention_kernel("sdpa")
        expected = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flex_attention_is_what_runs(flex, monkeypatch):
    calls = {"flex": 0, "sdpa": 0}

    def counted(kernel, real):
        return lambda *a, **k: calls.__setitem__(kernel, calls[kernel] + 1) or real(*a, **k)

    monkeypatch.setattr(layers, "flex_attention_with_bias",
                        counted("flex", layers.flex_attention_with_bias))
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        counted("sdpa", F.scaled_dot_product_attention))
    model, x = _model(), torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        model(x)
        set_attention_kernel("sdpa")
        model(x)
    # stage 3: 7 blocks x 4 window sizes (2x2, 2x1, 1x2, 1x1 on its 3x3 map); stage 4: 2
    assert calls == {"flex": 30, "sdpa": 30}


def test_cpu_training_keeps_sdpa_under_the_flex_switch(flex):
    model, x = _model().train(), torch.randn(2, 3, 40, 40)
    target = torch.tensor([1, 7])
    grads = []
    for kernel in ("flex", "sdpa"):
        set_attention_kernel(kernel)
        model.zero_grad()
        F.cross_entropy(model(x), target).backward()
        grads.append(model.stages[3][0].attention.relative_position_embedding.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_unknown_kernel_refused():
    with pytest.raises(ValueError, match="sdpa"):
        set_attention_kernel("flash")
    assert attention_kernel() == "sdpa"
