"""MOAT as a multi-scale backbone for dense prediction (segmentation, detection).

`build_backbone(variant, preset)` returns a `MoatBackbone`: a features-only `MoatNet` whose
forward gives a list of NCHW feature maps (strides 2/4/8/16/32 for out_indices 0..4), with
the settings downstream training needs:

* presets of the official downstream settings (`PRESETS`): "detection" (14x14 window
  attention in the third stage, global attention in the fourth, shortcut pool 3) and
  "segmentation" (global attention in both MOAT stages, pool 3). Any input size works:
  windows that do not divide a feature map are cut to it by the model;
* frozen stages (stem + first K stages get `requires_grad=False` and stay in eval mode,
  whatever `.train()` is called with);
* frozen BatchNorm (every BN becomes `FrozenBatchNorm2d`: fixed statistics and affine,
  numerically identical to BN in eval mode, eps 1e-3 kept);
* output stride 16 (the last stage runs at stride 1 with dilated depthwise convs);
* gradient checkpointing and weights loading.

The state-dict keys are those of the classifier minus its head, so checkpoints of
`moat.create_model(variant)` load directly (`moat.weights.adapt` drops the head).
This module depends on torch only; detection and segmentation heads build on it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moat.errors import InvalidInputError
from moat.models.config import MODEL_CONFIGS
from moat.models.blocks import set_batch_norm_momentum
from moat.models.config import LAYOUT_ARGS
from moat.models.layers import Conv2dSame
from moat.models.moat import ENDPOINTS, MoatNet, Window
from moat.train.finetune import load_pretrained
from moat.weights.loader import load_weights

__all__ = ["PRESETS", "BackbonePreset", "FrozenBatchNorm2d", "MoatBackbone", "build_backbone",
           "batch_norm_thawed", "freeze_batch_norm", "list_presets",
           "load_backbone_weights"]


@dataclass(frozen=True)
class BackbonePreset:
    """Attention layout of a MOAT backbone for one kind of downstream task."""

    name: str
    window_size: tuple[Window | None, ...]  # one entry per stage; None = global attention
    global_attention_at_end: bool = False   # last block of each MOAT stage attends globally
    pool_size: int = 3                      # shortcut average pool (official downstream: 3)
    description: str = field(default="", compare=False)

    def model_args(self) -> dict:
        """The preset as `MoatNet` keywords (`LAYOUT_ARGS`)."""
        return {name: getattr(self, name) for name in LAYOUT_ARGS}


PRESETS: dict[str, BackbonePreset] = {
    "detection": BackbonePreset(
        "detection", (None, None, (14, 14), None), False, 3,
        "14x14 window attention in the third stage (stride 16), global attention in the "
        "fourth (stride 32): large detection inputs at linear cost in the third stage"),
    "segmentation": BackbonePreset(
        "segmentation", (None, None, None, None), False, 3,
        "global attention in both MOAT stages (strides 16 and 32)"),
}


def list_presets() -> list[str]:
    return list(PRESETS)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, no gradient).

    The forward is `F.batch_norm(..., training=False)`, the very kernel BatchNorm2d runs in
    eval mode, so freezing changes no output bit; `eps` is copied from the BN it replaces
    (1e-3 in MOAT, not PyTorch's 1e-5). State-dict keys are BatchNorm2d's, so checkpoints
    load both ways (`num_batches_tracked` is dropped on load).
    """

    def __init__(self, num_features: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm2d:
        if bn.running_mean is None:
            raise InvalidInputError("cannot freeze a BatchNorm without running statistics "
                                    "(track_running_stats=False)")
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen.to(bn.running_mean.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (incl. SyncBatchNorm) in `module` by `FrozenBatchNorm2d`.

    Returns the module (a bare BN is returned as its frozen replacement).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        frozen = freeze_batch_norm(child)
        if frozen is not child:
            setattr(module, name, frozen)
    return module


@contextmanager
def batch_norm_thawed(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily turn every FrozenBatchNorm2d back into a BatchNorm2d (eval mode), e.g. for
    loaders that look for BatchNorm2d layers (official weights); on exit the (possibly newly
    loaded) values are frozen again."""
    thawed: list[tuple[nn.Module, str]] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps).to(child.weight.device)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, key).copy_(getattr(child, key))
                bn.eval()
                setattr(parent, name, bn)
                thawed.append((parent, name))
    try:
        yield module
    finally:
        for parent, name in thawed:
            setattr(parent, name, FrozenBatchNorm2d.from_batch_norm(getattr(parent, name)))


class MoatBackbone(MoatNet):
    """Features-only MOAT returning `[features at out_indices]`; build with `build_backbone`.

    `feature_info.channels()` / `.reduction()` describe the outputs; `out_channels` and
    `strides` are the same lists. `forward_dict` returns them keyed by endpoint name
    ('stage2'..'stage5'), the form torchvision's FeaturePyramidNetwork takes.
    """

    def __init__(self, cfg, *, out_indices: Sequence[int] = (1, 2, 3, 4), **kwargs) -> None:
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)):
            raise InvalidInputError(f"out_indices must be increasing and unique, got "
                                    f"{list(out_indices)}")
        super().__init__(cfg, num_classes=0, features_only=True, out_indices=out_indices,
                         **kwargs)
        self.output_stride = 32

    @property
    def out_channels(self) -> list[int]:
        return self.feature_info.channels()

    @property
    def strides(self) -> list[int]:
        return self.feature_info.reduction()

    @property
    def names(self) -> list[str]:
        return [ENDPOINTS[i] for i in self.out_indices]

    def forward_dict(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict(zip(self.names, self(x)))

    # --- freezing (stages: MoatNet.freeze_stages) ------------------------------------

    def freeze_batch_norm(self) -> MoatBackbone:
        """Every BatchNorm becomes `FrozenBatchNorm2d` (exact eval-mode numerics)."""
        freeze_batch_norm(self)
        return self

    # --- output stride -----------------------------------------------------------------

    def set_output_stride(self, output_stride: int) -> MoatBackbone:
        """16 runs the last stage at stride 1 (dilation 2 in its later depthwise convs), as
        DeepLab does; the weights are unchanged. Only 32 (default) and 16 are supported."""
        if output_stride == self.output_stride:
            return self
        if output_stride != 16 or self.output_stride != 32:
            raise InvalidInputError(f"output_stride must be 32 or 16, got {output_stride}")
        last = self.stages[-1]
        first = last[0]
        first.stride = 1  # the shortcut pool is skipped at stride 1
        _restride(first.depthwise_conv, stride=1, dilation=1)
        for block in list(last)[1:]:
            _restride(block.depthwise_conv, stride=1, dilation=2)
        self.output_stride = 16
        for info in self.feature_info:
            if info["module"] == f"stages.{len(self.stages) - 1}":
                info["reduction"] = 16
        return self


def _restride(conv: Conv2dSame, stride: int, dilation: int) -> None:
    k = conv.kernel_size[0]
    conv.stride, conv.dilation = (stride, stride), (dilation, dilation)
    conv.static_padding = True  # stride 1, odd kernel: symmetric padding = 'SAME'
    conv.padding = (dilation * (k // 2),) * 2


# --- weights ------------------------------------------------------------------------------

def load_backbone_weights(model: MoatBackbone, weights) -> MoatBackbone:
    """Load weights into a backbone, strictly, ignoring a classifier (frozen BN is fine).

    `weights`: a path that `moat.weights.loader.load_weights` reads (our .safetensors, a
    PyTorch state_dict, an .npz of official names, a TensorFlow checkpoint or released
    .tar.gz), or a mapping of tensors under our names or official names (`moat/...`).
    """
    with batch_norm_thawed(model):
        load_weights(model, weights)
    return model


def load_pretrained_backbone(model: nn.Module, path: str, backbone: MoatBackbone | None) -> str:
    """`--init-from PATH` for a model built on a MOAT backbone (see
    `moat.train.finetune.load_pretrained`); frozen BatchNorm is thawed while loading, so
    official-weight loaders find their BatchNorm2d layers."""
    with batch_norm_thawed(backbone):
        return load_pretrained(model, path, backbone=backbone)


# --- builder ------------------------------------------------------------------------------

def build_backbone(
    variant: str,
    preset: str | BackbonePreset = "segmentation",
    *,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    frozen_stages: int = -1,
    freeze_bn: bool = False,
    grad_checkpointing: bool = False,
    weights=None,
    output_stride: int = 32,
    drop_path_rate: float | None = None,
    position_embedding: bool = True,
    in_chans: int = 3,
    bn_momentum: float | None = None,
    **overrides,
) -> MoatBackbone:
    """A MOAT backbone with a downstream preset.

    Args:
        variant: a `moat.list_models()` name, e.g. "moat_0" or "tiny_moat_0".
        preset: "detection", "segmentation" (see `PRESETS`) or a `BackbonePreset`.
        out_indices: endpoints to return: 0..4 = strides 2, 4, 8, 16, 32 (default 1..4).
        frozen_stages: -1 freezes nothing, 0 the stem, K the stem and stages 0..K-1.
        freeze_bn: turn every BatchNorm into `FrozenBatchNorm2d` (fixed stats and affine).
        grad_checkpointing: recompute blocks in backward (less memory for large crops).
        weights: None (official random init) or what `load_backbone_weights` takes; loaded
            before freezing.
        output_stride: 32, or 16 (last stage undilated to stride 1, dilated convs).
        drop_path_rate: stochastic depth; None takes the variant's official default.
        position_embedding: False for the official "no PE" variants.
        bn_momentum: PyTorch momentum of the BatchNorm statistics; None keeps the official
            0.01 (Keras 0.99), which suits long schedules: for short ones (a few hundred
            steps from scratch) 0.1 keeps the eval-mode statistics up to date.
        overrides: replace preset fields: window_size, global_attention_at_end, pool_size.
    """
    if variant not in MODEL_CONFIGS:
        raise InvalidInputError(f"unknown model {variant!r}; choose one of {list(MODEL_CONFIGS)}")
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise InvalidInputError(f"unknown backbone preset {preset!r}; choose one of "
                                    f"{list(PRESETS)}")
        preset = PRESETS[preset]
    unknown = set(overrides) - set(LAYOUT_ARGS)
    if unknown:
        raise TypeError(f"build_backbone() got unexpected arguments {sorted(unknown)}")
    settings = preset.model_args() | overrides
    model = MoatBackbone(MODEL_CONFIGS[variant], out_indices=out_indices, in_chans=in_chans,
                         position_embedding=position_embedding, drop_path_rate=drop_path_rate,
                         **settings)
    model.preset = preset.name
    set_batch_norm_momentum(model, bn_momentum)
    if weights is not None:
        load_backbone_weights(model, weights)
    model.set_output_stride(output_stride)
    if freeze_bn:
        model.freeze_batch_norm()
    model.freeze_stages(frozen_stages)
    model.set_grad_checkpointing(grad_checkpointing)
    return model
