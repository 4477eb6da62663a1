"""MoatNet: stem -> two MBConv stages -> two MOAT stages -> head.

Endpoints `stage1`..`stage5` are the official pre-activation features at strides
2, 4, 8, 16, 32. The head pools the raw stage-5 stream, applies LayerNorm, then a linear
layer (no activation or norm before pooling, no dropout: as in the official model).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moat.errors import InvalidInputError
from moat.models.blocks import MBConvBlock, MoatBlock, batch_norm
from moat.models.config import MoatConfig, check_model_args
from moat.models.layers import Attention, Conv2dSame

ENDPOINTS = ("stage1", "stage2", "stage3", "stage4", "stage5")
Window = tuple[int, int]


class FeatureInfo(list):
    """timm-style feature description: a list of dicts with `channels()`/`reduction()`."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


def _check_window_size(cfg: MoatConfig, window_size) -> list[Window | None]:
    if window_size is None:
        return [None] * len(cfg.block_type)
    window_size = list(window_size)
    if len(window_size) != len(cfg.block_type):
        raise InvalidInputError(
            f"window_size needs one entry per stage ({len(cfg.block_type)}), got "
            f"{len(window_size)}: use e.g. [None, None, (14, 14), None]")
    checked: list[Window | None] = []
    for stage, (kind, window) in enumerate(zip(cfg.block_type, window_size)):
        if window is not None and kind != "moat":
            raise InvalidInputError(
                f"window_size[{stage}] = {window!r}, but stage {stage} is an MBConv stage "
                "without attention: window attention applies only to the MOAT stages "
                f"(indices {list(cfg.moat_stages)}); set window_size[{stage}] to None")
        if isinstance(window, int):
            window = (window, window)
        if window is not None:
            window = tuple(int(v) for v in window)
            if len(window) != 2 or min(window) < 1:
                raise InvalidInputError(f"window_size[{stage}] = {window!r}: use None (global "
                                        "attention), a positive int or an (h, w) pair")
        checked.append(window)
    return checked


