"""Building blocks that reproduce TensorFlow's behaviour exactly.

Names say which TF semantics they reproduce: `same_padding`, `avg_pool_same_exclude_pad`,
`relative_position_bias(table, h, w)`. Everything here reads shapes at call time, so any
input size works.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

from moat.errors import InvalidInputError

# The attention kernel, the one speed switch of `Attention` (`set_attention_kernel`):
#   "sdpa": scaled_dot_product_attention with the position bias as an additive mask (default;
#           on the CPU with a bias that needs a gradient: three plain ops, see `forward`);
#   "flex": FlexAttention, the bias added by a score modification inside the kernel, so the
#           [heads, T, T] bias is read, never broadcast to a [B*windows, heads, T, T] mask.
#           For GPUs (compiled on first use, Triton kernels), where benchmarks/gpu.py
#           compares it with sdpa; equal to sdpa up to rounding. On the CPU FlexAttention
#           has no backward: there it runs its unfused reference, without gradients only
#           (tests), and training steps keep the sdpa path.
ATTENTION_KERNELS = ("sdpa", "flex")
_attention = {"kernel": "sdpa"}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one axis: output = ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d with TF 'SAME' padding, which is asymmetric for stride 2 on even sizes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, groups: int = 1, bias: bool = True) -> None:
        # Stride 1 with an odd kernel pads symmetrically: let the convolution do it.
        self.static_padding = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=kernel_size // 2 if self.static_padding else 0,
                         groups=groups, bias=bias)

    def pad_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The F.pad (left, right, top, bottom) this convolution needs; zeros when it pads
        by itself."""
        if self.static_padding:
            return (0, 0, 0, 0)
        k, s = self.kernel_size[0], self.stride[0]
        return (*same_padding(width, k, s), *same_padding(height, k, s))

    def forward(self, x: Tensor, padded: bool = False) -> Tensor:
        """`padded`: x already carries `pad_for` of its unpadded size."""
        if not padded and any(pad := self.pad_for(*x.shape[-2:])):
            x = F.pad(x, pad)
        return super().forward(x)


def tensor_version(t: Tensor) -> int:
    """t's in-place change counter, for caches of values derived from it; 0 for an inference
    tensor (made under torch.inference_mode, it has none)."""
    return 0 if t.is_inference() else t._version


def avg_pool_same_exclude_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TF AveragePooling2D(padding='same'): padded positions are excluded from the mean."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top == bottom == left == right == 0:
        return F.avg_pool2d(x, kernel, stride)
    # SAME pads (p, p) or (p, p + 1): pad p on both sides, and ceil_mode adds the last,
    # partial window (it changes nothing on an axis padded symmetrically); both divide by
    # the number of valid elements. No padded copy of x.
    return F.avg_pool2d(x, kernel, stride, padding=(top, left), ceil_mode=True,
                        count_include_pad=False)


class DropPath(nn.Module):
    """Per-sample stochastic depth, official form: y / p * floor(p + U[0, 1))."""

    def __init__(self, keep_prob: float = 1.0) -> None:
        super().__init__()
        self.keep_prob = keep_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.keep_prob >= 1.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.floor(self.keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device))
        return x * (mask / self.keep_prob)  # one pass over x (the official x / p * mask)

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:.4f}"


@functools.lru_cache(maxsize=64)
def _relative_index(h: int, w: int, device: torch.device,
                    crop: tuple[int, int] | None = None) -> Tensor:
    """Index into the flattened (2h-1)x(2w-1) table for every (query, key) pair.

    bias[i*w + j, x*w + y] = table[(x - i) + h - 1, (y - j) + w - 1]: key minus query,
    the official convention (the opposite of Swin's). `crop` (ch, cw) keeps only the
    tokens of the top-left ch x cw part of the h x w window.
    """
    ch, cw = crop or (h, w)
    # A normal tensor even when first called under inference_mode: the cached index is
    # reused by training steps, which cannot save inference tensors for backward.
    with torch.inference_mode(False):
        rows = torch.arange(ch, device=device)
        cols = torch.arange(cw, device=device)
        dy = rows[None, :] - rows[:, None] + h - 1  # [query row i, key row x]
        dx = cols[None, :] - cols[:, None] + w - 1  # [query col j, key col y]
        index = dy[:, None, :, None] * (2 * w - 1) + dx[None, :, None, :]
        return index.reshape(ch * cw, ch * cw)


