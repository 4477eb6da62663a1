"""Official TensorFlow checkpoints -> MOAT models and .safetensors files.

What is read from a checkpoint (the official names and layouts are in ``official.py``):

* **Raw weights by default**, as the official deeplab2 loader does. ``ema=True`` takes each
  variable's ``<name>/ExponentialMovingAverage`` copy where the checkpoint has one and the
  raw value otherwise (BatchNorm statistics usually have no EMA copy).
* Optimizer slots (``<name>/Momentum``, ``/Adam``, ``/RMSProp``, ``.OPTIMIZER_SLOT``, ...)
  and bookkeeping (``global_step``, ...) are ignored; ``moat info`` lists them.
* The variant, position embedding and number of classes are detected from the stored
  names and shapes (stem width, blocks and width per stage) and must match the model.
* **BatchNorm moving statistics are required.** Without them every BatchNorm normalises
  with mean 0 / variance 1 and the network predicts nearly every class wrong, which is what
  happened with the first official release. ``allow_missing_bn_stats=True`` loads such a
  checkpoint anyway (statistics 0/1) with a loud warning, e.g. to re-estimate them.

Conversion streams tensors from the memory-mapped checkpoint into one state dict (the only
full copy in memory) and writes it as safetensors with metadata (see ``io.py``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moat.integrity import DamagedFileError
from moat.models import MODEL_CONFIGS
from moat.weights.official import official_state_dict, official_tensors
from moat.weights.tf_checkpoint import TFCheckpoint

EMA_SUFFIX = "/ExponentialMovingAverage"
BN_STATISTICS = ("/moving_mean", "/moving_variance")
_BLOCK = re.compile(r"^moat/block_(\d+)_(\d+)/")

__all__ = ["CheckpointVariables", "MissingBatchNormStatisticsWarning", "OfficialWeights",
           "Variant", "check_variant", "checkpoint_info", "classify_variables",
           "convert_checkpoint", "describe", "detect_variant", "format_info",
           "load_tf_checkpoint", "official_keys", "select_weights"]


class MissingBatchNormStatisticsWarning(UserWarning):
    """Weights were loaded without BatchNorm moving statistics: predictions will be wrong."""


# --- what is in a checkpoint ------------------------------------------------------------


@dataclass
class CheckpointVariables:
    """The names of a checkpoint, sorted into what they are."""

    weights: list[str] = field(default_factory=list)  # raw official names: moat/...
    ema: list[str] = field(default_factory=list)  # official names that have an EMA copy
    optimizer_slots: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # global_step, learning rate, ...


def classify_variables(names: Iterable[str]) -> CheckpointVariables:
    """Sort checkpoint names into raw weights, EMA copies, optimizer slots and the rest.

    A slot is recognised by its parent being a variable (``.../kernel/Momentum``) rather
    than by a list of optimizer names, so any TF1 optimizer is covered.
    """
    names = set(names)
    out = CheckpointVariables()
    for name in sorted(names):
        if name.endswith(EMA_SUFFIX) and name.startswith("moat/"):
            out.ema.append(name[:-len(EMA_SUFFIX)])
        elif ".OPTIMIZER_SLOT" in name or ("/" in name and name.rsplit("/", 1)[0] in names):
            out.optimizer_slots.append(name)
        elif name.startswith("moat/"):
            out.weights.append(name)
        else:
            out.other.append(name)
    return out


@dataclass(frozen=True)
class Variant:
    name: str
    position_embedding: bool
    num_classes: int  # 0: the checkpoint has no classifier

    def __str__(self) -> str:
        pe = "with" if self.position_embedding else "without"
        return f"{self.name} ({pe} position embedding)"

    def meta_model(self) -> nn.Module:
        """The model these weights fit, on the meta device (names and shapes, no memory)."""
        from moat.models import create_model

        with torch.device("meta"):
            return create_model(self.name, num_classes=self.num_classes,
                                position_embedding=self.position_embedding)


def detect_variant(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> Variant:
    """Which MOAT variant official-named ``shapes`` belong to, from the config table.

    The stem width, the number of blocks per stage and each stage's width identify a
    variant uniquely; the full name-by-name shape check happens when loading.
    """
    stem = shapes.get("moat/stem/conv_0/kernel")
    depth: Counter[int] = Counter()
    for stage, block in {tuple(map(int, m.groups())) for n in shapes if (m := _BLOCK.match(n))}:
        depth[stage] += 1
    num_stages = max(depth, default=-1) + 1
    widths = tuple(shapes.get(f"moat/block_{s:02d}_00/shrink_conv/bias", (0,))[0]
                   for s in range(num_stages))
    blocks = tuple(depth[s] for s in range(num_stages))
    if stem is None or not blocks:
        raise ValueError(f"{source}: no official MOAT variables (moat/stem/conv_0/kernel, "
                         "moat/block_XX_YY/...) found; this is not a MOAT checkpoint in the "
                         "released (TF1 name-based) format")
    for name, cfg in MODEL_CONFIGS.items():
        if (cfg.stem_size[0], cfg.num_blocks, cfg.hidden_size) == (stem[-1], blocks, widths):
            pe = any(n.endswith("attention/relative_position_embedding") for n in shapes)
            head = shapes.get("moat/logits_head/kernel")
            return Variant(name, pe, head[-1] if head else 0)
    raise ValueError(f"{source}: stem width {stem[-1]}, blocks {blocks} and widths {widths} match "
                     f"no MOAT variant ({', '.join(MODEL_CONFIGS)})")


def model_variant(model: nn.Module) -> Variant:
    """The variant a model was built as (name '?' for a custom configuration)."""
    cfg = getattr(model, "cfg", None)
    name = next((n for n, c in MODEL_CONFIGS.items() if c == cfg), "?")
    pe = any(n.endswith("relative_position_embedding") for n, _ in model.named_parameters())
    return Variant(name, pe, getattr(model, "num_classes", 0))


def check_variant(model: nn.Module, variant: str, position_embedding: bool, source: str) -> None:
    """Refuse weights of another variant with a message naming both (not 60 shape errors)."""
    from moat.weights.zoo import find

    ours = model_variant(model)
    if ours.name == "?" or (ours.name, ours.position_embedding) == (variant, position_embedding):
        return  # a custom configuration is checked name by name when loading
    theirs = Variant(variant, position_embedding, 0)
    tag = find(variant, position_embedding).tag
    raise ValueError(f"{source} holds {theirs}, but the model is {ours}: build it with "
                     f"moat.create_model({tag!r}) or pick the weights of {ours.name}")


# --- selecting the tensors a model needs ------------------------------------------------


class OfficialWeights(Mapping[str, np.ndarray]):
    """Official name -> array, read lazily from the checkpoint (raw or EMA copy).

    Missing BatchNorm statistics allowed by the caller read as 0 (mean) / 1 (variance).
    """

    def __init__(self, ckpt: TFCheckpoint, keys: dict[str, str],
                 defaults: dict[str, np.ndarray]) -> None:
        self._ckpt, self._keys, self._defaults = ckpt, keys, defaults

    @property
    def filled_bn_statistics(self) -> list[str]:
        return list(self._defaults)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._defaults:
            return self._defaults[name]
        return self._ckpt.read(self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter([*self._keys, *self._defaults])

    def __len__(self) -> int:
        return len(self._keys) + len(self._defaults)


def official_keys(ckpt: TFCheckpoint, ema: bool = False) -> tuple[dict[str, str], Variant]:
    """Official name -> checkpoint key to read (raw or EMA copy), and the detected variant."""
    source = str(ckpt.source)
    found = classify_variables(ckpt.keys())
    if ema and not found.ema:
        raise ValueError(f"{source} has no ExponentialMovingAverage copies; load it without "
                         "ema=True (--ema)")
    if not found.weights and found.ema and not ema:
        raise ValueError(f"{source} holds only ExponentialMovingAverage copies; load it with "
                         "ema=True (--ema)")
    keys = {n: n for n in found.weights}
    if ema:
        keys.update({n: n + EMA_SUFFIX for n in found.ema})
    return keys, detect_variant({n: ckpt.shape(k) for n, k in keys.items()}, source)


def select_weights(ckpt: TFCheckpoint, model: nn.Module, *, ema: bool = False,
                   allow_missing_bn_stats: bool = False) -> OfficialWeights:
    """Check ``ckpt`` against ``model`` and pick the tensor to read for each official name."""
    source = str(ckpt.source)
    keys, variant = official_keys(ckpt, ema)
    check_variant(model, variant.name, variant.position_embedding, source)
    expected = [n for e in official_tensors(model) for n in e.official]
    missing_stats = [n for n in expected if n.endswith(BN_STATISTICS) and n not in keys]
    defaults = {}
    if missing_stats:
        total = sum(n.endswith(BN_STATISTICS) for n in expected)
        message = (
            f"{source} lacks {len(missing_stats)} of {total} BatchNorm moving statistics "
            "(moving_mean/moving_variance). Without them every BatchNorm uses mean 0 and "
            "variance 1 and the model predicts nearly every class wrong: the first official "
            "MOAT release had exactly this defect")
        if not allow_missing_bn_stats:
            raise ValueError(message + ". Download the current release; pass "
                             "allow_missing_bn_stats=True (--allow-missing-bn-stats) only to "
                             "re-estimate the statistics yourself")
        warnings.warn(message + "; loading with statistics 0/1 as requested. Re-estimate them "
                      "(forward passes in train mode) before trusting any prediction",
                      MissingBatchNormStatisticsWarning, stacklevel=3)
        for name in missing_stats:
            channels = ckpt.shape(keys[name.rsplit("/", 1)[0] + "/gamma"])
            fill = np.zeros if name.endswith("moving_mean") else np.ones
            defaults[name] = fill(channels, np.float32)
    return OfficialWeights(ckpt, keys, defaults)


# --- loading and converting -------------------------------------------------------------


@torch.no_grad()
def load_tf_checkpoint(model: nn.Module, path: str | os.PathLike, *, ema: bool = False,
                       allow_missing_bn_stats: bool = False) -> nn.Module:
    """Load an official TensorFlow checkpoint (archive, prefix, .index or directory)."""
    from moat.weights.io import load_state

    with TFCheckpoint(path) as ckpt:
        weights = select_weights(ckpt, model, ema=ema,
                                 allow_missing_bn_stats=allow_missing_bn_stats)
        load_state(model, official_state_dict(model, weights), str(path))
    return model


def _source_fingerprint(ckpt: TFCheckpoint) -> tuple[str, str]:
    """(file name, sha256) identifying the source: the archive, else the .index file.

    The index holds every tensor's crc32c, so its hash identifies the weights too.
    """
    from moat.weights.io import sha256sum

    path = ckpt.archive or ckpt.path.with_name(ckpt.path.name + ".index")
    return path.name, sha256sum(path)


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *,
                       model: str | None = None, ema: bool = False,
                       allow_missing_bn_stats: bool = False) -> dict[str, str]:
    """Convert an official TensorFlow checkpoint to a .safetensors file; return its metadata.

    ``model`` (a variant, ``<variant>_no_pe`` or a pretrained tag) states what the
    checkpoint must be; None accepts whatever variant is detected. The model is built on
    the meta device, so the converted state dict is the only copy of the weights in memory.
    """
    from moat.weights.io import read_metadata, save_weights, weights_metadata
    from moat.weights.zoo import split_name

    with TFCheckpoint(src) as ckpt:
        _, variant = official_keys(ckpt, ema)
        if model is not None:
            wanted, pe, _ = split_name(model)
            if (wanted, pe) != (variant.name, variant.position_embedding):
                raise ValueError(f"{src} holds {variant}, not the requested "
                                 f"{Variant(wanted, pe, 0)}; pass --model {variant.name}"
                                 f"{'' if variant.position_embedding else '_no_pe'} or the "
                                 "matching checkpoint")
        meta_model = variant.meta_model()
        weights = select_weights(ckpt, meta_model, ema=ema,
                                 allow_missing_bn_stats=allow_missing_bn_stats)
        state = official_state_dict(meta_model, weights)
        source_name, source_sha = _source_fingerprint(ckpt)
        metadata = weights_metadata(
            variant.name, variant.position_embedding, variant.num_classes,
            source_file=source_name, source_sha256=source_sha,
            source_weights="ema" if ema else "raw",
            bn_statistics="missing (filled with 0/1)" if weights.filled_bn_statistics
            else "present")
        save_weights(out, state, metadata)
    return read_metadata(out)  # as written: with the tensors' sha256 and size


# --- moat info --------------------------------------------------------------------------


def checkpoint_info(path: str | os.PathLike) -> dict[str, object]:
    """What a TensorFlow checkpoint holds: variant, dtypes, EMA, BN statistics, slots."""
    with TFCheckpoint(path) as ckpt:
        found = classify_variables(ckpt.keys())
        names = set(found.weights or found.ema)
        stats: tuple[int, int] | None = None
        try:
            variant: Variant | str = detect_variant({n: ckpt.shape(n) for n in names},
                                                    str(path))
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
        from moat.weights.zoo import find

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
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            dtypes = Counter(str(f.get_slice(k).get_dtype()) for k in f.keys())
            count = len(list(f.keys()))
    except SafetensorError as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    lines = [f"weights file:     {path}",
             f"tensors:          {count} ({', '.join(f'{k} x{v}' for k, v in dtypes.items())})"]
    lines += [f"{k + ':':<20}{v}" for k, v in sorted(meta.items())]
    if not meta:
        lines.append("metadata:         none (not written by moat convert)")
    return "\n".join(lines)
