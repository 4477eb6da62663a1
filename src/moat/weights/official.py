"""Official TensorFlow variable names <-> our parameters, with the layout transposes.

The single source of truth for official naming (docs/architecture.md §6). Official q, k and
v projections are concatenated into our fused `qkv` layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moat.errors import InvalidInputError
from moat.models.layers import Attention
from moat.weights.adapt import Adapted, adapt_state_dict, load_into

BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
            "running_var": "moving_variance"}
LN_NAMES = {"weight": "gamma", "bias": "beta"}


@dataclass(frozen=True)
class OfficialTensor:
    """One of our tensors and the official variable(s) it comes from."""

    name: str                     # our state_dict key
    official: tuple[str, ...]     # official checkpoint names (3 for a fused qkv)
    layout: str                   # how to convert, see `_to_torch`


def _to_torch(layout: str, arrays: list[np.ndarray]) -> np.ndarray:
    a = arrays[0]
    if layout == "conv":          # [kh, kw, in, out] -> [out, in, kh, kw]
        return a.transpose(3, 2, 0, 1)
    if layout == "depthwise":     # [kh, kw, C, 1] -> [C, 1, kh, kw]
        return a.transpose(2, 3, 0, 1)
    if layout == "head":          # [1, 1, C, classes] -> [classes, C]
        return a[0, 0].T
    if layout == "qkv_weight":    # 3 x [C, heads, 32] -> [3 * heads * 32, C]
        return np.concatenate([w.reshape(w.shape[0], -1).T for w in arrays])
    if layout == "qkv_bias":      # 3 x [heads, 32] -> [3 * heads * 32]
        return np.concatenate([b.reshape(-1) for b in arrays])
    if layout == "o_weight":      # [heads, 32, C] -> [C, heads * 32]
        return a.reshape(-1, a.shape[-1]).T
    return a


def _to_tf(layout: str, tensor: np.ndarray, parts: int) -> list[np.ndarray]:
    """Inverse of `_to_torch`: our tensor -> the official array(s)."""
    if layout == "conv":
        return [tensor.transpose(2, 3, 1, 0)]
    if layout == "depthwise":
        return [tensor.transpose(2, 3, 0, 1)]
    if layout == "head":
        return [tensor.T[None, None]]
    if layout == "qkv_weight":
        return [w.T.reshape(w.shape[1], -1, 32) for w in np.split(tensor, parts)]
    if layout == "qkv_bias":
        return [b.reshape(-1, 32) for b in np.split(tensor, parts)]
    if layout == "o_weight":
        return [tensor.T.reshape(-1, 32, tensor.shape[0])]
    return [tensor]


def _official_scope(module_name: str) -> str:
    """'stages.2.3.se.reduce' -> 'moat/block_02_03/se/reduce_conv2d'."""
    parts = module_name.split(".")
    if parts[0] == "stages" and len(parts) >= 3:
        parts = [f"block_{int(parts[1]):02d}_{int(parts[2]):02d}"] + parts[3:]
    renames = {"reduce": "reduce_conv2d", "expand": "expand_conv2d"}
    if "se" in parts:
        parts = [renames.get(p, p) for p in parts]
    return "/".join(["moat"] + parts)


def official_tensors(model: nn.Module) -> list[OfficialTensor]:
    """Every parameter and BN statistic of `model` with its official source."""
    entries: list[OfficialTensor] = []
    for module_name, module in model.named_modules():
        scope = _official_scope(module_name)

        def add(attr: str, official: str | tuple[str, ...], layout: str = "as_is") -> None:
            names = (official,) if isinstance(official, str) else official
            entries.append(OfficialTensor(f"{module_name}.{attr}",
                                          tuple(f"{scope}/{n}" for n in names), layout))

        if isinstance(module, nn.BatchNorm2d):
            for ours, theirs in BN_NAMES.items():
                add(ours, theirs)
        elif isinstance(module, nn.LayerNorm):
            for ours, theirs in LN_NAMES.items():
                add(ours, theirs)
        elif isinstance(module, Attention):
            add("qkv.weight", ("q/weight", "k/weight", "v/weight"), "qkv_weight")
            add("qkv.bias", ("q/bias", "k/bias", "v/bias"), "qkv_bias")
            add("proj.weight", "o/weight", "o_weight")
            add("proj.bias", "o/bias")
            if module.relative_position_embedding is not None:
                add("relative_position_embedding", "relative_position_embedding")
        elif isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1
            add("weight", "depthwise_kernel" if depthwise else "kernel",
                "depthwise" if depthwise else "conv")
            if module.bias is not None:
                add("bias", "bias")
        elif isinstance(module, nn.Linear) and \
                module_name == getattr(model, "classifier_module", None):
            add("weight", "kernel", "head")
            add("bias", "bias")
    return entries


def _read_source(source: Mapping[str, np.ndarray] | str | os.PathLike) -> Mapping[str, np.ndarray]:
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    if not path.endswith(".npz"):
        raise InvalidInputError(f"{path}: load_official_weights reads a mapping or an .npz of "
                                f"official names; for TensorFlow checkpoints use "
                                f"moat.weights.load_weights")
    with np.load(path, allow_pickle=False) as data:
        return dict(data)


def _our_names(model: nn.Module, arrays: Mapping[str, np.ndarray],
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict under our names, our name -> official names) for `moat.weights.adapt`.

    Official arrays no tensor of `model` reads stay under their own names (so the adapter
    reports them as unexpected), except those of a head the model lacks: those take the
    head's name, so the adapter drops them as it drops any classifier the model has no
    place for."""
    state, labels, used = {}, {}, set()
    for entry in official_tensors(model):
        labels[entry.name] = " + ".join(entry.official)
        if all(n in arrays for n in entry.official):
            used.update(entry.official)
            value = _to_torch(entry.layout, [np.asarray(arrays[n]) for n in entry.official])
            state[entry.name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    present = {name.split(".", 1)[0] for name in labels}
    heads = {_official_scope(m) + "/": m for m in getattr(model, "head_modules", ())
             if m not in present}
    for name in arrays:
        if name not in used:
            scope = next((s for s in heads if name.startswith(s)), None)
            key = f"{heads[scope]}.{name[len(scope):]}" if scope else name
            state[key], labels[key] = torch.empty(np.shape(arrays[name]), device="meta"), name
    return state, labels


def official_state_dict(model: nn.Module, source: Mapping[str, np.ndarray] | str | os.PathLike,
                        *, classifier: str = "keep") -> dict[str, torch.Tensor]:
    """Convert official arrays into `model`'s state_dict layout, checking every name and shape.

    Raises one InvalidInputError listing every missing, unexpected and mis-shaped name, in official
    terms. The head is kept, replaced (`classifier="new"`) or dropped as
    `moat.weights.adapt` decides.
    """
    state, labels = _our_names(model, _read_source(source))
    return adapt_state_dict(model, state, source="official weights", classifier=classifier,
                            labels=labels).state


def load_official(model: nn.Module, source: Mapping[str, np.ndarray] | str | os.PathLike,
                  *, classifier: str = "keep") -> Adapted:
    """`official_state_dict`, copied into `model`; returns what the adapter left out."""
    state, labels = _our_names(model, _read_source(source))
    return load_into(model, state, source="official weights", classifier=classifier,
                     labels=labels)


def load_official_weights(model: nn.Module,
                          source: Mapping[str, np.ndarray] | str | os.PathLike) -> nn.Module:
    """Load official TF-named, TF-layout arrays (a mapping or an .npz) into `model`, strictly."""
    load_official(model, source)
    return model


def to_official(model: nn.Module) -> dict[str, np.ndarray]:
    """`model`'s weights under official names and layouts (the inverse of loading)."""
    own = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    arrays = {}
    for entry in official_tensors(model):
        for name, value in zip(entry.official, _to_tf(entry.layout, own[entry.name],
                                                       len(entry.official))):
            arrays[name] = np.ascontiguousarray(value)
    return arrays