def relative_position_bias(table: Tensor, h: int, w: int,
                           crop: tuple[int, int] | None = None) -> Tensor:
    """[heads, 2P-1, 2P-1] learned table -> [heads, h*w, h*w] attention bias.

    The table is always resized bilinearly (TF2 half-pixel centres, no antialias) to
    (2h-1, 2w-1), then gathered with the key-minus-query index. With `crop` (ch, cw) the
    bias covers only the top-left ch x cw tokens of the h x w window: [heads, ch*cw, ch*cw].
    """
    resized = F.interpolate(table[:, None], size=(2 * h - 1, 2 * w - 1), mode="bilinear",
                            align_corners=False)[:, 0]
    # Traced with symbolic sizes (export with dynamic height/width) there is nothing to cache.
    index = _relative_index.__wrapped__ if torch.compiler.is_compiling() else _relative_index
    return resized.flatten(1)[:, index(h, w, table.device, crop)]


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """[B, H, W, C] -> [B, windows, wh*ww, C], zero-padding H and W up to multiples.

    Window order is (row, column) as in the official `_make_windows`. One window covering
    the whole map is a view, not a copy.
    """
    batch, height, width, channels = x.shape
    wh, ww = window
    if (wh, ww) == (height, width):
        return x.reshape(batch, 1, height * width, channels)
    pad_h, pad_w = -height % wh, -width % ww
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // wh, (width + pad_w) // ww
    x = x.view(batch, rows, wh, cols, ww, channels).transpose(2, 3)
    return x.reshape(batch, rows * cols, wh * ww, channels)


