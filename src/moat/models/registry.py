"""Model names -> builders. The variant table lives in `config.py`; this only builds."""

from __future__ import annotations

import fnmatch
from typing import Any

from moat.errors import InvalidInputError
from moat.models.config import MODEL_CONFIGS
from moat.models.moat import MoatNet


def list_models(pattern: str = "*") -> list[str]:
    """Names of the MOAT variants matching a shell-style pattern, e.g. 'tiny_*'."""
    return [name for name in MODEL_CONFIGS if fnmatch.fnmatch(name, pattern)]


def build_model(name: str, **kwargs: Any) -> MoatNet:
    """Build a MOAT variant with official initialisation (the architecture only).

    `moat.create_model` is the public entry point: it takes tags, weights and hub folders
    as well, and calls this. `name`: one of `list_models()`, e.g. "moat_0" or "tiny_moat_2";
    the keywords are `MoatNet`'s (num_classes, position_embedding, window_size, ...).
    """
    if name not in MODEL_CONFIGS:
        raise InvalidInputError(f"unknown model {name!r}; choose one of {list_models()}")
    return MoatNet(MODEL_CONFIGS[name], **kwargs)
