"""How the fused model (`moat.export.fused`) runs in eager CPU inference.

* the choices for the CPU found at run time (`cpu_choices`: channels-last, oneDNN fusion,
  batch chunking, attention projections), measured by benchmarks/cpu_choices.py;
* convolution + GELU and convolution + residual add as one oneDNN call (`conv_gelu`,
  `conv_add`), the fusion torch.compile's CPU backend makes;
* each convolution's weights reordered into oneDNN's blocked layout once per input shape
  rather than at every call (`_packed`);
* large batches split so that no block intermediate outgrows the allocator's reuse
  (`CHUNK_BYTES`, `batch_chunks`);
* `SamePaddingConv2d`, TF 'SAME' padding without a padded copy of the input.

Compiled, exported and traced graphs, and code inside `portable_ops()`, get the standard
operators instead (`eager_cpu` decides).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moat.allocator import freed_memory_kept
from moat.cpu import cpu_info
from moat.models.layers import pointwise, same_padding

__all__ = ["CHUNK_BYTES", "ConvGelu", "CpuChoices", "SamePaddingConv2d", "batch_chunks",
           "conv_add", "conv_gelu", "cpu_choices", "current_cpu_choices", "eager_cpu",
           "PackedConv2d", "linear_as_conv", "portable_ops", "using_cpu_choices"]


# --- convolution + GELU / + residual in one oneDNN call ----------------------------------

def _onednn_op():
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


# oneDNN's fused convolution (what torch.compile's CPU backend emits for conv + GELU and
# conv + add). Used only in eager CPU inference; compiled, exported and traced graphs get
# the plain aten ops, which run everywhere.
_ONEDNN_CONV = _onednn_op()


_PORTABLE = threading.local()


@contextlib.contextmanager
def portable_ops():
    """Within this block the fused model calls only standard operators (and modules)."""
    before = getattr(_PORTABLE, "on", False)
    _PORTABLE.on = True
    try:
        yield
    finally:
        _PORTABLE.on = before


# --- choices made for the CPU found at run time -------------------------------------------

@dataclass(frozen=True)
class CpuChoices:
    """How the fused model runs in eager CPU inference (see `cpu_choices` for the rule)."""

    channels_last: bool  # weights (and so activations) channels-last by default
    onednn_fusion: bool  # convolution + GELU / + residual add as one oneDNN call
    chunk_batches: bool  # split large batches so block intermediates fit CHUNK_BYTES
    projections_as_conv: bool = True  # attention projections as oneDNN 1x1 convs, else Linear
    prepack_weights: bool = True  # oneDNN's blocked weights kept per input shape (needs fusion)


def cpu_choices(isa: str) -> CpuChoices:
    """The one rule: what eager CPU inference uses for an instruction-set level (`moat.cpu`:
    "avx512", "avx2", "default"), measured with benchmarks/cpu_choices.py on MOAT-0,
    batch 8, 224 px, 2 threads (README, "CPU instruction sets")."""
    # Channels-last: oneDNN's convolutions run blocked-channel kernels either way, and the
    # LayerNorm and global-attention token views read a channels-last map in place (NCHW
    # needs a transpose copy before and after each attention).
    # oneDNN fusion: GELU applied in the convolution's output loop saves one pass over the
    # widest (4x expanded) tensors, twice a block.
    # Chunking: see CHUNK_BYTES (allocator page faults, not the instruction set).
    # Attention projections: oneDNN's 1x1 convolution and nn.Linear (MKL) were within the
    # noise of each other on AVX2 and AVX-512 alike (whole model, and MOAT-0's q/k/v and
    # output shapes alone): convolution, as before.
    # Measured on an AVX-512 EPYC, AVX2 emulated (ATen, oneDNN and MKL limited): channels-last
    # won on both (x1.09 / x1.16), fusion on AVX-512 (x1.09) and tied on AVX2; nothing won on
    # one instruction set and lost on the other, so the rule does not depend on `isa` today.
    # It is the one place to change when a real AVX2 machine measures otherwise.
    del isa
    return CpuChoices(channels_last=True, onednn_fusion=True, chunk_batches=True,
                      projections_as_conv=True)


_CHOICES: list[CpuChoices] = []  # the process's choices, made on first use


def current_cpu_choices() -> CpuChoices:
    """`cpu_choices` for this process's CPU (`moat.cpu.cpu_info().isa`; an AVX-512 machine
    limited by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS counts as
    the limited one)."""
    if not _CHOICES:
        _CHOICES.append(cpu_choices(cpu_info().isa))
    return _CHOICES[0]


@contextlib.contextmanager
def using_cpu_choices(choices: CpuChoices):
    """Within this block eager CPU inference follows `choices` (for measuring the rule)."""
    saved = list(_CHOICES)
    _CHOICES[:] = [choices]
    try:
        yield
    finally:
        _CHOICES[:] = saved


def eager_cpu(x: Tensor) -> bool:
    """Eager CPU inference, where the choices above apply."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # graphs get the standard operators (compile fuses them itself)
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not x.requires_grad and not getattr(_PORTABLE, "on", False)
            and not torch.is_autocast_enabled("cpu"))  # autocast casts only aten ops


