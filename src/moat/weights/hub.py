"""Models as Hugging Face Hub folders, in timm's layout, so moat and timm both load them.

A folder holds ``model.safetensors`` (our parameter names; the header of
``metadata.WeightsMetadata``), ``config.json`` (timm's layout: ``architecture``,
``num_classes``, ``num_features``, ``model_args``, ``pretrained_cfg`` with ``label_names``,
mean/std, input size, crop and interpolation) and a ``README.md`` model card.

Names: ``local-dir:PATH`` is such a folder on disk; ``hf-hub:ORG/NAME[@REVISION]`` a Hub
repository, fetched through ``huggingface_hub`` with its cache (``HF_HOME``) and its
offline rule (``HF_HUB_OFFLINE=1``: only the cache). ``timm.create_model`` takes the same
names (moat registers its architectures with timm).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moat.errors import InvalidInputError
from moat.atomic import atomic_write_text
from moat.models import ARCHITECTURE_ARGS, MoatNet
from moat.weights.catalogue import DATASETS, PRETRAINED, release
from moat.weights.files import save_weights
from moat.weights.metadata import WeightsMetadata
from moat.weights.variant import model_variant

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
LOCAL_PREFIX, HUB_PREFIX = "local-dir:", "hf-hub:"

__all__ = ["HubFolder", "is_hub_name", "push_to_hub", "resolve", "save_pretrained"]


def is_hub_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith((LOCAL_PREFIX, HUB_PREFIX))


@dataclass(frozen=True)
class HubFolder:
    """A saved model: its config.json and the path of its weights."""

    name: str  # as given, e.g. "local-dir:/models/flowers"
    config: Mapping[str, Any]
    weights: Path

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    @property
    def model_args(self) -> dict[str, Any]:
        return dict(self.config.get("model_args") or {})

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        cfg = dict(self.config.get("pretrained_cfg") or {})
        cfg["num_classes"] = self.config.get("num_classes", cfg.get("num_classes"))
        source, _, where = self.name.partition(":")
        cfg.update({"source": source, "hf_hub_id": where} if source == "hf-hub"
                   else {"source": source, "file": where})
        return cfg


def resolve(name: str) -> HubFolder:
    """The folder a ``local-dir:`` or ``hf-hub:`` name refers to (fetched if needed)."""
    source, _, where = name.partition(":")
    if not where:
        raise InvalidInputError(f"{name!r} names no folder or repository after {source}:")
    if name.startswith(LOCAL_PREFIX):
        folder = Path(where).expanduser()
        config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    elif name.startswith(HUB_PREFIX):
        config, weights = _hub_files(where)
    else:
        raise InvalidInputError(f"{name!r} is not a hub name (local-dir:PATH or hf-hub:ORG/NAME)")
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path.name} is missing ({path}); a saved model "
                                    f"folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (written "
                                    "by moat.save_pretrained)")
    return HubFolder(name, json.loads(config.read_text(encoding="utf-8")), weights)


def _hub_files(repo: str) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download  # optional: the `full` extra
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        return tuple(Path(hf_hub_download(repo_id, f, revision=revision or None,
                                          library_name="moat"))
                     for f in (CONFIG_FILE, WEIGHTS_FILE))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"hf-hub:{repo} is not in the Hugging Face cache and cannot be downloaded now "
            f"({err}). Run once with network access (or `hf download {repo_id}`), or set "
            "HF_HOME to the cache that holds it") from err


# --- writing ------------------------------------------------------------------------------

def _label_names(model: nn.Module, label_names: Sequence[str] | None) -> list[str] | None:
    names = label_names or (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names is not None and len(names) != model.num_classes:
        if label_names:
            raise InvalidInputError(f"{len(names)} label names for a {model.num_classes}-class "
                                    f"model")
        return None  # the release's names no longer fit a new classifier
    return list(names) if names is not None else None


def hub_config(model: nn.Module, label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """config.json of a model, in timm's layout."""
    variant = model_variant(model)
    if variant.name == "?":
        raise InvalidInputError("only models built from a named variant can be saved in the hub "
                                "format (config.json names the architecture)")
    args = {k: v for k, v in (getattr(model, "model_args", None) or {}).items()
            if k in ARCHITECTURE_ARGS}
    args["position_embedding"] = variant.position_embedding
    if getattr(model, "features_only", False):
        raise InvalidInputError("save the classification model, not a features_only backbone")
    own = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg = release(variant.model_name).data_config()  # the variant's, unless the model has its own
    cfg.update({k: own[k] for k in ("tag", "input_size", "interpolation", "crop_pct", "mean",
                                    "std", "license", "paper_ids") if k in own})
    cfg.update(num_classes=model.num_classes, first_conv=MoatNet.first_conv,
               classifier=MoatNet.classifier_module, label_names=_label_names(model, label_names))
    return {"architecture": variant.name, "num_classes": model.num_classes,
            "num_features": model.num_features, "model_args": args, "pretrained_cfg": cfg}


