"""The one loader: weights from any file or mapping into a model (``load_weights``), the
weights a model name stands for (``weights_file``) and the preprocessing they expect
(``data_config``). ``moat.create_model`` (``moat.models.factory``) builds on it.

Every load goes through ``moat.weights.adapt``: strict (a missing, unexpected or mis-shaped
tensor is an error listing them all, never a silently half-initialised model), with the
classifier kept, replaced (fine-tuning) or dropped (a model without one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moat.errors import InvalidInputError
from moat.weights.adapt import Adapted, load_into
from moat.weights.cache import pretrained_file
from moat.weights.catalogue import PRETRAINED, release
from moat.weights.convert import select_weights
from moat.weights.files import TORCH_SUFFIXES, load_state_dict, verify_sha256
from moat.weights.hub import is_hub_name, resolve
from moat.weights.official import load_official
from moat.weights.tf_checkpoint import TFCheckpoint
from moat.weights.variant import check_variant, model_variant

__all__ = ["data_config", "load_file", "load_tf_checkpoint", "load_weights", "weights_file"]


def load_file(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
              sha256: str | None = None, ema: bool = False, allow_missing_bn_stats: bool = False,
              classifier: str = "keep", extra: str = "error") -> Adapted:
    """``load_weights``, returning what ``moat.weights.adapt`` left out (a replaced or
    dropped classifier, unused tensors); ``classifier`` and ``extra`` are the adapter's."""
    options = dict(classifier=classifier)
    if isinstance(source, Mapping):
        return _load_state(model, source, "weights", extra=extra, **options)
    path = Path(source)
    if sha256:
        verify_sha256(path, sha256)
    if path.suffix == ".npz":
        return load_official(model, path, **options)
    if path.suffix in (".safetensors", *TORCH_SUFFIXES):
        state, meta = load_state_dict(path)
        if meta.variant:
            check_variant(model, meta.variant, meta.position_embedding, str(path))
        return _load_state(model, state, str(path), extra=extra, **options)
    with TFCheckpoint(path) as ckpt:
        weights = select_weights(ckpt, model, ema=ema,
                                 allow_missing_bn_stats=allow_missing_bn_stats)
        return load_official(model, weights, **options)


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                **options: Any) -> Adapted:
    if any(str(k).startswith("moat/") for k in state):  # official names, e.g. a TF export
        options.pop("extra")
        return load_official(model, {k: v.numpy() if isinstance(v, torch.Tensor) else v
                                     for k, v in state.items()}, **options)
    return load_into(model, state, source=source, **options)


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                 sha256: str | None = None, ema: bool = False,
                 allow_missing_bn_stats: bool = False) -> nn.Module:
    """Load weights from any supported file into ``model``, strictly; return the model.

    ``source``: a .safetensors file (ours, e.g. from ``moat convert``), a PyTorch state_dict,
    an .npz of official names, a TensorFlow checkpoint (released .tar.gz, prefix, .index or
    directory), or a mapping of tensors under our or official names. ``ema`` and
    ``allow_missing_bn_stats`` apply to TensorFlow checkpoints (see ``moat.weights.convert``).
    ``sha256`` is checked first. A model without a classifier ignores the weights' one.
    """
    load_file(model, source, sha256=sha256, ema=ema,
              allow_missing_bn_stats=allow_missing_bn_stats)
    return model


def load_tf_checkpoint(model: nn.Module, path: str | os.PathLike, *, ema: bool = False,
                       allow_missing_bn_stats: bool = False) -> nn.Module:
    """Load an official TensorFlow checkpoint (archive, prefix, .index or directory)."""
    return load_weights(model, path, ema=ema, allow_missing_bn_stats=allow_missing_bn_stats)


def weights_file(name: str, pretrained: bool = False, *, progress: bool | None = None) -> Path:
    """The weights file a model name stands for: a hub folder's, or with ``pretrained`` the
    cached release of a tag or variant (``--model NAME [--pretrained]`` on the command line)."""
    if is_hub_name(name):
        return resolve(name).weights
    if not pretrained:
        raise InvalidInputError(f"--model {name} names an architecture, not weights: add "
                                f"--pretrained for the released weights, or pass --checkpoint "
                                f"RUN_DIR/FILE")
    return pretrained_file(name, progress=progress)


def data_config(model_or_name: Any) -> dict[str, Any]:
    """Input size, interpolation, crop_pct, mean and std (0..1 scale) the weights expect."""
    if isinstance(model_or_name, str):
        cfg = resolve(model_or_name).pretrained_cfg if is_hub_name(model_or_name) \
            else release(model_or_name).data_config()
    else:
        cfg = getattr(model_or_name, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            tag = getattr(model_or_name, "pretrained_tag", None)
            variant = model_variant(model_or_name)
            if tag is None and variant.name == "?":
                raise InvalidInputError("cannot tell which MOAT variant this model is; pass a "
                                        "pretrained tag")
            cfg = PRETRAINED[tag].data_config() if tag else \
                release(variant.model_name).data_config()
    return {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]
            for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}
