"""Model names -> builders. The variant table lives in `config.py`; this only builds."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from moat.errors import InvalidInputError
from moat.models.config import MODEL_CONFIGS
from moat.models.moat import MoatNet, Window


def list_models(pattern: str = "*") -> list[str]:
    """Names of the MOAT variants matching a shell-style pattern, e.g. 'tiny_*'."""
    return [name for name in MODEL_CONFIGS if fnmatch.fnmatch(name, pattern)]


def build_model(
    name: str,
    *,
    num_classes: int = 1000,
    position_embedding: bool = True,
    window_size: Sequence[Window | int | None] | None = None,
    global_attention_at_end: bool = False,
    pool_size: int = 2,
    drop_path_rate: float | None = None,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
) -> MoatNet:
    """Build a MOAT variant with official initialisation (the architecture only).

    `moat.create_model` is the public entry point: it takes tags, weights and hub folders
    as well, and calls this.

    Args:
        name: one of `list_models()`, e.g. "moat_0" or "tiny_moat_2".
        num_classes: classifier outputs; 0 for pooled features.
        position_embedding: False builds the official "no PE" variant.
        window_size: None for global attention everywhere, or one entry per stage
            (4 entries; MBConv stages must be None), each None, N or (h, w).
        global_attention_at_end: the last block of each MOAT stage attends globally.
        pool_size: shortcut average-pool size: 2 (classification) or 3 (official
            downstream default).
        drop_path_rate: stochastic depth of the last block; None takes the official
            per-variant default (MOAT-0: 0.2, ..., tiny-MOAT-0: 0).
        in_chans: input channels.
        features_only: return a list of feature maps instead of logits.
        out_indices: with features_only, which of stage1..stage5 (0..4) to return.
    """
    if name not in MODEL_CONFIGS:
        raise InvalidInputError(f"unknown model {name!r}; choose one of {list_models()}")
    return MoatNet(
        MODEL_CONFIGS[name], num_classes=num_classes, in_chans=in_chans,
        position_embedding=position_embedding, window_size=window_size,
        global_attention_at_end=global_attention_at_end, pool_size=pool_size,
        drop_path_rate=drop_path_rate, features_only=features_only, out_indices=out_indices,
    )