def model_card(config: Mapping[str, Any], *, dataset: str | None = None,
               metrics: Mapping[str, float] | None = None) -> str:
    """README.md of a saved model: what it is, what it was trained on, how to load it."""
    cfg, arch = config["pretrained_cfg"], config["architecture"]
    entry = PRETRAINED.get(cfg.get("tag") or "")
    data = dataset or (DATASETS[entry.data] if entry else "not recorded")
    names = cfg.get("label_names")
    rows = "\n".join(f"| {k} | {v} |" for k, v in (metrics or {}).items()) or \
        "| (none recorded) | |"
    return f"""---
tags: [image-classification, timm, moat]
library_name: timm
license: apache-2.0
---
# {arch} ({config['num_classes']} classes)

MOAT (Yang et al., "MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision
Models", ICLR 2023) in PyTorch, saved by the `moat` library in timm's format.

- **Variant:** `{arch}`, model arguments `{json.dumps(config['model_args'])}`
- **Weights from:** {('release `' + entry.tag + '`') if entry else 'a moat training run'}
- **Data:** {data}
- **Classes:** {config['num_classes']}{(' (' + ', '.join(names[:5]) + ', ...)') if names else ''}
- **Input:** {cfg.get('input_size')}, mean {cfg.get('mean')}, std {cfg.get('std')}, \
{cfg.get('interpolation')} resize, crop_pct {cfg.get('crop_pct')}

## Metrics

| metric | value |
|---|---|
{rows}

## Intended use

Image classification into the classes above, and a backbone for fine-tuning on other images.
Not evaluated for uses beyond that; check accuracy on your own data before relying on it.

## How to load

```python
import moat
model = moat.create_model("hf-hub:ORG/NAME")        # or "local-dir:PATH"
transform = moat.create_transform(model)

import timm                                         # after `import moat`
model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)
```

`moat predict image.jpg --model hf-hub:ORG/NAME` prints class names and scores.
"""


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                    label_names: Sequence[str] | None = None, dataset: str | None = None,
                    metrics: Mapping[str, float] | None = None) -> Path:
    """Write ``model`` as a hub folder: model.safetensors, config.json, README.md.

    ``label_names`` default to the model's own (a released model's ImageNet names);
    ``dataset`` and ``metrics`` go into the model card.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hub_config(model, label_names)
    cfg = config["pretrained_cfg"]
    meta = WeightsMetadata(
        format="moat", variant=config["architecture"],
        position_embedding=config["model_args"]["position_embedding"],
        num_classes=config["num_classes"], pretrained_tag=cfg.get("tag"),
        native_resolution=(cfg.get("input_size") or (3, None, None))[-1],
        input_range="0..1 RGB", mean=cfg.get("mean"), std=cfg.get("std"),
        interpolation=cfg.get("interpolation"), crop_pct=cfg.get("crop_pct"),
        label_names=cfg["label_names"], model_args=config["model_args"])
    save_weights(directory / WEIGHTS_FILE, model.state_dict(), meta)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / CARD_FILE, model_card(config, dataset=dataset, metrics=metrics))
    return directory


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None,
                token: str | None = None, commit_message: str = "Add MOAT model",
                **save_options: Any) -> str:
    """Save ``model`` (see ``save_pretrained``) and upload it to the Hub repository
    ``repo_id`` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi  # optional: the `full` extra

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moat-hub-") as tmp:
        save_pretrained(model, tmp, **save_options)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                 commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
