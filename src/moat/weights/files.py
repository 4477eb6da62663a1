"""Reading and writing weights files safely: safetensors with a header, never arbitrary pickles.

* Weights moat writes are **safetensors** files: plain tensors plus the header of
  ``metadata.WeightsMetadata`` and the sha256 and byte count of their tensors, checked on
  load (``moat.integrity``). Loading one runs no code. They are written to a temporary name
  and renamed, so a crash never leaves a half-written file under the real name.
* Plain PyTorch files (``.pt``/``.pth``/``.bin``) are loaded only with
  ``torch.load(..., weights_only=True)``, which refuses anything but tensors and
  containers. Arbitrary pickles are never loaded; convert them yourself if you trust them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from moat.integrity import file_sha256, read_safetensors, save_safetensors
from moat.weights.metadata import WeightsMetadata

TORCH_SUFFIXES = (".pt", ".pth", ".bin")

__all__ = ["TORCH_SUFFIXES", "load_state_dict", "save_weights", "verify_sha256"]


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Refuse a file whose sha256 differs (a broken download or the wrong file)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not Path(path).is_file():
        raise ValueError(f"sha256 can only be checked for a single file, not {path}; pass the "
                         "archive or .safetensors file, or drop sha256")
    actual = file_sha256(path)
    if actual != expected.lower():
        raise ValueError(f"{path}: sha256 is {actual}, expected {expected}; the file is "
                         "corrupted or not the expected release: download it again")


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                 metadata: WeightsMetadata | None = None) -> Path:
    """Write a safetensors file; a crash never leaves a half-written file under ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are saved as .safetensors only")
    # the header also gets the tensors' sha256 and size, verified by load_state_dict
    save_safetensors(path, state, (metadata or WeightsMetadata()).to_header())
    return path


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], WeightsMetadata]:
    """Tensors and header of a .safetensors file, or of a PyTorch file loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        tensors, header = read_safetensors(path)  # verified against the tensors' sha256
        return tensors, WeightsMetadata.from_header(header)
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, MemoryError):  # the disk or the machine, not the file's content
            raise
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
        return obj, WeightsMetadata()
    raise ValueError(f"{path}: unknown weights format; use .safetensors, .pt/.pth/.bin, .npz "
                     "or a TensorFlow checkpoint")
