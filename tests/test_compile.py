"""`torch.compile` of MoatNet on the CPU: one graph (no breaks) and the numbers of eager mode,
for inference and for a training step. The GPU runs the same check in benchmarks/gpu.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import moat

# Window attention in stage 3 (4x4 windows on its 4x4 map at 64 px would be global: 2x2
# windows make it windowed) and global attention in stage 4: both attention paths.
LAYOUTS = {"global": None, "window": [None, None, (2, 2), None]}


def _model(layout: str) -> moat.MoatNet:
    torch.manual_seed(0)
    return moat.create_model("tiny_moat_0", num_classes=10, window_size=LAYOUTS[layout])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_is_one_graph(layout, mode):
    model = _model(layout).train(mode == "train")
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    reasons = [b.reason for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


@pytest.fixture(scope="module")
def compiled_pair():
    """An eager tiny-MOAT-0 with window and global attention, and a compiled copy of it
    (inductor; the compilation, about a minute on 2 cores, is shared by the tests below).
    The compiled wrapper runs the copy's own parameters and buffers."""
    eager = _model("window")
    copied = copy.deepcopy(eager)
    return eager, copied, torch.compile(copied)


@pytest.mark.slow
def test_compiled_inference_equals_eager(compiled_pair):
    eager, _, compiled = compiled_pair
    x = torch.randn(2, 3, 64, 64)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        expected, got = eager(x), compiled(x)
    # inductor fuses and reorders float32 sums: equal up to rounding
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_training_step_equals_eager(compiled_pair):
    eager, copied, compiled = compiled_pair
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    target = torch.tensor([0, 3, 5, 9])
    grads = []
    for model, module in ((eager, eager), (compiled, copied)):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        grads.append((loss.detach(), {k: p.grad for k, p in module.named_parameters()}))
    (loss_e, grad_e), (loss_c, grad_c) = grads
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    assert grad_c.keys() == grad_e.keys()
    # equal up to float32 reordering: |compiled - eager| / |eager| <= 1e-2 per tensor (norms;
    # seen: up to 3e-5 absolute on a few elements of the stem's gradient, which gathers the
    # rounding of every layer above it through training-mode BatchNorm). A wrong gradient
    # is off by its own size.
    for name in grad_e:
        error = (grad_c[name] - grad_e[name]).norm() / grad_e[name].norm().clamp_min(1e-12)
        assert error <= 1e-2, (name, error.item())
    # BatchNorm statistics were updated the same way
    for (name, a), (_, b) in zip(eager.named_buffers(), copied.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
