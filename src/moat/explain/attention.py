"""The attention of every MOAT block, recorded from the model's own forward pass and put
back on the feature map, windows stitched in place.

`record_attention(model)` switches on the opt-in recording of `moat.models.layers.Attention`
(its output is then computed from the very probabilities it records) and a hook on each
`MoatBlock` that notes the size of the map it attends over. `window_attention` calls the
attention once per region of `_window_regions` (the part the windows divide, then the cut
last row / column), windows in (row, column) order and tokens row-major inside a window:
`AttentionMap` follows the same order to give every probability its (query, key) place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moat.errors import InvalidInputError
from moat.models.blocks import MoatBlock
from moat.models.layers import _window_regions


@dataclass
class AttentionMap:
    """One block's attention over its H x W feature map.

    `chunks`: per attention call, (positions [windows, T] of its tokens as flat indices
    y * W + x into the map, probabilities [B, windows, heads, T(query), T(key)]).
    """

    name: str
    size: tuple[int, int]
    window: tuple[int, int]
    chunks: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def num_heads(self) -> int:
        return self.chunks[0][1].shape[2]

    def _empty(self, *tail: int) -> Tensor:
        probs = self.chunks[0][1]
        return probs.new_zeros(probs.shape[0], self.num_heads, *tail)

    def dense(self) -> Tensor:
        """[B, heads, H*W (query), H*W (key)]: each query's row holds its window's
        probabilities at the keys' places, zeros elsewhere (the whole row for global
        attention). Memory grows as (H*W)^2: for small maps and tests."""
        tokens = self.size[0] * self.size[1]
        out = self._empty(tokens * tokens)
        for pos, probs in self.chunks:
            flat = pos[:, :, None] * tokens + pos[:, None, :]  # [windows, T, T]
            out[..., flat.flatten()] = probs.transpose(1, 2).flatten(2)
        return out.view(*out.shape[:2], tokens, tokens)

    def received(self) -> Tensor:
        """[B, heads, H, W]: the attention each position receives, averaged over the queries
        of its window (so each window sums to 1 per head): where the block looks."""
        out = self._empty(self.size[0] * self.size[1])
        for pos, probs in self.chunks:
            out[..., pos.flatten()] = probs.mean(-2).transpose(1, 2).flatten(2)
        return out.view(*out.shape[:2], *self.size)

    def from_query(self, y: int, x: int) -> Tensor:
        """[B, heads, H, W]: the attention of the query at map position (y, x) over the keys
        (zero outside its window)."""
        height, width = self.size
        if not (0 <= y < height and 0 <= x < width):
            raise InvalidInputError(f"query ({y}, {x}) is outside the {height}x{width} map of "
                                    f"{self.name}")
        out = self._empty(height * width)
        query = y * width + x
        for pos, probs in self.chunks:
            hit = (pos == query).nonzero()
            if len(hit):
                window, token = hit[0].tolist()
                out[..., pos[window]] = probs[:, window, :, token, :]
        return out.view(*out.shape[:2], height, width)


def _positions(top: int, left: int, height: int, width: int, window: tuple[int, int],
               map_width: int) -> Tensor:
    """Flat map indices [windows, wh*ww] of the windows tiling one region, in the order of
    `window_partition`."""
    wh, ww = window
    ys = torch.arange(top, top + height).view(height // wh, 1, wh, 1)
    xs = torch.arange(left, left + width).view(1, width // ww, 1, ww)
    return (ys * map_width + xs).reshape(-1, wh * ww)  # [rows, cols, wh, ww] -> flat


def _collect(name: str, block: MoatBlock, size: tuple[int, int]) -> AttentionMap:
    height, width = size
    window = block.window or size
    calls = iter(block.attention.recorded_probs)
    out = AttentionMap(name, size, tuple(window))
    for top, bottom, wh in _window_regions(height, window[0]):
        for left, right, ww in _window_regions(width, window[1]):
            probs = next(calls)
            pos = _positions(top, left, bottom - top, right - left, (wh, ww), width)
            batch = probs.shape[0] // pos.shape[0]
            out.chunks.append((pos.to(probs.device), probs.view(batch, pos.shape[0],
                                                                *probs.shape[1:])))
    return out


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, AttentionMap]]:
    """Within the block, forward passes record the attention of every MoatBlock of `model`;
    the yielded dict (module name -> AttentionMap) is filled when the block exits and holds
    the LAST forward pass. Recording computes attention without the fused kernel: slower,
    the same result."""
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, MoatBlock)}
    if not blocks:
        raise InvalidInputError(f"{type(model).__name__} has no MOAT block: attention maps need a "
                                "MoatNet (or a model containing one), not an optimized or exported "
                                "copy")
    sizes: dict[str, tuple[int, int]] = {}
    maps: dict[str, AttentionMap] = {}

    def hook(name: str):
        def note_size(module: MoatBlock, inputs, output: Tensor) -> None:
            sizes[name] = tuple(output.shape[-2:])
            del module.attention.recorded_probs[:-_calls(module, sizes[name])]
        return note_size

    handles = [block.register_forward_hook(hook(name)) for name, block in blocks.items()]
    for block in blocks.values():
        block.attention.recorded_probs = []
    try:
        yield maps
        for name, block in blocks.items():
            if name in sizes:
                maps[name] = _collect(name, block, sizes[name])
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks.values():
            block.attention.recorded_probs = None


def _calls(block: MoatBlock, size: tuple[int, int]) -> int:
    """Number of attention calls one forward of `block` makes on a map of `size`."""
    window = block.window or size
    return len(_window_regions(size[0], window[0])) * len(_window_regions(size[1], window[1]))
