"""How the fused model (`moat.export.fused`) runs in eager CPU inference.

* the choices for the CPU found at run time (`cpu_choices`: channels-last, oneDNN fusion,
  batch chunking, attention projections), measured by benchmarks/cpu_choices.py;
* convolution + GELU and convolution + residual add as one oneDNN call (`conv_gelu`,
  `conv_add`), the fusion torch.compile's CPU backend makes;
* each convolution's weights reordered into oneDNN's blocked layout once per input shape
  rather than at every call (`_packed`);
* the expand convolution + GELU + depthwise convolution + GELU of an MBConv block as one
  C++ kernel (`expand_depthwise`, `moat.kernels`) on the high-resolution maps;
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
from moat.kernels import expand_depthwise_extension
from moat.models.layers import Conv2dSame, pointwise, same_padding, tensor_version

__all__ = ["CHUNK_BYTES", "EXPAND_DEPTHWISE_PIXELS", "ConvGelu", "CpuChoices", "PackedConv2d",
           "SamePaddingConv2d", "batch_chunks", "conv_add", "conv_gelu", "cpu_choices",
           "current_cpu_choices", "eager_cpu", "expand_depthwise", "linear_as_conv",
           "portable_ops", "using_cpu_choices"]


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
    expand_depthwise: bool = True  # the C++ kernel for MBConv fronts on large maps


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
    # Expand + depthwise kernel: see EXPAND_DEPTHWISE_PIXELS.
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
# (`_version`) or new weights (`data_ptr`) packs again. The same store (`_kept`) holds the
# expand + depthwise kernel's weights in the layouts it reads.
_KEPT: weakref.WeakKeyDictionary[nn.Module, dict[tuple, object]] = weakref.WeakKeyDictionary()
_KEPT_PER_MODULE = 4


def _packed(module: nn.Module, x: Tensor,
            weight_and_padding: Callable[[], tuple[Tensor, Sequence[int]]],
            stride: Sequence[int] = (1, 1), dilation: Sequence[int] = (1, 1),
            groups: int = 1) -> tuple[Tensor, Sequence[int]]:
    """The weight and padding `weight_and_padding()` gives (derived from `module.weight`),
    the weight reordered for oneDNN once per input shape; computed only when not kept."""
    if not current_cpu_choices().prepack_weights:
        return weight_and_padding()

    def pack() -> tuple[Tensor, Sequence[int]]:
        weight, padding = weight_and_padding()
        return torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach(), list(padding), list(stride), list(dilation), groups,
            list(x.shape)), padding
    return _kept(module, (tuple(x.shape), x.dtype), pack)


def _kept(module: nn.Module, key: tuple, make: Callable):
    """make(), kept beside `module` under `key` until its weight is replaced or changed."""
    key = (*key, module.weight.data_ptr(), tensor_version(module.weight))
    kept = _KEPT.setdefault(module, {})
    if key not in kept:
        if len(kept) >= _KEPT_PER_MODULE:
            kept.clear()
        kept[key] = make()
    return kept[key]


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


# --- expand + depthwise convolution as one kernel -----------------------------------------

# An MBConv block's expand convolution + GELU + depthwise convolution + GELU runs as one C++
# kernel (`moat.kernels`, expand_depthwise.cpp) when its input map has at least this many
# pixels. oneDNN's two calls write the 4x-expanded map to memory and read it back; the
# kernel makes it in bands of rows that stay in cache, with a faster GELU, but reads the
# expand weights again for every band. Measured block by block on MOAT-0 at 224 px, batch 8
# and 1, 2 threads, AVX-512 and AVX2 (README, "CPU instruction sets"): faster on every map of
# 28x28 and more (first block, batch 8: 54 -> 38 ms AVX-512, 75 -> 38 ms AVX2), level or
# slower on the 14x14 and 7x7 maps of the last stages (wide weights, maps that fit in cache).
EXPAND_DEPTHWISE_PIXELS = 28 * 28


def _band(batch: int, out_height: int) -> int:
    """Output rows per band: 8 (2 to 16 measured within 5% of each other at batch 8), fewer
    when the batch would have too few bands to share out between the threads."""
    band = 8
    while band > 1 and batch * -(-out_height // band) < 4 * torch.get_num_threads():
        band //= 2
    return band


def _kernel_runs(expand: nn.Conv2d, depthwise: nn.Conv2d, x: Tensor) -> bool:
    return (current_cpu_choices().expand_depthwise and eager_cpu(x)
            and x.dtype == expand.weight.dtype == depthwise.weight.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[2] * x.shape[3] >= EXPAND_DEPTHWISE_PIXELS
            and expand.kernel_size == (1, 1) and expand.groups == 1 and expand.bias is not None
            and isinstance(depthwise, (SamePaddingConv2d, Conv2dSame))
            and depthwise.groups == depthwise.in_channels == expand.out_channels
            and depthwise.out_channels == expand.out_channels and depthwise.bias is not None
            and depthwise.kernel_size[0] == depthwise.kernel_size[1]
            and depthwise.stride[0] == depthwise.stride[1] and depthwise.dilation == (1, 1)
            and expand_depthwise_extension() is not None)


def expand_depthwise(expand: nn.Conv2d, depthwise: nn.Conv2d, x: Tensor,
                     approximate: str = "none") -> Tensor:
    """gelu(depthwise(gelu(expand(x)))): the front of a folded MBConv block (`expand` a 1x1
    convolution with bias, `depthwise` TF 'SAME'-padded with bias); `approximate` as in
    F.gelu. The C++ kernel where `_kernel_runs`, oneDNN's two fused calls otherwise."""
    if not _kernel_runs(expand, depthwise, x):
        return conv_gelu(depthwise, conv_gelu(expand, x, approximate), approximate)
    k, s = depthwise.kernel_size[0], depthwise.stride[0]
    top, left = (same_padding(n, k, s)[0] for n in x.shape[-2:])
    out_h, out_w = (-(-n // s) for n in x.shape[-2:])  # TF 'SAME': ceil(n / s)
    expand_weight = _kept(expand, ("expand_depthwise",),
                          lambda: expand.weight.detach()[:, :, 0, 0].t().contiguous())
    dw_weight = _kept(depthwise, ("expand_depthwise",),
                      lambda: depthwise.weight.detach()[:, 0].permute(1, 2, 0).contiguous())
    return expand_depthwise_extension().forward(
        x, expand_weight, expand.bias.detach(), dw_weight, depthwise.bias.detach(), s, top,
        left, out_h, out_w, _band(x.shape[0], out_h), approximate == "tanh")


class ConvGelu(nn.Sequential):
    """The stem's folded conv_0 followed by GELU, as one call (see `conv_gelu`)."""

    def __init__(self, conv: nn.Conv2d, approximate: str = "none") -> None:
        super().__init__(conv)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return conv_gelu(self[0], x, self.approximate)