def _eager_onednn(x: Tensor) -> bool:
    return (_ONEDNN_CONV is not None and eager_cpu(x) and current_cpu_choices().onednn_fusion
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


# The largest intermediate of an eager CPU block is kept below this size by running the block
# on parts of the batch. glibc serves larger allocations with a fresh mmap (never above 32 MiB,
# its largest mmap threshold) and returns them on free, so every call page-faults them in
# again: for MOAT-0 at 224 x 224, batch 8, that was ~100k page faults and ~15% of the time.
# Below the threshold the memory is reused. Results are identical (no op mixes samples).
# A process that keeps freed memory (`moat.allocator`: the moat command, the benchmarks)
# reuses large blocks too, and there the whole batch is faster (MOAT-0, batch 8: 587 against
# 604 ms; with glibc's defaults chunking wins, 644 against 767 ms; benchmarks/cpu_choices.py).
CHUNK_BYTES = 24 * 2**20


def batch_chunks(x: Tensor, widest_channels: int) -> int:
    """Parts to split the batch into so that [part, widest_channels, H, W] fits CHUNK_BYTES
    (where `cpu_choices` chunks batches and the allocator returns large blocks)."""
    if (x.shape[0] == 1 or not current_cpu_choices().chunk_batches or freed_memory_kept()
            or not eager_cpu(x)):
        return 1
    per_sample = widest_channels * x.shape[-2] * x.shape[-1] * x.element_size()
    per_part = max(1, CHUNK_BYTES // per_sample)
    return -(-x.shape[0] // per_part)


class SamePaddingConv2d(nn.Conv2d):
    """Conv2dSame without the padded copy of its input.

    TF 'SAME' pads one more row/column at the bottom/right than at the top/left when the
    total is odd. Instead of copying the input into a padded tensor, the kernel gets a
    leading row/column of zeros and the convolution pads symmetrically: the same products
    (plus a few with zero weights), and several times faster for the strided depthwise
    convolutions in channels-last. Inference only: the extra taps would be counted as work
    by FLOP counters, and oneDNN's NCHW backward of the larger kernel is slow.
    """

    def weight_and_padding(self, height: int, width: int) -> tuple[Tensor, tuple[int, int]]:
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = same_padding(height, k, s)
        left, right = same_padding(width, k, s)
        return F.pad(self.weight, (right - left, 0, bottom - top, 0)), (bottom, right)

    def forward(self, x: Tensor) -> Tensor:
        weight, padding = self.weight_and_padding(x.shape[-2], x.shape[-1])
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _weight_and_padding(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Sequence[int]]:
    if isinstance(conv, SamePaddingConv2d):
        return conv.weight_and_padding(x.shape[-2], x.shape[-1])
    return conv.weight, conv.padding


# Each oneDNN convolution call reorders its weights into the blocked layout its kernel reads
# (about 80 reorders a MOAT-0 pass; 17% of a single-threaded batch-1 pass, 3% at batch 8).
# The layout depends on the input shape, so the reordered weights are kept per convolution
# and input shape, beside the module rather than in it (a module holding oneDNN's opaque
# tensors could not be copied, saved or exported). A few shapes per convolution: inference
# sees one or two (the batch and its last chunk); an in-place change of the weights
# (`_version`) or new weights (`data_ptr`) packs again.
_PACKED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[Tensor, Sequence[int]]]] = (
    weakref.WeakKeyDictionary())
_PACKED_SHAPES = 4


def _packed(module: nn.Module, x: Tensor,
            weight_and_padding: Callable[[], tuple[Tensor, Sequence[int]]],
            stride: Sequence[int] = (1, 1), dilation: Sequence[int] = (1, 1),
            groups: int = 1) -> tuple[Tensor, Sequence[int]]:
    """The weight and padding `weight_and_padding()` gives (derived from `module.weight`),
    the weight reordered for oneDNN once per input shape; computed only when not kept."""
    if not current_cpu_choices().prepack_weights:
        return weight_and_padding()
    key = (tuple(x.shape), x.dtype, module.weight.data_ptr(), module.weight._version)
    packed = _PACKED.setdefault(module, {})
    if key not in packed:
        if len(packed) >= _PACKED_SHAPES:
            packed.clear()
        weight, padding = weight_and_padding()
        packed[key] = (torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach(), list(padding), list(stride), list(dilation), groups,
            list(x.shape)), padding)
    return packed[key]


