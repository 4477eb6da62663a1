"""``moat info``: what a TensorFlow checkpoint or a weights file holds."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open

from moat.integrity import DamagedFileError
from moat.paths import regular_file
from moat.weights.catalogue import find
from moat.weights.convert import BN_STATISTICS, EMA_SUFFIX, classify_variables
from moat.weights.metadata import WeightsMetadata
from moat.weights.official import official_tensors
from moat.weights.tf_checkpoint import TFCheckpoint
from moat.weights.variant import Variant, detect_variant

__all__ = ["checkpoint_info", "describe", "format_info"]


def checkpoint_info(path: str | os.PathLike) -> dict[str, object]:
    """What a TensorFlow checkpoint holds: variant, dtypes, EMA, BN statistics, slots."""
    with TFCheckpoint(path) as ckpt:
        found = classify_variables(ckpt.keys())
        # Official name -> shape, from the raw weights or else (an EMA-only file) the copies.
        shapes = ({n: ckpt.shape(n) for n in found.weights}
                  or {n: ckpt.shape(n + EMA_SUFFIX) for n in found.ema})
        names = set(shapes)
        stats: tuple[int, int] | None = None
        try:
            variant: Variant | str = detect_variant(shapes, str(path))
            expected = [n for e in official_tensors(variant.meta_model()) for n in e.official
                        if n.endswith(BN_STATISTICS)]
            stats = (sum(n in names for n in expected), len(expected))
        except ValueError as err:
            variant = f"unknown ({err})"
        slots = sorted({"TF2 slot" if ".OPTIMIZER_SLOT" in n else
                        re.sub(r"_\d+$", "", n.rsplit("/", 1)[-1]) for n in found.optimizer_slots})
        return {
            "path": str(ckpt.path),
            "variant": variant,
            "tensors": len(ckpt),
            "skipped": ckpt.skipped,
            "dtypes": dict(Counter(ckpt.dtype(n) for n in ckpt)),
            "weights": len(found.weights),
            "ema_copies": len(found.ema),
            "bn_statistics": stats,
            "optimizer_slots": len(found.optimizer_slots),
            "optimizer_slot_kinds": slots,
            "other": found.other,
        }


def format_info(info: Mapping[str, object]) -> str:
    """The report ``moat info`` prints."""
    variant = info["variant"]
    lines = [f"checkpoint:       {info['path']}"]
    if isinstance(variant, Variant):
        lines += [f"variant:          {variant.name}",
                  f"position embed.:  {'yes' if variant.position_embedding else 'no'}",
                  f"classes:          {variant.num_classes or 'no classifier'}",
                  f"release tag:      {find(variant.name, variant.position_embedding).tag}"]
    else:
        lines.append(f"variant:          {variant}")
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items()))
    stats = "unknown"
    if info["bn_statistics"] is not None:
        have, total = info["bn_statistics"]
        verdict = "present" if have == total else \
            "MISSING: predictions would be wrong" if have == 0 else "INCOMPLETE"
        stats = f"{have} of {total} ({verdict})"
    lines += [f"tensors:          {info['tensors']} ({dtypes})",
              f"weights:          {info['weights']}",
              f"EMA copies:       {info['ema_copies'] or 'none'}",
              f"BN statistics:    {stats}",
              f"optimizer slots:  {info['optimizer_slots'] or 'none'}"
              + (f" ({', '.join(info['optimizer_slot_kinds'])})" if info["optimizer_slots"]
                 else "")]
    if info["other"]:
        lines.append(f"other variables:  {', '.join(info['other'])}")
    for name, reason in info["skipped"].items():
        lines.append(f"skipped:          {name} ({reason})")
    return "\n".join(lines)


def describe(path: str | os.PathLike) -> str:
    """``moat info``: a TensorFlow checkpoint's contents, or a .safetensors file's metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return format_info(checkpoint_info(path))
    regular_file(path, "weights file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            dtypes = Counter(str(f.get_slice(k).get_dtype()) for k in f.keys())
            count = len(list(f.keys()))
    except SafetensorError as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    lines = [f"weights file:     {path}",
             f"tensors:          {count} ({', '.join(f'{k} x{v}' for k, v in dtypes.items())})"]
    for key, value in sorted(meta.items()):
        if key == "label_names":  # a thousand names would bury the rest
            names = WeightsMetadata.from_header({key: value}).label_names or []
            value = f"{len(names)} ({', '.join(names[:3])}, ...)"
        lines.append(f"{key + ':':<20}{value}")
    if not meta:
        lines.append("metadata:         none (not written by moat convert)")
    return "\n".join(lines)
