"""Saving and loading weights safely: safetensors with metadata, never arbitrary pickles.

Rules:

* Converted and saved weights are **safetensors** files: plain tensors plus a string
  metadata header (variant, position embedding, native resolution, input normalisation,
  source file and its sha256, converter/moat/torch versions). Loading one runs no code.
* Plain PyTorch files (``.pt``/``.pth``/``.bin``) are loaded only with
  ``torch.load(..., weights_only=True)``, which refuses anything but tensors and
  containers. Arbitrary pickles are never loaded; convert them yourself if you trust them.
* ``.npz`` archives are read with ``allow_pickle=False``.
* Everything else is treated as a TensorFlow checkpoint (``moat.weights.convert``).

Every load is strict: a missing, unexpected or mis-shaped tensor is an error listing them
all, never a silently half-initialised model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moat.integrity import DamagedFileError, atomic_write_bytes, read_safetensors, \
    safetensors_bytes

CONVERTER_VERSION = "1"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
HEAD_PREFIXES = ("logits_head.", "final_layer_norm.")

__all__ = ["CONVERTER_VERSION", "load_state_dict", "load_weights", "read_metadata",
           "save_weights", "sha256sum", "verify_sha256", "weights_metadata"]


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Refuse a file whose sha256 differs (a broken download or the wrong file)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not Path(path).is_file():
        raise ValueError(f"sha256 can only be checked for a single file, not {path}; pass the "
                         "archive or .safetensors file, or drop sha256")
    actual = sha256sum(path)
    if actual != expected.lower():
        raise ValueError(f"{path}: sha256 is {actual}, expected {expected}; the file is "
                         "corrupted or not the expected release: download it again")


def weights_metadata(variant: str, position_embedding: bool, num_classes: int,
                     **extra: Any) -> dict[str, str]:
    """Metadata stored with converted weights: enough to build, feed and trace the model."""
    from moat import __version__
    from moat.weights.zoo import find

    release = find(variant, position_embedding)
    config = release.data_config()
    meta = {
        "format": "moat", "variant": variant, "position_embedding": position_embedding,
        "num_classes": num_classes, "pretrained_tag": release.tag,
        "native_resolution": release.resolution, "input_range": "0..1 RGB",
        "mean": config["mean"], "std": config["std"],
        "interpolation": config["interpolation"], "crop_pct": config["crop_pct"],
        "converter_version": CONVERTER_VERSION, "moat_version": __version__,
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        **extra,
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically, its tensors' sha256 and size in the metadata
    (verified by `load_state_dict`); a crash never leaves a half-written file under ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are saved as .safetensors only")
    atomic_write_bytes(path, safetensors_bytes(state, metadata))
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, or of a PyTorch file loaded safely."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the unpickler raises many types; all mean "not weights"
            # Not the unpickler's own text: it suggests weights_only=False, i.e. running code.
            raise ValueError(f"{path}: not a plain PyTorch weights file ({type(err).__name__}: "
                             "damaged, or a pickle of more than tensors). Only tensors are "
                             "loaded (weights_only=True); arbitrary pickles are refused. "
                             "Convert the file to .safetensors if you trust it") from None
        for key in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in obj.values()):
            raise ValueError(f"{path}: expected a dict of tensors (a state_dict)")
        return obj, {}
    raise ValueError(f"{path}: unknown weights format; use .safetensors, .pt/.pth/.bin, .npz "
                     "or a TensorFlow checkpoint")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights",
               ) -> None:
    """Copy our-named tensors into ``model`` strictly (classifier ignored if it has none)."""
    own = model.state_dict()
    expected = {k for k in own if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - state.keys())
    unexpected = sorted(k for k in state if k not in own and not k.startswith(HEAD_PREFIXES))
    misshaped = sorted(f"{k}: file {list(v.shape)}, model {list(own[k].shape)}"
                       for k, v in state.items() if k in own and v.shape != own[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit this model:"]
        for title, names in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", misshaped)):
            if names:
                lines += [f"  {title} ({len(names)}):"] + [f"    {n}" for n in names[:20]]
                lines += [f"    ... and {len(names) - 20} more"] if len(names) > 20 else []
        lines.append("Create the model with the variant, position_embedding and num_classes "
                     "the weights were saved with (see `moat info FILE`).")
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_weights(model: nn.Module, path: str | os.PathLike, *, sha256: str | None = None,
                 ema: bool = False, allow_missing_bn_stats: bool = False) -> nn.Module:
    """Load weights from any supported file into ``model``, strictly; return the model.

    ``path``: a .safetensors file (ours, e.g. from ``moat convert``), a PyTorch state_dict,
    an .npz of official names, or a TensorFlow checkpoint (released .tar.gz, prefix,
    .index or directory). ``ema`` and ``allow_missing_bn_stats`` apply to TensorFlow
    checkpoints (see ``moat.weights.convert``). ``sha256`` is checked first.
    """
    from moat.weights import convert

    path = Path(path)
    if sha256:
        verify_sha256(path, sha256)
    if path.suffix == ".npz":
        from moat.weights.official import load_official_weights

        return load_official_weights(model, path)
    if path.suffix in (".safetensors", *TORCH_SUFFIXES):
        if not path.is_file():
            raise FileNotFoundError(f"no such weights file: {path}")
        state, meta = load_state_dict(path)
        if "variant" in meta:
            convert.check_variant(model, meta["variant"], json.loads(meta["position_embedding"]),
                                  str(path))
        if any(k.startswith("moat/") for k in state):  # official names, e.g. a TF export
            from moat.weights.official import load_official_weights

            return load_official_weights(model, {k: v.numpy() for k, v in state.items()})
        load_state(model, state, str(path))
        return model
    return convert.load_tf_checkpoint(model, path, ema=ema,
                                      allow_missing_bn_stats=allow_missing_bn_stats)
