"""One adapter from any state dict (our parameter names) to a model.

Every loader ends here: ``load_weights`` (files of every format, via the readers and
``official``), ``create_model``, ``--init-from`` (``moat.train.finetune.load_pretrained``)
and the dense backbones. The decisions made once, for all of them:

* **classifier kept**: the model's head tensors must be in the state dict, of the same shape;
* **classifier replaced** (``classifier="new"``, fine-tuning): head tensors of another shape
  (another number of classes) are skipped, so the model's freshly initialised ones stay;
* **classifier dropped**: a model without a head (``features_only``, or ``num_classes=0``
  for the linear layer) ignores the state dict's head tensors.

The head is what the model names in ``MoatNet.head_modules``; nothing else is exempt: a
missing, unexpected or mis-shaped backbone tensor is an error listing them all, never a
silently half-initialised model. A new resolution needs nothing here: the relative position
tables are interpolated to the input's size at forward time (``models/layers.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from moat.errors import InvalidInputError

__all__ = ["Adapted", "adapt_state_dict", "head_prefixes", "load_into"]

_SHOWN = 20  # names listed per kind of problem; the count says how many more


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of ``model``'s head (what the model names in ``head_modules``)."""
    return tuple(f"{name}." for name in getattr(model, "head_modules", ()))


@dataclass
class Adapted:
    """A state dict ready for ``model.load_state_dict(strict=False)``, and what was left out."""

    state: dict[str, torch.Tensor]
    replaced: list[str] = field(default_factory=list)  # "name [source shape] -> [model shape]"
    dropped: list[str] = field(default_factory=list)   # head tensors the model has no place for
    unused: list[str] = field(default_factory=list)    # other source tensors (extra="ignore")


def adapt_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *,
                     source: str = "weights", classifier: str = "keep", extra: str = "error",
                     labels: Mapping[str, str] | None = None) -> Adapted:
    """Check ``state`` against ``model`` and keep what loads (see the module's docstring).

    ``classifier``: "keep" (must fit) or "new" (one of another shape is replaced).
    ``extra``: "error" (tensors the model lacks are refused) or "ignore" (reported as unused,
    e.g. a detection run's decoder when fine-tuning its backbone for classification).
    ``labels`` name tensors in messages in the source's terms (official names).
    Raises one InvalidInputError listing every problem.
    """
    if classifier not in ("keep", "new") or extra not in ("error", "ignore"):
        raise InvalidInputError(f"classifier must be keep or new and extra error or ignore, got "
                         f"{classifier!r}, {extra!r}")
    labels = labels or {}
    own = model.state_dict()
    heads = head_prefixes(model)
    # a head prefix the model has no tensor under: that part of the head was dropped
    absent = tuple(p for p in heads if not any(k.startswith(p) for k in own))
    out = Adapted({})
    unexpected, misshaped = [], []
    for name, value in state.items():
        if name not in own:
            (out.dropped if absent and name.startswith(absent) else
             out.unused if extra == "ignore" else unexpected).append(labels.get(name, name))
        elif tuple(value.shape) != tuple(own[name].shape):
            change = f"{labels.get(name, name)} {list(value.shape)} -> {list(own[name].shape)}"
            (out.replaced if classifier == "new" and name.startswith(heads) else
             misshaped).append(change)
        else:
            out.state[name] = value
    missing = [labels.get(k, k) for k in own if k not in state
               and not k.endswith("num_batches_tracked")
               and not (classifier == "new" and k.startswith(heads))]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit this model:"]
        for title, names in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", misshaped)):
            if names:
                names = sorted(names)
                lines += [f"  {title} ({len(names)}):"] + [f"    {n}" for n in names[:_SHOWN]]
                if len(names) > _SHOWN:
                    lines.append(f"    ... and {len(names) - _SHOWN} more")
        lines.append("Create the model with the variant, position_embedding and num_classes "
                     "the weights were saved with (see `moat info FILE`).")
        raise InvalidInputError("\n".join(lines))
    return out


@torch.no_grad()
def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], **options) -> Adapted:
    """``adapt_state_dict`` then copy the tensors into ``model``; returns what was left out."""
    adapted = adapt_state_dict(model, state, **options)
    model.load_state_dict(adapted.state, strict=False)
    return adapted
