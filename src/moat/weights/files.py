"""Reading and writing weights files safely: safetensors with a header, never arbitrary pickles.

* Weights moat writes are **safetensors** files: plain tensors plus the header of
  ``metadata.WeightsMetadata``. Loading one runs no code. They are written to a temporary
  name and renamed, so a crash never leaves a half-written file under the real name.
* Plain PyTorch files (``.pt``/``.pth``/``.bin``) are loaded only with
  ``torch.load(..., weights_only=True)``, which refuses anything but tensors and
  containers. Arbitrary pickles are never loaded; convert them yourself if you trust them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moat.weights.metadata import WeightsMetadata

TORCH_SUFFIXES = (".pt", ".pth", ".bin")

__all__ = ["TORCH_SUFFIXES", "load_state_dict", "save_weights", "sha256sum", "verify_sha256"]


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


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                 metadata: WeightsMetadata | None = None) -> Path:
    """Write a safetensors file; a crash never leaves a half-written file under ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are saved as .safetensors only")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).contiguous()
               for k, v in state.items()}
    try:
        save_file(tensors, partial, metadata=(metadata or WeightsMetadata()).to_header())
        os.chmod(partial, 0o644)  # safetensors creates files readable by their owner only
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], WeightsMetadata]:
    """Tensors and header of a .safetensors file, or of a PyTorch file loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        return load_file(path), WeightsMetadata.read(path)
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the unpickler raises many types; all mean "not weights"
            raise ValueError(f"{path}: not a plain PyTorch weights file ({err}). Only tensors "
                             "are loaded (weights_only=True); arbitrary pickles are refused. "
                             "Convert the file to .safetensors if you trust it") from err
        for key in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in obj.values()):
            raise ValueError(f"{path}: expected a dict of tensors (a state_dict)")
        return obj, WeightsMetadata()
    raise ValueError(f"{path}: unknown weights format; use .safetensors, .pt/.pth/.bin, .npz "
                     "or a TensorFlow checkpoint")
