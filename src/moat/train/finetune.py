"""Fine-tuning: weights from anywhere (our run or checkpoint folder, a weights file, official
weights) into a model whose head may differ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moat.errors import InvalidInputError
from moat.train.checkpoint import resolve_checkpoint
from moat.train.checkpoint_folder import is_complete, read_weights, read_weights_file
from moat.weights.files import TORCH_SUFFIXES
from moat.weights.loader import load_file

_PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, a dense task's model


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        out[name] = value
    return out


def load_pretrained(model: nn.Module, path: str | os.PathLike,
                    backbone: nn.Module | None = None) -> str:
    """Load weights for fine-tuning into `backbone` (a MoatNet inside `model`; `model` if None).

    Sources: a run directory or checkpoint folder (its preferred weights), a .safetensors or
    PyTorch state dict (ours, loaded safely), or official weights (TensorFlow checkpoint,
    .tar.gz, .npz). Through `moat.weights.adapt` with a new classifier allowed: one of
    another number of classes stays freshly initialised, tensors the model lacks (another
    task's decoder) are unused, and any other missing tensor is an error (wrong variant).
    Position tables need no resizing: they are resized to the input at forward time.
    """
    target = backbone if backbone is not None else model
    path = Path(path)
    if not path.exists() and not str(path).endswith((".tar.gz", ".index")):
        # a TensorFlow checkpoint prefix (model-ckpt-0) has no file of its own
        if not Path(str(path) + ".index").exists():
            raise FileNotFoundError(f"--init-from {str(path)!r} does not exist")
    ours = path.is_dir() and (is_complete(path) or (path / "checkpoints").is_dir()
                              or path.name == "checkpoints")
    source: Any = path
    if ours:
        state, which = read_weights(resolve_checkpoint(path))
        source, name = _strip_prefixes(state), f"{path} ({which} weights)"
    elif path.suffix in (".safetensors", *TORCH_SUFFIXES):
        source, name = _strip_prefixes(read_weights_file(path)), str(path)
    else:
        name = f"official weights {path}"
    try:
        adapted = load_file(target, source, classifier="new", extra="ignore")
    except ValueError as err:
        raise InvalidInputError(f"--init-from {name}: {err}\nCheck --model (the variant must "
                                "match the weights).") from None
    head = f", classifier re-initialised ({adapted.replaced[0]})" if adapted.replaced else ""
    unused = len(adapted.unused)
    return (f"initialised {len(adapted.state)} tensors from {name}{head}"
            + (f", {unused} tensors of the source unused" if unused else ""))
