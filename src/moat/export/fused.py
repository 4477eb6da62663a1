"""`optimize_for_inference`: a fused, eval-only copy of a MOAT model.

What changes (all exact up to float rounding; outputs stay within 1e-4 of the plain model):

* every BatchNorm is folded into a neighbouring convolution: the stem's `norm_0` into
  `conv_0`; in each block `pre_norm` *and* `expand_norm` into the 1x1 `expand_conv` (which
  gains a bias; the shortcut keeps reading the un-normalised input), `depthwise_norm` into
  `depthwise_conv`;
* drop path is gone, squeeze-excite runs as two small matrix products on the pooled vector;
* in eager CPU inference each convolution runs with its GELU or its residual add in one
  oneDNN call (the fusion torch.compile's CPU backend makes) on weights reordered for oneDNN
  once per input shape; on maps of 28x28 and more each MBConv block's expand + GELU +
  depthwise + GELU runs as one C++ kernel (`moat.kernels`, expand_depthwise.cpp) that keeps
  the expanded map in cache; where the allocator returns large blocks to the system, the
  high-resolution blocks run on parts of a large batch so that no intermediate outgrows its
  reuse (`CHUNK_BYTES`); compiled, exported and traced graphs use the plain operators (all
  in `moat.export.cpu_ops`);
* attention goes through `scaled_dot_product_attention` (the fused CPU kernel) with the
  relative position bias precomputed as a buffer for every window size known in advance:
  each window-attention stage, and the global-attention stages for `img_size`;
* weights and activations are channels-last where that is faster (measured on CPU): the
  LayerNorm and the global-attention token view then read the feature map in place.

The copy is still a `MoatNet`: `forward`, `forward_features`, `forward_endpoints`,
`features_only` work as before. It traces without graph breaks under `torch.compile`, and
exports with `torch.export`, TorchScript tracing and ONNX (see `moat.export`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moat.errors import InvalidInputError
from moat.export.cpu_ops import (ConvGelu, PackedConv2d, SamePaddingConv2d, batch_chunks,
                                 conv_add, current_cpu_choices, eager_cpu, expand_depthwise,
                                 linear_as_conv)
from moat.models.blocks import MBConvBlock, MBConvShortcut, MoatBlock, SqueezeExcite
from moat.models.layers import (Attention, Conv2dSame, _window_regions, relative_position_bias,
                                window_attention)
from moat.models.moat import MoatNet

__all__ = ["GELU_FORMS", "is_optimized", "optimize_for_inference"]


# --- BatchNorm folding ------------------------------------------------------------------

def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift, per channel (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _conv_with(conv: nn.Conv2d, weight: Tensor, bias: Tensor) -> nn.Conv2d:
    """A copy of `conv` (a Conv2dSame stays one) with a new weight and a bias."""
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return fused


def fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """bn(conv(x)) as one convolution (any groups, with or without a bias)."""
    scale, shift = _bn_affine(bn)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    return _conv_with(conv, weight, bias)


def fold_bn_around_1x1(before: nn.BatchNorm2d, conv: nn.Conv2d,
                       after: nn.BatchNorm2d) -> nn.Conv2d:
    """after(conv(before(x))) for a 1x1, ungrouped, bias-free convolution."""
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.bias is not None:
        raise InvalidInputError("fold_bn_around_1x1 needs a 1x1, ungrouped convolution without "
                                "bias")
    a1, b1 = _bn_affine(before)
    a2, b2 = _bn_affine(after)
    w = conv.weight.double()[:, :, 0, 0]                       # [out, in]
    weight = (a2[:, None] * w * a1[None, :])[:, :, None, None]
    bias = a2 * (w @ b1) + b2
    return _conv_with(conv, weight, bias)


def _without_input_padding(conv: nn.Conv2d) -> nn.Conv2d:
    """A Conv2dSame with input-dependent padding -> SamePaddingConv2d (same parameters)."""
    if not isinstance(conv, Conv2dSame) or conv.static_padding:
        return conv
    fused = SamePaddingConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              conv.stride, groups=conv.groups, bias=conv.bias is not None)
    fused.weight, fused.bias = conv.weight, conv.bias
    return fused


# --- fused modules -------------------------------------------------------------------------

class FusedSqueezeExcite(nn.Module):
    """The official SE (SiLU inside, sigmoid gate) on the pooled [B, C] vector."""

    def __init__(self, se: SqueezeExcite) -> None:
        super().__init__()
        self.reduce = nn.Linear(se.reduce.in_channels, se.reduce.out_channels)
        self.expand = nn.Linear(se.expand.in_channels, se.expand.out_channels)
        for linear, conv in ((self.reduce, se.reduce), (self.expand, se.expand)):
            linear.weight.data.copy_(conv.weight.detach()[:, :, 0, 0])
            linear.bias.data.copy_(conv.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(F.silu(self.reduce(x.mean((2, 3)))))
        return x * scale.sigmoid()[:, :, None, None]


class FusedMBConv(MBConvShortcut, nn.Module):
    """MBConvBlock with its three BatchNorms folded: 1x1 -> GELU -> 3x3 dw -> GELU -> [SE]
    -> 1x1, plus the (pooled, projected) shortcut of the un-normalised input."""

    def __init__(self, block: MBConvBlock, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate  # GELU: "none" (exact) or "tanh", as in F.gelu
        self.stride, self.pool_size = block.stride, block.pool_size
        self.shortcut_conv = PackedConv2d.of(copy.deepcopy(block.shortcut_conv))
        self.expand_conv = fold_bn_around_1x1(block.pre_norm, block.expand_conv,
                                              block.expand_norm)
        self.depthwise_conv = _without_input_padding(
            fold_bn_after(block.depthwise_conv, block.depthwise_norm))
        self.se = None if block.se is None else FusedSqueezeExcite(block.se)
        self.shrink_conv = copy.deepcopy(block.shrink_conv)

    def forward(self, x: Tensor) -> Tensor:
        chunks = batch_chunks(x, self.expand_conv.out_channels)
        if chunks > 1:
            return torch.cat([self.forward_mbconv(part) for part in x.chunk(chunks)])
        return self.forward_mbconv(x)

    def forward_mbconv(self, x: Tensor) -> Tensor:
        y = expand_depthwise(self.expand_conv, self.depthwise_conv, x, self.approximate)
        if self.se is not None:
            y = self.se(y)
        return conv_add(self.shrink_conv, y, self.shortcut(x))


class InferenceAttention(Attention):
    """Attention whose position bias is a buffer per window size known in advance.

    Other sizes (global attention at an input size not given to `optimize_for_inference`,
    or a dynamic-shape export) compute the bias from the table inside the forward pass.
    The buffers are [heads, T, T] (3-D, so `.to(memory_format=...)` leaves them alone).
    """

    def __init__(self, attention: Attention) -> None:
        table = attention.relative_position_embedding
        super().__init__(attention.qkv.in_features, attention.num_heads, attention.head_size,
                         None if table is None else (table.shape[-1] + 1) // 2)
        self.load_state_dict(attention.state_dict())
        self.to(attention.qkv.weight.device, attention.qkv.weight.dtype)
        self._precomputed: dict[tuple, str] = {}  # (window, crop) -> buffer name

    def project(self, linear: nn.Linear, x: Tensor) -> Tensor:
        if eager_cpu(x) and not current_cpu_choices().projections_as_conv:
            return linear(x)
        return linear_as_conv(linear, x)

    def precompute(self, window: tuple[int, int], crop: tuple[int, int] | None = None) -> None:
        table = self.relative_position_embedding
        if table is None:
            return
        crop = None if crop == window else crop
        name = "position_bias_{}x{}".format(*window)
        if crop is not None:
            name += "_crop_{}x{}".format(*crop)
        if name not in self._buffers:
            with torch.no_grad():
                bias = relative_position_bias(table.float(), *window, crop)
            self.register_buffer(name, bias.to(table.dtype).contiguous(), persistent=False)
            self._precomputed[(window, crop)] = name

    def attention_bias(self, window: tuple[int, int],
                       crop: tuple[int, int] | None = None) -> Tensor | None:
        table = self.relative_position_embedding
        if table is None:
            return None
        crop = None if crop == window else crop
        if self._precomputed:  # only static shapes reach a lookup: safe for dynamic export
            name = self._precomputed.get((window, crop))
            if name is not None:
                return getattr(self, name)[None]
            name = self._precomputed.get((window, None))
            if name is not None:  # a cut window: the top-left part of the window's bias
                (wh, ww), (ch, cw) = window, crop
                bias = getattr(self, name).view(-1, wh, ww, wh, ww)[:, :ch, :cw, :ch, :cw]
                return bias.reshape(1, -1, ch * cw, ch * cw)
        return super().attention_bias(window, crop)


class FusedMoatBlock(FusedMBConv):
    """MoatBlock with folded BatchNorms, then LayerNorm + window / global attention."""

    def __init__(self, block: MoatBlock, approximate: str = "none") -> None:
        super().__init__(block, approximate)
        self.window = block.window
        self.attention_norm = copy.deepcopy(block.attention_norm)
        self.attention = InferenceAttention(block.attention)
        if self.window is not None:
            self.attention.precompute(self.window)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        window = self.window or tuple(x.shape[-2:])
        y = self.attention_norm(x.permute(0, 2, 3, 1))
        return x + window_attention(self.attention, y, window).permute(0, 3, 1, 2)


# --- the public function -----------------------------------------------------------------

def _feature_sizes(model: MoatNet, img_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial size of the input of attention in every stage (TF SAME: ceil(n / stride))."""
    h, w = -(-img_size[0] // 2), -(-img_size[1] // 2)  # the stem
    sizes = []
    for stride in model.cfg.stage_stride:
        h, w = -(-h // stride), -(-w // stride)
        sizes.append((h, w))
    return sizes


def _precompute_for_size(model: MoatNet, img_size: tuple[int, int]) -> None:
    """Position biases of every window and window crop that `img_size` produces."""
    for stage, (h, w) in zip(model.stages, _feature_sizes(model, img_size)):
        for block in stage:
            if isinstance(block, FusedMoatBlock):
                window = block.window or (h, w)
                for _, _, ch in _window_regions(h, window[0]):
                    for _, _, cw in _window_regions(w, window[1]):
                        block.attention.precompute(window, (ch, cw))


def _default_channels_last(device: torch.device) -> bool:
    # CPU: `cpu_choices` for the instruction set found at run time. Not measured on CUDA
    # yet, so it stays opt-in there.
    return device.type == "cpu" and current_cpu_choices().channels_last


# The GELU forms `optimize_for_inference` offers -> F.gelu's `approximate` argument. "exact"
# (erf) is the model's own function and the default; "tanh" is GELU's tanh approximation, a
# deployment option: oneDNN and ONNX Runtime (FastGelu) run it about twice as fast as erf,
# and it moves the logits (see `moat.export.gelu` for the measured cost and its limit).
GELU_FORMS = {"exact": "none", "tanh": "tanh"}


def optimize_for_inference(model: nn.Module, *, channels_last: bool | None = None,
                           img_size: int | Sequence[int] | None = None,
                           gelu: str = "exact") -> MoatNet:
    """An optimised eval-mode copy of a MOAT model; the model itself is not changed.

    Args:
        model: a `MoatNet` (from `moat.create_model`), in any mode, on any device.
        channels_last: store weights channels-last so that activations follow; None picks
            what was measured faster on the model's device (CPU: channels-last; CUDA: not
            measured yet, so contiguous).
        img_size: input size (int or (H, W)) to precompute the global-attention position
            biases for. Window attention biases are always precomputed; other sizes work
            and compute their bias once per size (cached) in eager mode. Leave it None for
            exports with dynamic height and width.
        gelu: "exact" (default, the model's erf GELU) or "tanh" (GELU's tanh approximation:
            faster on CPU, not the same function; `moat.export.gelu.gelu_cost` measures what
            it changes, and `moat export onnx --gelu tanh` refuses it when top-1 moves by
            more than 0.1 points). Recorded as the copy's `gelu` attribute.

    Returns a `MoatNet` (requires_grad off, eval mode) whose outputs match the plain model
    in eval mode within 1e-4 (with gelu="exact"). It has no BatchNorm statistics and no
    drop path, so it always computes the eval-mode function: fine-tune the original model,
    not this copy.
    """
    if not isinstance(model, MoatNet):
        raise TypeError(f"optimize_for_inference takes a MoatNet (moat.create_model), got "
                        f"{type(model).__name__}")
    if is_optimized(model):
        raise InvalidInputError("this model is already optimised for inference")
    if gelu not in GELU_FORMS:
        raise InvalidInputError(f"gelu must be one of {list(GELU_FORMS)}, got {gelu!r}")
    approximate = GELU_FORMS[gelu]
    param = next(model.parameters())
    fused = copy.deepcopy(model).eval()
    stem = fused.stem
    stem.conv_0 = ConvGelu(_without_input_padding(fold_bn_after(stem.conv_0, stem.norm_0)),
                           approximate)
    stem.norm_0 = stem.act_0 = nn.Identity()
    for stage in fused.stages:
        for index, block in enumerate(stage):
            stage[index] = (FusedMoatBlock if isinstance(block, MoatBlock)
                            else FusedMBConv)(block, approximate)
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        _precompute_for_size(fused, size)
    fused.requires_grad_(False)
    fused.grad_checkpointing = False
    fused.optimized_for_inference = True
    fused.gelu = gelu
    if channels_last is None:
        channels_last = _default_channels_last(param.device)
    if channels_last:
        fused.to(memory_format=torch.channels_last)
    return fused


def is_optimized(model: nn.Module) -> bool:
    """True for a model returned by `optimize_for_inference`."""
    return bool(getattr(model, "optimized_for_inference", False))
