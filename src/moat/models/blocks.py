"""MBConvBlock and MoatBlock (an MBConv without squeeze-excite, then attention)."""

from __future__ import annotations

from torch import Tensor, nn

from moat.kernels import batch_norm_gelu
from moat.models.config import MoatConfig
from moat.models.layers import (Attention, Conv2dSame, DropPath, avg_pool_same_exclude_pad,
                                window_attention)


def batch_norm(channels: int, cfg: MoatConfig) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


def set_batch_norm_momentum(module: nn.Module, momentum: float | None) -> None:
    """Every BatchNorm in `module` updates its statistics with `momentum` (PyTorch's
    convention; None leaves each as built: the official 0.01 in MOAT, 0.1 in added heads)."""
    if momentum is None:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


class SqueezeExcite(nn.Module):
    """Official SE: swish (SiLU) between the two 1x1 convs, not the block's GELU."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        # sum / count, not mean: mean's gradient is materialised as a full NCHW tensor that
        # autograd then adds to the channels-last one; sum's is a broadcast view (SE's
        # training step at 56x56: 18 ms -> 12 ms on CPU).
        pooled = x.sum((2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
        scale = self.expand(self.act(self.reduce(pooled)))
        return x * scale.sigmoid()


class MBConvShortcut:
    """The shortcut of an MBConv block holding `stride`, `pool_size` and `shortcut_conv`:
    average-pooled (TF SAME, padding excluded) when strided, then a 1x1 convolution when the
    width changes. The plain, fused and graph blocks share it."""

    stride: int
    pool_size: int
    shortcut_conv: nn.Module | None

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = avg_pool_same_exclude_pad(x, self.pool_size, self.stride)
        return x if self.shortcut_conv is None else self.shortcut_conv(x)


class MBConvBlock(MBConvShortcut, nn.Module):
    """Pre-norm inverted residual: BN -> 1x1 expand -> BN/GELU -> 3x3 depthwise -> BN/GELU
    -> [SE] -> 1x1 shrink, plus a shortcut (avg-pool when strided, then 1x1 conv when the
    width changes). The expansion is 4x the OUTPUT width, also in a stage's first block."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: MoatConfig,
                 pool_size: int = 2, keep_prob: float = 1.0, use_se: bool = True) -> None:
        super().__init__()
        mid = out_chs * cfg.expansion_rate
        self.stride, self.pool_size = stride, pool_size
        self.shortcut_conv = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else None
        self.pre_norm = batch_norm(in_chs, cfg)
        self.expand_conv = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.expand_norm = batch_norm(mid, cfg)
        self.depthwise_conv = Conv2dSame(mid, mid, 3, stride, groups=mid, bias=False)
        self.depthwise_norm = batch_norm(mid, cfg)
        self.se = SqueezeExcite(mid, max(1, int(out_chs * cfg.se_ratio))) if use_se else None
        self.shrink_conv = nn.Conv2d(mid, out_chs, 1)
        self.drop_path = DropPath(keep_prob)

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand_conv(self.pre_norm(x))
        pad = self.depthwise_conv.pad_for(*y.shape[-2:])
        y = self.depthwise_conv(batch_norm_gelu(self.expand_norm, y, pad), padded=True)
        y = batch_norm_gelu(self.depthwise_norm, y)
        if self.se is not None:
            y = self.se(y)
        return self.shortcut(x) + self.drop_path(self.shrink_conv(y))


class MoatBlock(MBConvBlock):
    """MBConv (no SE) followed by pre-LayerNorm window/global self-attention.

    `window` None means global attention over the whole (downsampled) feature map; where
    windows do not divide the map, the last windows are cut to it (equivalent to padding
    the map and masking the padded keys, see `window_attention`).

    Runs in either memory format; with channels-last activations the LayerNorm and the
    global attention read the feature map in place, without a transposing copy.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: MoatConfig,
                 num_heads: int, position_embedding_size: int | None,
                 window: tuple[int, int] | None = None, pool_size: int = 2,
                 keep_prob: float = 1.0) -> None:
        super().__init__(in_chs, out_chs, stride, cfg, pool_size, keep_prob, use_se=False)
        self.window = window
        self.attention_norm = nn.LayerNorm(out_chs, eps=cfg.ln_eps)
        self.attention = Attention(out_chs, num_heads, cfg.head_size, position_embedding_size)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        window = self.window or tuple(x.shape[-2:])
        y = self.attention_norm(x.permute(0, 2, 3, 1))
        y = window_attention(self.attention, y, window).permute(0, 3, 1, 2)
        return x + self.drop_path(y)
