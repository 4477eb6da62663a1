"""Which MOAT variant a set of weights or a model is, from the config table.

Weights of one variant loaded into another would fail with dozens of shape errors; these
checks name both variants instead (and the release tag that builds the right model).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from moat.errors import InvalidInputError
from moat.models import MODEL_CONFIGS, build_model
from moat.weights.catalogue import NO_PE_SUFFIX, find

_BLOCK = re.compile(r"^moat/block_(\d+)_(\d+)/")

__all__ = ["Variant", "check_variant", "detect_variant", "model_variant"]


@dataclass(frozen=True)
class Variant:
    name: str
    position_embedding: bool
    num_classes: int  # 0: the weights have no classifier

    def __str__(self) -> str:
        pe = "with" if self.position_embedding else "without"
        return f"{self.name} ({pe} position embedding)"

    @property
    def model_name(self) -> str:
        """'moat_0' or 'moat_0_no_pe': the name that builds this variant."""
        return self.name + ("" if self.position_embedding else NO_PE_SUFFIX)

    def meta_model(self) -> nn.Module:
        """The model these weights fit, on the meta device (names and shapes, no memory)."""
        with torch.device("meta"):
            return build_model(self.name, num_classes=self.num_classes,
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
        raise InvalidInputError(f"{source}: no official MOAT variables (moat/stem/conv_0/kernel, "
                                "moat/block_XX_YY/...) found; this is not a MOAT checkpoint in the "
                                "released (TF1 name-based) format")
    for name, cfg in MODEL_CONFIGS.items():
        if (cfg.stem_size[0], cfg.num_blocks, cfg.hidden_size) == (stem[-1], blocks, widths):
            pe = any(n.endswith("attention/relative_position_embedding") for n in shapes)
            head = shapes.get("moat/logits_head/kernel")
            return Variant(name, pe, head[-1] if head else 0)
    raise InvalidInputError(f"{source}: stem width {stem[-1]}, blocks {blocks} and widths {widths} "
                            f"match no MOAT variant ({', '.join(MODEL_CONFIGS)})")


def model_variant(model: nn.Module) -> Variant:
    """The variant a model was built as (name '?' for a custom configuration)."""
    cfg = getattr(model, "cfg", None)
    name = next((n for n, c in MODEL_CONFIGS.items() if c == cfg), "?")
    pe = any(n.endswith("relative_position_embedding") for n, _ in model.named_parameters())
    return Variant(name, pe, getattr(model, "num_classes", 0))


def check_variant(model: nn.Module, variant: str, position_embedding: bool, source: str) -> None:
    """Refuse weights of another variant with a message naming both (not 60 shape errors)."""
    ours = model_variant(model)
    if ours.name == "?" or (ours.name, ours.position_embedding) == (variant, position_embedding):
        return  # a custom configuration is checked name by name when loading
    theirs = Variant(variant, position_embedding, 0)
    tag = find(variant, position_embedding).tag
    raise InvalidInputError(f"{source} holds {theirs}, but the model is {ours}: build it with "
                            f"moat.create_model({tag!r}) or pick the weights of {ours.name}")
