"""Optimiser, parameter groups (weight decay, layer-wise lr decay), the warm-up + cosine
schedule and the EMA of weights. Frozen stages are the model's (`MoatNet.freeze_stages`, set
by the task that builds it): their parameters have no gradient and get no group here.

Parameter groups: weight decay applies to conv/linear kernels only; norms, biases (every
tensor with ndim <= 1) and relative-position tables (`no_weight_decay()` of any submodule)
get none. With layer-wise lr decay d, the backbone is cut into layers stem = 0, block i = i
(1..N, in forward order across all stages), and everything else (head, decoder) = N + 1;
layer l trains at lr * d^(N + 1 - l).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moat.errors import InvalidInputError


# --- parameter groups --------------------------------------------------------------------------

def no_weight_decay_ids(model: nn.Module) -> set[int]:
    """ids of parameters without weight decay: ndim <= 1 and every submodule's no_weight_decay()."""
    ids = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            params = dict(module.named_parameters())
            ids |= {id(params[n]) for n in names() if n in params}
    return ids


def backbone_layers(backbone: nn.Module | None) -> tuple[dict[int, int], int]:
    """({param id: layer id}, number of layers incl. the head layer) for a MoatNet backbone:
    stem 0, blocks 1..N in order; the head (layer N + 1) is everything not listed."""
    if backbone is None:
        return {}, 1
    layer_of: dict[int, int] = {}
    for p in backbone.stem.parameters():
        layer_of[id(p)] = 0
    layer = 0
    for stage in backbone.stages:
        for block in stage:
            layer += 1
            for p in block.parameters():
                layer_of[id(p)] = layer
    return layer_of, layer + 2


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 backbone: nn.Module | None = None) -> list[dict]:
    """Optimiser groups with keys params, weight_decay, lr_scale, name (trainable params only)."""
    skip_wd = no_weight_decay_ids(model)
    layer_of, num_layers = backbone_layers(backbone if layer_decay else None)
    head = num_layers - 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of.get(id(p), head)
        decay = id(p) not in skip_wd and weight_decay > 0
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (head - layer) if layer_decay else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale,
                           "name": f"layer{layer}_{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(p)
    if not groups:
        raise InvalidInputError("no trainable parameters: frozen_stages froze everything")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, config, backbone: nn.Module | None = None,
                    ) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay, config.layer_decay, backbone)
    lr = config.peak_lr
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(config.betas), eps=1e-8,
                                 weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    raise InvalidInputError(f"unknown optimizer {config.optimizer!r}")


# --- learning-rate schedule --------------------------------------------------------------------

@dataclass
class WarmupCosine:
    """Linear warm-up from warmup_lr to peak_lr over warmup_steps, then cosine to min_lr at
    total_steps. `lr(step)` is the rate of optimiser step `step` (0-based)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # The schedule is a pure function of the step; the stored values are a record only,
        # so a resumed run with more epochs stretches the cosine as configured now.
        pass


# --- EMA of weights ----------------------------------------------------------------------------

class ModelEma:
    """Exponential moving average of a model's state (parameters and float buffers).

    Decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs get a
    useful average too; integer buffers (BatchNorm counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        ema_state, state = self.module.state_dict(), model.state_dict()
        floats_e, floats_m = [], []
        for name, e in ema_state.items():
            m = state[name].detach()
            if e.is_floating_point():
                floats_e.append(e)
                floats_m.append(m.to(e.dtype))
            else:
                e.copy_(m)
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
