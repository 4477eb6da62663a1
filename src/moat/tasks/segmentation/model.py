"""DeepLabv3+ on a MOAT backbone: `deeplabv3plus(variant, num_classes)`.

A MOAT backbone (`moat.tasks.backbone`, "segmentation" preset: global attention, shortcut
pool 3) + ASPP on the deepest features (atrous rates 3/6/9 at output stride 32, 6/12/18 at
16, and an image-pooling branch) + the DeepLabv3+ decoder, which fuses the stride-4
features, then bilinear upsampling: the logits always have the input's height and width,
for any input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moat.errors import InvalidInputError
from moat.tasks.backbone import MoatBackbone, build_backbone


def _conv_bn_relu(in_chs: int, out_chs: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


def default_aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLab's atrous rates, (6, 12, 18) at output stride 16, scaled: (3, 6, 9) at 32."""
    rates = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}
    if output_stride not in rates:
        raise InvalidInputError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return rates[output_stride]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, three 3x3 atrous convs and image pooling,
    concatenated and projected.

    The image-pooling branch has no BatchNorm (a 1x1 map has one value per channel per
    image, which BN cannot normalise at batch size 1).
    """

    def __init__(self, in_chs: int, out_chs: int = 256, rates: Sequence[int] = (3, 6, 9),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_chs, out_chs, 1)] + [
            _conv_bn_relu(in_chs, out_chs, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_chs, out_chs, 1),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(out_chs * (len(rates) + 2), out_chs, 1),
                                     nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the deepest features, then the decoder: upsample to the stride-4 features,
    concatenate their 1x1 projection, two 3x3 convs, 1x1 classifier. Output at stride 4."""

    def __init__(self, in_chs: int, low_level_chs: int, num_classes: int, *,
                 aspp_channels: int = 256, decoder_channels: int = 256,
                 low_level_channels: int = 48, rates: Sequence[int] = (3, 6, 9),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.aspp = ASPP(in_chs, aspp_channels, rates, dropout)
        self.low_level = _conv_bn_relu(low_level_chs, low_level_channels, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, low: Tensor, deep: Tensor) -> Tensor:
        x = self.aspp(deep)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([x, self.low_level(low)], dim=1)))


class DeepLabV3Plus(nn.Module):
    """MOAT backbone + DeepLabv3+ head; `forward(x)` -> logits [B, classes, H, W] (input size)."""

    def __init__(self, backbone: MoatBackbone, num_classes: int, **head_kwargs: Any) -> None:
        super().__init__()
        if len(backbone.out_indices) != 2 or backbone.strides[0] != 4:
            raise InvalidInputError("DeepLabV3Plus needs a backbone with out_indices (1, deepest): "
                                    f"the stride-4 and the deepest features, got strides "
                                    f"{backbone.strides}")
        self.backbone = backbone
        self.num_classes = num_classes
        head_kwargs.setdefault("rates", default_aspp_rates(backbone.strides[-1]))
        self.head = DeepLabV3PlusHead(backbone.out_channels[-1], backbone.out_channels[0],
                                      num_classes, **head_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        low, deep = self.backbone(x)
        logits = self.head(low, deep)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Norms, biases and position tables (as for the classifier)."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith("relative_position_embedding")}


def deeplabv3plus(
    variant: str,
    num_classes: int,
    *,
    preset: str = "segmentation",
    output_stride: int = 32,
    aspp_channels: int = 256,
    decoder_channels: int = 256,
    low_level_channels: int = 48,
    aspp_rates: Sequence[int] | None = None,
    dropout: float = 0.1,
    **backbone_kwargs: Any,
) -> DeepLabV3Plus:
    """DeepLabv3+ on any MOAT variant.

    `backbone_kwargs` go to `build_backbone` (weights, frozen_stages, freeze_bn,
    grad_checkpointing, drop_path_rate, window_size, ...). `aspp_rates` None takes
    `default_aspp_rates(output_stride)`. 256/256/48 channels are DeepLab's defaults.
    """
    backbone = build_backbone(variant, preset, out_indices=(1, 4), output_stride=output_stride,
                              **backbone_kwargs)
    return DeepLabV3Plus(backbone, num_classes, aspp_channels=aspp_channels,
                         decoder_channels=decoder_channels,
                         low_level_channels=low_level_channels,
                         rates=tuple(aspp_rates or default_aspp_rates(output_stride)),
                         dropout=dropout)
