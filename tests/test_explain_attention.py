"""Attention maps equal the attention the model computes, windows stitched in place.

The reference is computed by hand the official way: pad the map to whole windows, attend
with the full window's position bias, mask the padded keys, drop the padded queries. The
model itself cuts the last windows instead (see `window_attention`); both must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moat
from moat.explain.attention import record_attention
from moat.models.blocks import MoatBlock
from moat.models.layers import relative_position_bias

# 80x96 input: 5x6 map at stride 16, where (3, 4) windows divide neither side; global
# attention over 3x3 at stride 32.
WINDOWS = [None, None, (3, 4), None]
SIZE = (80, 96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = moat.create_model("tiny_moat_0", num_classes=5, window_size=WINDOWS).eval()
    for m in net.modules():  # larger position tables than the 0.02 init: visible in the maps
        if isinstance(m, MoatBlock):
            torch.nn.init.normal_(m.attention.relative_position_embedding, std=1.0)
    return net


def manual_dense(block: MoatBlock, y: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, heads, HW, HW] attention of `block` on its normalised map y [B, H, W, C]: padded
    windows, padded keys masked with -inf."""
    att = block.attention
    batch, height, width, _ = y.shape
    wh, ww = window
    ph, pw = -height % wh, -width % ww
    padded = F.pad(y, (0, 0, 0, pw, 0, ph))
    valid = F.pad(torch.ones(height, width, dtype=torch.bool), (0, pw, 0, ph))
    index = torch.arange(height * width).view(height, width)
    index = F.pad(index, (0, pw, 0, ph), value=-1)
    heads, size = att.num_heads, att.head_size
    bias = relative_position_bias(att.relative_position_embedding, wh, ww)  # [heads, T, T]
    out = torch.zeros(batch, heads, height * width, height * width)
    for top in range(0, height + ph, wh):
        for left in range(0, width + pw, ww):
            tokens = padded[:, top:top + wh, left:left + ww].reshape(batch, wh * ww, -1)
            qkv = (tokens @ att.qkv.weight.T + att.qkv.bias).view(batch, wh * ww, 3, heads, size)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
            logits = q @ k.transpose(-1, -2) * size ** -0.5 + bias
            keep = valid[top:top + wh, left:left + ww].flatten()
            probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
            ids = index[top:top + wh, left:left + ww].flatten()
            real = ids[keep]
            out[:, :, real[:, None], real[None, :]] = probs[:, :, keep][:, :, :, keep]
    return out


def test_attention_maps_equal_the_models_attention(model):
    x = torch.randn(2, 3, *SIZE)
    normed: dict[str, torch.Tensor] = {}
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, MoatBlock)}
    hooks = [b.attention_norm.register_forward_hook(
        lambda mod, inp, out, n=n: normed.__setitem__(n, out)) for n, b in blocks.items()]
    with torch.no_grad():
        plain = model(x)
        with record_attention(model) as maps:
            recorded = model(x)
    for h in hooks:
        h.remove()
    # recording computes the same output from the recorded probabilities
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    assert set(maps) == set(blocks) and len(maps) == 9
    windowed, global_ = maps["stages.2.0"], maps["stages.3.1"]
    assert windowed.size == (5, 6) and windowed.window == (3, 4)
    assert global_.size == (3, 3) and global_.window == (3, 3)
    for name, block in blocks.items():
        amap = maps[name]
        expected = manual_dense(block, normed[name], amap.window)
        torch.testing.assert_close(amap.dense(), expected, rtol=1e-4, atol=1e-6)
    # a query in the cut bottom-right window (rows 3-4, columns 4-5) attends there only
    q = maps["stages.2.0"].from_query(4, 5)
    assert q[..., :3, :].abs().sum() == 0 and q[..., :, :4].abs().sum() == 0
    torch.testing.assert_close(q.sum((-2, -1)), torch.ones(2, q.shape[1]))
    torch.testing.assert_close(q.flatten(2), maps["stages.2.0"].dense()[:, :, 4 * 6 + 5])


def test_received_is_the_window_mean_of_the_queries(model):
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad(), record_attention(model) as maps:
        model(x)
    amap = maps["stages.2.1"]
    dense = amap.dense()[0]  # [heads, HW, HW]
    received = amap.received()[0]
    # window (rows 0-2, columns 0-3): 12 queries, each row of probabilities sums to 1
    ids = torch.arange(30).view(5, 6)[:3, :4].flatten()
    expected = dense[:, ids][:, :, ids].mean(1)
    torch.testing.assert_close(received[:, :3, :4].flatten(1), expected)
    # every window's received attention sums to 1 per head (6 windows: 2 rows x 2 cols + cut)
    for rows, cols in ((slice(0, 3), slice(0, 4)), (slice(0, 3), slice(4, 6)),
                       (slice(3, 5), slice(0, 4)), (slice(3, 5), slice(4, 6))):
        torch.testing.assert_close(received[:, rows, cols].sum((-2, -1)),
                                   torch.ones(received.shape[0]))


def test_recording_is_switched_off_afterwards(model):
    with torch.no_grad(), record_attention(model):
        model(torch.randn(1, 3, 64, 64))
    assert all(m.attention.recorded_probs is None
               for m in model.modules() if isinstance(m, MoatBlock))
    with pytest.raises(ValueError, match="no MOAT block"):
        with record_attention(torch.nn.Linear(2, 2)):
            pass
