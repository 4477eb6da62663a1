"""The C++ kernels against the PyTorch ops they replace: BatchNorm+GELU in training, the
MBConv front (expand + depthwise) in inference."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moat.kernels
from moat.kernels import batch_norm_gelu, extension
from moat.models.blocks import MBConvBlock
from moat.models.config import MODEL_CONFIGS

pytestmark = pytest.mark.slow  # compiles the C++ kernel on first use

CL = torch.channels_last


def test_the_kernel_builds_here():
    # CI has a compiler: the fused path must really run there, not silently fall back.
    assert extension() is not None


def test_a_build_lock_left_by_a_killed_build_does_not_block(tmp_path):
    # PyTorch's plain `lock` file, as a compile killed half-way leaves it: without our own
    # flock every later process would wait for it forever. The build is copied to a folder
    # of this test's own (times kept, so nothing is rebuilt): another test process loading
    # the kernel at the same moment would otherwise remove the leftover first.
    import os
    import shutil
    import subprocess
    import sys

    import torch.utils.cpp_extension as cpp_extension

    assert extension() is not None
    name = moat.kernels.build_name("batch_norm_gelu")
    build = Path(cpp_extension._get_build_directory(name, verbose=False))
    own = tmp_path / "extensions"
    shutil.copytree(build, own / name, ignore=shutil.ignore_patterns("lock", "*.flock"))
    leftover = own / name / "lock"
    leftover.touch()
    code = "import moat.kernels as k; assert k.extension() is not None"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(own)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left behind by an interrupted build" in result.stderr
    assert not leftover.exists()


def _pair(channels: int, seed: int = 0) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    return norm, copy.deepcopy(norm)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("shape,offset,pad", [
    ((4, 64, 12, 10), 0.0, (0, 0, 0, 0)),
    ((2, 19, 7, 5), 0.0, (0, 1, 0, 1)),      # channels not a multiple of the vector width
    ((3, 48, 9, 9), 50.0, (1, 1, 1, 1)),     # |mean| >> std: the variance must stay exact
    ((2, 32, 6, 8), -3.0, (0, 0, 2, 1)),
])
def test_matches_unfused_ops(shape, offset, pad):
    fused, plain = _pair(shape[1])
    x = (torch.randn(shape) * 0.7 + offset).contiguous(memory_format=CL).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()

    y = batch_norm_gelu(fused, x, pad)
    y_plain = F.pad(F.gelu(plain(x_plain)), pad)
    assert y.shape == y_plain.shape and y.is_contiguous(memory_format=CL)
    assert _close(y, y_plain)

    grad = torch.randn_like(y_plain)
    y.backward(grad)
    y_plain.backward(grad)
    assert _close(x.grad, x_plain.grad)
    assert _close(fused.weight.grad, plain.weight.grad)
    assert _close(fused.bias.grad, plain.bias.grad)
    assert _close(fused.running_mean, plain.running_mean)
    assert _close(fused.running_var, plain.running_var)
    assert fused.num_batches_tracked.item() == plain.num_batches_tracked.item() == 1


def test_gradient_of_a_padded_view_needs_no_copy_and_is_right():
    # The depthwise convolution hands back the gradient of a padded tensor: a strided view.
    fused, plain = _pair(16)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL)
    (batch_norm_gelu(fused, x, (0, 1, 0, 1)) * grad).sum().backward()
    (F.pad(F.gelu(plain(x_plain)), (0, 1, 0, 1)) * grad).sum().backward()
    assert _close(x.grad, x_plain.grad)


@pytest.mark.parametrize("case", ["eval", "nchw", "bfloat16", "subclass"])
def test_falls_back_where_it_does_not_apply(case, monkeypatch):
    def fail(*args):
        raise AssertionError("the fused kernel must not run here")
    monkeypatch.setattr(moat.kernels._BatchNormGELU, "apply", fail)
    norm, _ = _pair(8)
    x = torch.randn(2, 8, 5, 5)
    if case == "eval":
        norm.eval()
        x = x.contiguous(memory_format=CL)
    elif case == "bfloat16":
        norm, x = norm.bfloat16(), x.bfloat16().contiguous(memory_format=CL)
    elif case == "subclass":  # e.g. SyncBatchNorm: statistics across processes
        norm = type("OtherNorm", (nn.BatchNorm2d,), {})(8)
        x = x.contiguous(memory_format=CL)
    expected = F.gelu(copy.deepcopy(norm)(x))
    assert torch.allclose(batch_norm_gelu(norm, x), expected)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("MOAT_FUSED_KERNELS", "0")
    extension.cache_clear()
    try:
        assert extension() is None
    finally:
        monkeypatch.delenv("MOAT_FUSED_KERNELS")
        extension.cache_clear()
    assert extension() is not None


def test_without_a_compiler_it_warns_and_falls_back(monkeypatch, tmp_path):
    class NoCompiler:
        @staticmethod
        def _get_build_directory(name, verbose):
            return str(tmp_path)

        @staticmethod
        def load(**kwargs):
            raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(moat.kernels, "_import_cpp_extension", lambda: NoCompiler)
    extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Ninja is required.*unfused PyTorch ops"):
            assert extension() is None
        norm, plain = _pair(8)
        x = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
        assert torch.allclose(batch_norm_gelu(norm, x), F.gelu(plain(x)))
    finally:
        monkeypatch.undo()
        extension.cache_clear()
    assert extension() is not None


def test_mbconv_training_step_same_with_and_without_the_kernel(monkeypatch):
    torch.manual_seed(0)
    fused = MBConvBlock(16, 32, 2, MODEL_CONFIGS["tiny_moat_0"]).train()
    plain = copy.deepcopy(fused)
    x = torch.randn(2, 16, 14, 14).contiguous(memory_format=CL)
    fused(x).square().sum().backward()
    monkeypatch.setattr(moat.kernels, "extension", lambda: None)
    plain(x).square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        # atol: some gradients are zero up to rounding (a shift before a BatchNorm cancels)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    for b, c in zip(fused.buffers(), plain.buffers()):
        assert torch.allclose(b.float(), c.float(), rtol=1e-4, atol=1e-6)


# --- the expand + depthwise inference kernel ----------------------------------------------

def _front_reference(x, expand_w, expand_b, dw_w, dw_b, stride, approximate):
    """gelu(depthwise(gelu(expand(x)))) in plain PyTorch ops, TF 'SAME' padding."""
    from moat.models.layers import same_padding

    y = F.gelu(F.conv2d(x, expand_w, expand_b), approximate=approximate)
    k = dw_w.shape[-1]
    (top, bottom), (left, right) = (same_padding(n, k, stride) for n in y.shape[-2:])
    y = F.conv2d(F.pad(y, (left, right, top, bottom)), dw_w, dw_b, stride, groups=y.shape[1])
    return F.gelu(y, approximate=approximate)


@pytest.mark.parametrize("shape,mid,stride,band,approximate", [
    ((2, 16, 24, 24), 64, 2, 3, "none"),     # even size: SAME pads only bottom/right
    ((1, 8, 13, 11), 40, 2, 2, "none"),      # odd sizes: one row/column on each side
    ((2, 16, 17, 20), 20, 1, 4, "tanh"),     # stride 1; channels not a multiple of 8 or 16
    ((3, 8, 9, 9), 32, 1, 1, "none"),        # one row per band: every band keeps rows
    ((1, 8, 10, 10), 32, 2, 16, "tanh"),     # one band larger than the image
])
def test_expand_depthwise_kernel_matches_the_plain_ops(shape, mid, stride, band, approximate):
    from moat.models.layers import same_padding

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    expand_w = torch.randn(mid, shape[1], 1, 1, generator=g) / shape[1] ** 0.5
    expand_b, dw_b = torch.randn(mid, generator=g), torch.randn(mid, generator=g)
    dw_w = torch.randn(mid, 1, 3, 3, generator=g) / 3
    top, left = (same_padding(n, 3, stride)[0] for n in shape[-2:])
    out_h, out_w = (-(-n // stride) for n in shape[-2:])
    got = moat.kernels.expand_depthwise_extension().forward(
        x, expand_w[:, :, 0, 0].t().contiguous(), expand_b,
        dw_w[:, 0].permute(1, 2, 0).contiguous(), dw_b, stride, top, left, out_h, out_w, band,
        approximate == "tanh")
    expected = _front_reference(x, expand_w, expand_b, dw_w, dw_b, stride, approximate)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_optimized_model_runs_the_kernel_with_the_same_outputs(monkeypatch):
    # Every MBConv front through the kernel (threshold 0), against the plain model; then an
    # in-place change of a weight must reach the kernel's kept copy of it.
    from moat.export import cpu_ops

    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    calls = []
    extension = moat.kernels.expand_depthwise_extension()

    class Counting:
        @staticmethod
        def forward(*args):
            calls.append(args[0].shape)
            return extension.forward(*args)
    monkeypatch.setattr(cpu_ops, "EXPAND_DEPTHWISE_PIXELS", 0)
    monkeypatch.setattr(cpu_ops, "expand_depthwise_extension", lambda: Counting)
    with torch.no_grad():
        expected = model(x)
        fused = moat.optimize_for_inference(model)
        torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=0)
        assert len(calls) == sum(len(stage) for stage in fused.stages)  # every block
        block = fused.stages[0][0]
        h = fused.stem(x)
        before = block(h)
        block.expand_conv.weight.mul_(-1.0)
        block.depthwise_conv.weight.mul_(2.0)
        got = block(h)
        off = dataclasses.replace(cpu_ops.current_cpu_choices(), expand_depthwise=False)
        with cpu_ops.using_cpu_choices(off):
            unfused = block(h)
        error = (got - unfused).abs().max()
        assert error < 1e-5 and (got - before).abs().max() > 100 * error  # not the old copy
        # Below the threshold, or on NCHW activations, oneDNN's two calls run instead.
        monkeypatch.setattr(cpu_ops, "EXPAND_DEPTHWISE_PIXELS", 2**40)
        calls.clear()
        fused(x)
        monkeypatch.setattr(cpu_ops, "EXPAND_DEPTHWISE_PIXELS", 0)
        nchw = cpu_ops.expand_depthwise(block.expand_conv, block.depthwise_conv, h.contiguous())
        assert calls == []
        kernel = cpu_ops.expand_depthwise(block.expand_conv, block.depthwise_conv, h)
        assert len(calls) == 1
        torch.testing.assert_close(kernel, nchw, atol=1e-5, rtol=0)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_expand_depthwise_gelu_over_a_wide_range(approximate):
    # Identity expand and a centre-tap depthwise: the kernel computes gelu(gelu(x)), so its
    # GELU (a rational erf for the exact form) is checked on every input from -12 to 12.
    channels = 16
    x = torch.linspace(-12, 12, 2 * channels * 25 * 25).reshape(2, channels, 25, 25)
    x = x.contiguous(memory_format=CL)
    dw_w = torch.zeros(3, 3, channels)
    dw_w[1, 1] = 1.0
    zeros = torch.zeros(channels)
    got = moat.kernels.expand_depthwise_extension().forward(
        x, torch.eye(channels), zeros, dw_w, zeros, 1, 1, 1, 25, 25, 4, approximate == "tanh")
    expected = F.gelu(F.gelu(x.double(), approximate=approximate), approximate=approximate)
    torch.testing.assert_close(got.double(), expected, atol=3e-6, rtol=1e-6)


def test_the_rational_gelu_coefficients_are_the_fit():
    # benchmarks/gelu_fit.py owns the coefficients in gelu.h: refitting gives the same ones.
    import importlib.util
    import re

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gelu_fit", root / "benchmarks/gelu_fit.py")
    gelu_fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gelu_fit)
    p, q = gelu_fit.fit(*gelu_fit.DEGREES)
    header = (root / "src/moat/kernels/gelu.h").read_text()
    body = header[header.index("inline Vec gelu_rational"):header.index("inline Vec gelu_tanh")]
    numbers = [float(n) for n in re.findall(r"Vec\(([-0-9.e]+)f\)", body)]
    assert numbers[:2] == [-gelu_fit.CLAMP, gelu_fit.CLAMP]
    # Horner order, highest degree first; Q's constant 1 is written as Vec(1.f).
    written_p, written_q = numbers[2:2 + len(p)], numbers[2 + len(p):2 + len(p) + len(q) - 1]
    np.testing.assert_allclose(written_p, p[::-1], rtol=1e-6)
    np.testing.assert_allclose(written_q + [1.0], q[::-1], rtol=1e-6)
