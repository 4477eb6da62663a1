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

    def forward(self, x: Tensor) -> Tensor:
        if not self.static_padding:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def avg_pool_same_exclude_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TF AveragePooling2D(padding='same'): padded positions are excluded from the mean."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top == bottom == left == right == 0:
        return F.avg_pool2d(x, kernel, stride)
    pad = (left, right, top, bottom)
    ones = F.pad(x.new_ones(1, 1, *x.shape[-2:]), pad)
    return F.avg_pool2d(F.pad(x, pad), kernel, stride) / F.avg_pool2d(ones, kernel, stride)


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
        return x / self.keep_prob * mask

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:.4f}"


@functools.lru_cache(maxsize=64)
def _relative_index(h: int, w: int, device: torch.device) -> Tensor:
    """Index into the flattened (2h-1)x(2w-1) table for every (query, key) pair.

    bias[i*w + j, x*w + y] = table[(x - i) + h - 1, (y - j) + w - 1]: key minus query,
    the official convention (the opposite of Swin's).
    """
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    dy = rows[None, :] - rows[:, None] + h - 1  # [query row i, key row x]
    dx = cols[None, :] - cols[:, None] + w - 1  # [query col j, key col y]
    index = dy[:, None, :, None] * (2 * w - 1) + dx[None, :, None, :]
    return index.reshape(h * w, h * w)


def relative_position_bias(table: Tensor, h: int, w: int) -> Tensor:
    """[heads, 2P-1, 2P-1] learned table -> [heads, h*w, h*w] attention bias.

    The table is always resized bilinearly (TF2 half-pixel centres, no antialias) to
    (2h-1, 2w-1), then gathered with the key-minus-query index.
    """
    resized = F.interpolate(table[:, None], size=(2 * h - 1, 2 * w - 1), mode="bilinear",
                            align_corners=False)[:, 0]
    return resized.flatten(1)[:, _relative_index(h, w, table.device)]


@functools.lru_cache(maxsize=64)
def _window_padding_mask(height: int, width: int, window: tuple[int, int],
                         device: torch.device) -> Tensor:
    """[windows, 1, 1, tokens] additive mask: -inf on keys that are padding."""
    wh, ww = window
    valid = torch.zeros(-(-height // wh) * wh, -(-width // ww) * ww, device=device)
    valid[:height, :width] = 1
    valid = window_partition(valid[None, :, :, None], window)[0, :, :, 0]  # [nW, T]
    mask = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))
    return mask[:, None, None, :]


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """[B, H, W, C] -> [B, windows, wh*ww, C], zero-padding H and W up to multiples.

    Window order is (row, column) as in the official `_make_windows`.
    """
    batch, height, width, channels = x.shape
    wh, ww = window
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
    rows, cols = -(-height // wh), -(-width // ww)
    x = windows.view(batch, rows, cols, wh, ww, channels).transpose(2, 3)
    x = x.reshape(batch, rows * wh, cols * ww, channels)
    return x[:, :height, :width] if rows * wh != height or cols * ww != width else x


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

    def attention_bias(self, height: int, width: int, window: tuple[int, int]) -> Tensor | None:
        """Additive bias for [windows or 1, heads or 1, T, T]: position bias + padding mask."""
        table = self.relative_position_embedding
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = (height, width, window, None if table is None else
               (table._version, table.data_ptr(), table.dtype))
        if cacheable and key in self._bias_cache:
            return self._bias_cache[key]
        bias = None
        if table is not None:
            bias = relative_position_bias(table, *window)
        if height % window[0] or width % window[1]:
            mask = _window_padding_mask(height, width, window, self.qkv.weight.device)
            bias = mask if bias is None else bias + mask
        if cacheable:
            if len(self._bias_cache) > 8:
                self._bias_cache.clear()
            self._bias_cache[key] = bias
        return bias

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x: [B, windows, T, C] -> [B, windows, T, C]."""
        batch, windows, tokens, _ = x.shape
        qkv = self.qkv(x).view(batch, windows, tokens, 3, self.num_heads, self.head_size)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, nW, heads, T, K]
        if bias is not None:
            bias = bias.to(q.dtype)
        if bias is None or bias.dim() == 3:
            # One bias for all windows: fold windows into the batch (the fast 4-D kernel).
            q, k, v = (t.reshape(batch * windows, self.num_heads, tokens, self.head_size)
                       for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.head_size ** -0.5)
        out = out.reshape(batch, windows, self.num_heads, tokens, self.head_size)
        return self.proj(out.transpose(2, 3).reshape(batch, windows, tokens, -1))