class MoatNet(nn.Module):
    """MOAT network. Build it with `moat.create_model(name, ...)`.

    Args:
        cfg: the variant (`moat.models.config.MODEL_CONFIGS`).
        num_classes: classifier outputs; 0 for pooled features.
        in_chans: input channels.
        position_embedding: False builds the official "no PE" variant.
        window_size: None for global attention everywhere, or one entry per stage
            (4 entries; MBConv stages must be None), each None, N or (h, w).
        global_attention_at_end: the last block of each MOAT stage attends globally.
        pool_size: shortcut average-pool size: 2 (classification) or 3 (official
            downstream default).
        drop_path_rate: stochastic depth of the last block; None takes the official
            per-variant default (MOAT-0: 0.2, ..., tiny-MOAT-0: 0).
        features_only: return a list of feature maps instead of logits.
        out_indices: with features_only, which of stage1..stage5 (0..4) to return.
    """

    # The head, after the last stage: what a features_only model lacks, and the only tensors
    # whose shape depends on num_classes (moat.weights.adapt keeps, replaces or drops them).
    classifier_module = "logits_head"  # timm's pretrained_cfg["classifier"]
    head_modules = ("final_layer_norm", classifier_module)
    first_conv = "stem.conv_0"         # timm's pretrained_cfg["first_conv"]

    def __init__(
        self,
        cfg: MoatConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        position_embedding: bool = True,
        window_size: Sequence[Window | int | None] | None = None,
        global_attention_at_end: bool = False,
        pool_size: int = 2,
        drop_path_rate: float | None = None,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_model_args(pool_size=pool_size)
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.window_size = _check_window_size(cfg, window_size)
        self.grad_checkpointing = False
        self.frozen_stages = -1

        stem_0, stem_1 = cfg.stem_size
        self.stem = nn.Sequential(OrderedDict(
            conv_0=Conv2dSame(in_chans, stem_0, 3, stride=2),
            norm_0=batch_norm(stem_0, cfg),
            act_0=nn.GELU(),
            conv_1=Conv2dSame(stem_0, stem_1, 3, stride=1),
        ))
        feature_info = [dict(num_chs=stem_1, reduction=2, module="stem")]

        keep_probs = iter(cfg.drop_path_keep_probs(drop_path_rate))
        in_chs, reduction = stem_1, 2
        self.stages = nn.ModuleList()
        for stage, (kind, depth, width) in enumerate(
                zip(cfg.block_type, cfg.num_blocks, cfg.hidden_size)):
            blocks = []
            for index in range(depth):
                stride = cfg.stage_stride[stage] if index == 0 else 1
                common = dict(cfg=cfg, pool_size=pool_size, keep_prob=next(keep_probs))
                if kind == "mbconv":
                    blocks.append(MBConvBlock(in_chs, width, stride, **common))
                else:
                    last = index == depth - 1
                    window = None if global_attention_at_end and last else self.window_size[stage]
                    pe_size = cfg.position_embedding_size[stage] if position_embedding else None
                    blocks.append(MoatBlock(in_chs, width, stride, num_heads=cfg.num_heads(stage),
                                            position_embedding_size=pe_size, window=window,
                                            **common))
                in_chs = width
            reduction *= cfg.stage_stride[stage]
            self.stages.append(nn.Sequential(*blocks))
            feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{stage}"))

        self.num_features = in_chs
        self.features_only = features_only
        self.out_indices = tuple(range(len(ENDPOINTS)) if out_indices is None else out_indices)
        if features_only:
            if any(not 0 <= i < len(ENDPOINTS) for i in self.out_indices):
                raise InvalidInputError(f"out_indices must be within 0..4 (stage1..stage5), "
                                        f"got {list(self.out_indices)}")
            self.feature_info = FeatureInfo(feature_info[i] for i in self.out_indices)
            self.final_layer_norm = self.logits_head = None
        else:
            self.feature_info = FeatureInfo(feature_info)
            self.final_layer_norm = nn.LayerNorm(in_chs, eps=cfg.ln_eps)
            self.logits_head = self._make_classifier(num_classes)
        self.apply(self._init_weights)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self, module: nn.Module) -> None:
        """Official init: normal(0, 0.02) kernels and position tables, zero biases."""
        std = self.cfg.init_std
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Attention) and module.relative_position_embedding is not None:
            nn.init.normal_(module.relative_position_embedding, std=std)

    # --- public surface -------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: less memory for larger crops."""
        self.grad_checkpointing = enable

    def freeze_stages(self, frozen_stages: int) -> MoatNet:
        """Freeze the stem and the first `frozen_stages` stages (-1: nothing, 0: the stem).

        Frozen parameters get `requires_grad=False`, and frozen modules stay in eval mode
        (BatchNorm statistics fixed, no drop path) even when the model is put in train mode.
        """
        check_model_args(frozen_stages=frozen_stages)
        self.frozen_stages = frozen_stages
        for module in self.frozen_modules():
            module.requires_grad_(False)
        return self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and stages `freeze_stages` froze (empty when nothing is frozen)."""
        if self.frozen_stages < 0:
            return []
        return [self.stem, *self.stages[:self.frozen_stages]]

    def train(self, mode: bool = True) -> MoatNet:
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameters to exclude from weight decay: position tables, norms and biases."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith("relative_position_embedding")}

    def get_classifier(self) -> nn.Module:
        return self.logits_head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (0 removes it: forward then returns pooled features)."""
        if self.features_only:
            raise InvalidInputError("a features_only model has no classifier")
        self.num_classes = num_classes
        self.logits_head = self._make_classifier(num_classes)
        if num_classes > 0:
            self._init_weights(self.logits_head)

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        for block in stage:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_endpoints(self, x: Tensor, last: int = len(ENDPOINTS) - 1) -> dict[str, Tensor]:
        """The official endpoints {'stage1': stride 2, ..., 'stage5': stride 32}, NCHW.

        `last` stops early (index into ENDPOINTS) for callers that need fewer stages.
        """
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_input(x, self.in_chans, next(self.stem.parameters()))  # kept out of exports
        x = self.stem(x)
        endpoints = {"stage1": x}
        for index, stage in enumerate(self.stages[:last], start=1):
            x = self._run_stage(stage, x)
            endpoints[ENDPOINTS[index]] = x
        return endpoints

    def forward_features(self, x: Tensor) -> Tensor:
        """Stage-5 feature map [B, C, H/32, W/32], before pooling and the head (the last
        stage kept by `prune_intermediate_layers`)."""
        return self.forward_endpoints(x)[ENDPOINTS[len(self.stages)]]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.final_layer_norm(x.mean((2, 3)))
        return x if pre_logits else self.logits_head(x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            endpoints = self.forward_endpoints(x, last=max(self.out_indices))
            return [endpoints[ENDPOINTS[i]] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    # --- timm's intermediate-features API (code written for timm backbones) ------------

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's `forward_intermediates`: the feature maps at `indices` (0 = the stem,
        1..4 = the stages, i.e. ENDPOINTS stage1..stage5; an int n takes the last n, None
        all, negative indices count from the end), NCHW.

        Returns `intermediates` with `intermediates_only`, else `(final, intermediates)`
        where `final` is `forward_features`'s output (after the last stage run: with
        `stop_early` the pass ends at the last index taken). `norm` is accepted for timm's
        signature and changes nothing: MOAT's final LayerNorm acts on pooled features.
        """
        if output_fmt != "NCHW":
            raise InvalidInputError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = take_indices(len(self.stages) + 1, indices)
        last = max_index if stop_early else len(self.stages)
        endpoints = self.forward_endpoints(x, last=last)
        intermediates = [endpoints[ENDPOINTS[i]] for i in take]
        if intermediates_only:
            return intermediates
        return endpoints[ENDPOINTS[last]], intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1,
                                  prune_norm: bool = False, prune_head: bool = True,
                                  ) -> list[int]:
        """timm's `prune_intermediate_layers`: drop the stages after the last index of
        `indices` (as in `forward_intermediates`) and, with `prune_head` or when stages were
        dropped, the head (the final LayerNorm too, as timm's `reset_other`); returns the
        absolute indices taken."""
        take, max_index = take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = ([self.cfg.stem_size[1]] + list(self.cfg.hidden_size))[max_index]
        if not self.features_only:
            if prune_norm or prune_head or prune_end:
                self.final_layer_norm = nn.Identity()
            if prune_head or prune_end:
                self.num_classes = 0
                self.logits_head = nn.Identity()
        return take


def take_indices(count: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: (absolute indices, their maximum) of `count` features;
    None: all, an int n: the last n, a sequence: those (negative from the end)."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise InvalidInputError(f"last-n ({indices}) is out of range (1 to {count})")
        taken = list(range(count - indices, count))
    else:
        taken = []
        for i in indices:
            index = count + i if i < 0 else i
            if not 0 <= index < count:
                raise InvalidInputError(f"feature index {index} is out of range (0 to {count - 1})")
            taken.append(index)
    return taken, max(taken)


def check_input(x: Tensor, channels: int, weight: Tensor) -> None:
    """Refuse input the network cannot take (`weight`: the stem's first parameter), with
    what was expected and how to get it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a tensor of images [B, {channels}, H, W], got "
                        f"{type(x).__name__}")
    if x.ndim != 4:
        hint = " (add the batch dimension: x.unsqueeze(0))" if x.ndim == 3 else ""
        raise InvalidInputError(f"expected a batch of images [B, {channels}, H, W], got a tensor "
                                f"of shape {list(x.shape)}{hint}")
    if x.shape[1] != channels:
        hint = ("; this looks like [B, H, W, C]: use x.permute(0, 3, 1, 2)"
                if x.shape[-1] == channels else
                "; replicate a grey image with x.expand(-1, 3, -1, -1)" if x.shape[1] == 1
                else "")
        raise InvalidInputError(f"expected {channels} input channels [B, {channels}, H, W], got "
                                f"shape {list(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise InvalidInputError(f"expected a batch of images [B, {channels}, H, W], got an empty "
                                f"batch (shape {list(x.shape)}): pass at least one image")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images, got {x.dtype}: convert with "
                        "x.float() / 255, then normalise (moat.create_transform does both)")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"the input is {x.dtype} but the model's weights are {weight.dtype}: "
                        f"use x.to({weight.dtype}) (or model.to({x.dtype}))")
    if x.device != weight.device:
        raise InvalidInputError(f"the input is on {x.device} but the model is on {weight.device}: "
                                f"use x.to({str(weight.device)!r})")