def window_reverse(windows: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """Inverse of `window_partition`, cropping the padding: -> [B, H, W, C]."""
    batch, _, _, channels = windows.shape
    wh, ww = window
    if (wh, ww) == (height, width):
        return windows.reshape(batch, height, width, channels)
    rows, cols = -(-height // wh), -(-width // ww)
    x = windows.view(batch, rows, cols, wh, ww, channels).transpose(2, 3)
    x = x.reshape(batch, rows * wh, cols * ww, channels)
    return x[:, :height, :width] if rows * wh != height or cols * ww != width else x


def _window_regions(size: int, window: int) -> list[tuple[int, int, int]]:
    """(start, stop, window) along one axis: the part the window divides, then the rest."""
    whole = size - size % window
    regions = [(0, whole, window)] if whole else []
    if whole < size:
        regions.append((whole, size, size - whole))
    return regions


def window_attention(attention: "Attention", x: Tensor, window: tuple[int, int]) -> Tensor:
    """Self-attention within (wh, ww) windows of x [B, H, W, C] -> [B, H, W, C].

    A window (wh, ww) equal to (H, W) is global attention. Where the windows do not divide
    the map, the last row / column of windows is cut to the map and attends with the
    matching top-left part of the window's position bias. That is exactly the padded window
    with the padded keys masked (and the padded queries dropped), without computing or
    storing the padding: the bias stays [heads, T, T] per window size, whatever the map.
    """
    _, height, width, _ = x.shape
    rows, cols = _window_regions(height, window[0]), _window_regions(width, window[1])
    out_rows = []
    for top, bottom, wh in rows:
        out_cols = []
        for left, right, ww in cols:
            part = x if len(rows) == len(cols) == 1 else x[:, top:bottom, left:right]
            bias = attention.attention_bias(window, (wh, ww))
            y = attention(window_partition(part, (wh, ww)), bias)
            out_cols.append(window_reverse(y, (wh, ww), bottom - top, right - left))
        out_rows.append(out_cols[0] if len(out_cols) == 1 else torch.cat(out_cols, dim=2))
    return out_rows[0] if len(out_rows) == 1 else torch.cat(out_rows, dim=1)


def pointwise(linear: nn.Linear, x: Tensor) -> Tensor:
    """linear(x) for tokens x [..., T, C]; on CPU computed as a 1x1 convolution.

    The same products and sums, but oneDNN's channels-last convolution runs about twice as
    fast as the matrix product behind nn.Linear on CPU, forward and backward (MOAT-0's
    attention projections at batch 8: 145-195 vs 80-100 GMAC/s). The [N, C, T, 1] view of
    contiguous tokens is already channels-last: no copy either way.
    """
    if x.device.type != "cpu":
        return linear(x)
    *lead, tokens, channels = x.shape
    y = F.conv2d(x.reshape(-1, tokens, 1, channels).permute(0, 3, 1, 2),
                 linear.weight[:, :, None, None], linear.bias)
    return y.permute(0, 2, 3, 1).reshape(*lead, tokens, linear.out_features)


def set_attention_kernel(kernel: str) -> str:
    """Make every `Attention` use `kernel` ("sdpa" or "flex"); returns the previous one."""
    if kernel not in ATTENTION_KERNELS:
        raise InvalidInputError(f"attention kernel must be one of {ATTENTION_KERNELS}, got "
                                f"{kernel!r}")
    previous, _attention["kernel"] = _attention["kernel"], kernel
    return previous


def attention_kernel() -> str:
    """The attention kernel in use ("sdpa" or "flex")."""
    return _attention["kernel"]


@functools.cache
def _compiled_flex_attention():
    # FlexAttention is only fast compiled; inside a compiled model this compiles inline.
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                             scale: float, compiled: bool = True) -> Tensor:
    """softmax(q k^T * scale + bias) v by FlexAttention; bias [1, heads, T, T] or None.
    `compiled` False runs its unfused reference implementation (tests)."""
    run = _compiled_flex_attention() if compiled else flex_attention
    if bias is None:
        return run(q, k, v, scale=scale)
    table = bias[0]

    def add_bias(score, batch, head, q_idx, kv_idx):
        return score + table[head, q_idx, kv_idx]

    return run(q, k, v, score_mod=add_bias, scale=scale)


class Attention(nn.Module):
    """Multi-head self-attention within windows, with a 2-D relative position bias.

    q, k and v are one fused projection (the official separate q/k/v weights are
    concatenated on load). The bias is computed from the table at forward time, so the
    table learns; with gradients off it is cached per window size until the table changes.
    """

    def __init__(self, dim: int, num_heads: int, head_size: int = 32,
                 position_embedding_size: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_size = num_heads, head_size
        inner = num_heads * head_size
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.relative_position_embedding = None
        if position_embedding_size is not None:
            side = 2 * position_embedding_size - 1
            self.relative_position_embedding = nn.Parameter(torch.zeros(num_heads, side, side))
        self._bias_cache: dict[tuple, Tensor] = {}
        # Opt-in for moat.explain: a list that receives the attention probabilities
        # [B*windows, heads, T, T] of every call, in call order. None: not recorded.
        self.recorded_probs: list[Tensor] | None = None

    def attention_bias(self, window: tuple[int, int],
                       crop: tuple[int, int] | None = None) -> Tensor | None:
        """[1, heads, T, T] position bias of a window (or its top-left `crop`); None without PE.

        4-D, so that scaled_dot_product_attention can take its fused CPU kernel.
        """
        table = self.relative_position_embedding
        if table is None:
            return None
        crop = None if crop == window else crop
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return relative_position_bias(table, *window, crop)[None]
        key = (window, crop, tensor_version(table), table.data_ptr(), table.dtype)
        if key not in self._bias_cache:
            if len(self._bias_cache) > 8:
                self._bias_cache.clear()
            self._bias_cache[key] = relative_position_bias(table, *window, crop)[None]
        return self._bias_cache[key]

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x: [B, windows, T, C], bias: [1, heads, T, T] or None -> [B, windows, T, C]."""
        batch, windows, tokens, _ = x.shape
        qkv = self.project(self.qkv, x).view(batch * windows, tokens, 3, self.num_heads,
                                             self.head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*windows, heads, T, K]
        scale = self.head_size ** -0.5
        if bias is not None:
            bias = bias.to(q.dtype)
        if self.recorded_probs is not None:
            # The output is computed from the recorded probabilities: they are the attention.
            logits = torch.matmul(q * scale, k.transpose(-1, -2))
            probs = (logits if bias is None else logits + bias).softmax(-1)
            self.recorded_probs.append(probs)
            out = probs @ v
        elif _attention["kernel"] == "flex" and (q.is_cuda or not q.requires_grad):
            out = flex_attention_with_bias(q, k, v, bias, scale, compiled=q.is_cuda)
        elif bias is not None and bias.requires_grad and q.device.type == "cpu":
            # SDPA's fused CPU kernel cannot return a bias gradient; its fallback is slower
            # than these three ops (it adds masking passes for fully masked rows).
            out = torch.matmul(q * scale, k.transpose(-1, -2)).add_(bias).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return self.project(self.proj, out.transpose(1, 2).reshape(batch, windows, tokens, -1))

    def project(self, linear: nn.Linear, x: Tensor) -> Tensor:
        """The q/k/v and output projections (`pointwise`; an inference copy may choose)."""
        return pointwise(linear, x)