def _conv_weight(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Sequence[int]]:
    return _packed(conv, x, lambda: _weight_and_padding(conv, x), conv.stride, conv.dilation,
                   conv.groups)


def _onednn_conv(conv: nn.Conv2d, x: Tensor, attr: str, approximate: str | None) -> Tensor:
    weight, padding = _conv_weight(conv, x)
    return _ONEDNN_CONV(x, weight, conv.bias, padding, conv.stride, conv.dilation,
                        conv.groups, attr, [], approximate)


def conv_gelu(conv: nn.Conv2d, x: Tensor, approximate: str = "none") -> Tensor:
    """gelu(conv(x)); `approximate` as in F.gelu ("none": exact erf form, "tanh")."""
    if _eager_onednn(x):
        return _onednn_conv(conv, x, "gelu", approximate)
    return F.gelu(conv(x), approximate=approximate)


def conv_add(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> Tensor:
    """residual + conv(x)."""
    if _eager_onednn(x) and residual.shape[1] == conv.out_channels:
        weight, padding = _conv_weight(conv, x)
        return _ONEDNN_CONV.binary(x, residual, weight, conv.bias, padding, conv.stride,
                                   conv.dilation, conv.groups, "add", None, None, [], None)
    return residual + conv(x)


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d whose eager CPU inference packs its weights once (`_packed`)."""

    @classmethod
    def of(cls, conv: nn.Conv2d | None) -> PackedConv2d | None:
        """A copy of `conv` (same parameters) that packs its weights; None stays None."""
        if conv is None:
            return None
        packed = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None)
        packed.weight, packed.bias = conv.weight, conv.bias
        return packed

    def forward(self, x: Tensor) -> Tensor:
        if _eager_onednn(x):
            return _onednn_conv(self, x, "none", None)
        return super().forward(x)


def linear_as_conv(linear: nn.Linear, x: Tensor) -> Tensor:
    """`moat.models.layers.pointwise` (linear(x) on [..., T, C] tokens as a channels-last
    1x1 convolution), with the weights packed once (`_packed`)."""
    if not _eager_onednn(x):
        return pointwise(linear, x)
    *lead, tokens, channels = x.shape
    x = x.reshape(-1, tokens, 1, channels).permute(0, 3, 1, 2)
    weight, _ = _packed(linear, x, lambda: (linear.weight[:, :, None, None], (0, 0)))
    y = _ONEDNN_CONV(x, weight, linear.bias, [0, 0], [1, 1], [1, 1], 1, "none", [], None)
    return y.permute(0, 2, 3, 1).reshape(*lead, tokens, linear.out_features)


class ConvGelu(nn.Sequential):
    """The stem's folded conv_0 followed by GELU, as one call (see `conv_gelu`)."""

    def __init__(self, conv: nn.Conv2d, approximate: str = "none") -> None:
        super().__init__(conv)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return conv_gelu(self[0], x, self.approximate)
