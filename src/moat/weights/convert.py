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
full copy in memory) and writes it as safetensors with the header of ``metadata.py``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from moat.errors import InvalidInputError
from moat.weights.catalogue import find, split_name
from moat.integrity import file_sha256
from moat.weights.files import save_weights
from moat.weights.metadata import WeightsMetadata
from moat.weights.official import official_state_dict, official_tensors
from moat.weights.tf_checkpoint import CheckpointView, TFCheckpoint
from moat.weights.variant import Variant, check_variant, detect_variant

EMA_SUFFIX = "/ExponentialMovingAverage"
BN_STATISTICS = ("/moving_mean", "/moving_variance")

__all__ = ["BN_STATISTICS", "CheckpointVariables", "MissingBatchNormStatisticsWarning",
           "classify_variables", "convert_checkpoint", "official_keys", "select_weights"]


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


# --- selecting the tensors a model needs ------------------------------------------------


def official_keys(ckpt: TFCheckpoint, ema: bool = False) -> tuple[dict[str, str], Variant]:
    """Official name -> checkpoint key to read (raw or EMA copy), and the detected variant."""
    source = str(ckpt.source)
    found = classify_variables(ckpt.keys())
    if ema and not found.ema:
        raise InvalidInputError(f"{source} has no ExponentialMovingAverage copies; load it without "
                                "ema=True (--ema)")
    if not found.weights and found.ema and not ema:
        raise InvalidInputError(f"{source} holds only ExponentialMovingAverage copies; load it "
                                f"with ema=True (--ema)")
    keys = {n: n for n in found.weights}
    if ema:
        keys.update({n: n + EMA_SUFFIX for n in found.ema})
    return keys, detect_variant({n: ckpt.shape(k) for n, k in keys.items()}, source)


def select_weights(ckpt: TFCheckpoint, model: nn.Module, *, ema: bool = False,
                   allow_missing_bn_stats: bool = False) -> CheckpointView:
    """Check ``ckpt`` against ``model`` and pick the tensor to read for each official name:
    official name -> array, read lazily (raw or EMA copy; missing BatchNorm statistics the
    caller allowed read as 0 (mean) / 1 (variance))."""
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
            raise InvalidInputError(message + ". Download the current release; pass "
                                    "allow_missing_bn_stats=True (--allow-missing-bn-stats) only "
                                    "to re-estimate the statistics yourself")
        warnings.warn(message + "; loading with statistics 0/1 as requested. Re-estimate them "
                      "(forward passes in train mode) before trusting any prediction",
                      MissingBatchNormStatisticsWarning, stacklevel=3)
        for name in missing_stats:
            channels = ckpt.shape(keys[name.rsplit("/", 1)[0] + "/gamma"])
            fill = np.zeros if name.endswith("moving_mean") else np.ones
            defaults[name] = fill(channels, np.float32)
    return CheckpointView(ckpt, keys, defaults)


# --- loading and converting -------------------------------------------------------------


def _source_fingerprint(ckpt: TFCheckpoint) -> tuple[str, str]:
    """(file name, sha256) identifying the source: the archive, else the .index file.

    The index holds every tensor's crc32c, so its hash identifies the weights too.
    """
    path = ckpt.archive or ckpt.path.with_name(ckpt.path.name + ".index")
    return path.name, file_sha256(path)


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *,
                       model: str | None = None, ema: bool = False,
                       allow_missing_bn_stats: bool = False) -> WeightsMetadata:
    """Convert an official TensorFlow checkpoint to a .safetensors file; return its header.

    ``model`` (a variant, ``<variant>_no_pe`` or a pretrained tag) states what the
    checkpoint must be; None accepts whatever variant is detected. The model is built on
    the meta device, so the converted state dict is the only copy of the weights in memory.
    """
    with TFCheckpoint(src) as ckpt:
        _, variant = official_keys(ckpt, ema)
        if model is not None:
            wanted, pe, _ = split_name(model)
            if (wanted, pe) != (variant.name, variant.position_embedding):
                raise InvalidInputError(f"{src} holds {variant}, not the requested "
                                        f"{Variant(wanted, pe, 0)}; pass --model "
                                        f"{variant.model_name} or the matching checkpoint")
        meta_model = variant.meta_model()
        weights = select_weights(ckpt, meta_model, ema=ema,
                                 allow_missing_bn_stats=allow_missing_bn_stats)
        state = official_state_dict(meta_model, weights)
        source_name, source_sha = _source_fingerprint(ckpt)
        metadata = WeightsMetadata.for_release(
            find(variant.name, variant.position_embedding), num_classes=variant.num_classes,
            source_file=source_name, source_sha256=source_sha,
            source_weights="ema" if ema else "raw",
            bn_statistics="missing (filled with 0/1)" if weights.filled
            else "present")
        save_weights(out, state, metadata)
    return WeightsMetadata.read(out)  # as written: with the tensors' sha256 and size
