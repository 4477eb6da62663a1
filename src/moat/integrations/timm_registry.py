"""Registers every MOAT variant and release with timm's model registry, so
`timm.create_model("moat_0")`, `timm.create_model("moat_0.in1k_224", pretrained=True)`,
`timm.create_model("local-dir:PATH" or "hf-hub:ORG/NAME", pretrained=True)`, timm's
train.py and benchmark.py work on MOAT. Imported when timm is imported after `import moat`
(see `moat.integrations.timm_hook`); the model itself never needs timm.

Weights come from moat's own loader (`moat.create_model`): the same download cache, the same
checks and the same model as moat gives.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from moat.errors import InvalidInputError
from moat.models import MoatNet, list_models
from moat.models.factory import create_model
from moat.weights.catalogue import NO_PE_SUFFIX, PRETRAINED

_TIMM_CFG = dict(url="", pool_size=None, first_conv=MoatNet.first_conv,
                 classifier=MoatNet.classifier_module, license="apache-2.0",
                 paper_ids="arXiv:2210.01820")
_IGNORED = ("cache_dir", "device", "dtype", "pretrained_model_args")

default_cfgs = generate_default_cfgs(
    {tag: {**_TIMM_CFG, **entry.pretrained_cfg(), "url": entry.url} for tag, entry in PRETRAINED.items()})


def _build(name: str, pretrained: bool = False, pretrained_cfg: Any = None,
           pretrained_cfg_overlay: dict | None = None, **kwargs: Any) -> MoatNet:
    for option in _IGNORED:
        kwargs.pop(option, None)
    if kwargs.pop("drop_rate", 0.0):
        raise InvalidInputError("MOAT has no dropout (the official model has none); "
                                "use drop_path_rate for regularisation")
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    source = cfg.get("source")
    if pretrained and source in ("local-dir", "hf-hub"):  # a saved folder
        where = cfg["file"] if source == "local-dir" else cfg["hf_hub_id"]
        model = create_model(f"{source}:{where}", **kwargs)
    else:
        tag = f"{name}.{cfg['tag']}" if cfg.get("tag") else name
        model = create_model(tag, pretrained=pretrained, **kwargs)
    cfg.pop("label_names", None)  # moat's loader keeps them only where they fit the head
    cfg.update({k: v for k, v in model.pretrained_cfg.items() if k != "tag"})
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _register(name: str) -> None:
    def builder(pretrained: bool = False, **kwargs: Any) -> MoatNet:
        return _build(name, pretrained=pretrained, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = __name__
    builder.__doc__ = f"MOAT variant {name!r} (see moat.create_model for the options)."
    globals()[name] = register_model(builder)


for _name in list_models():
    _register(_name)
    _register(_name + NO_PE_SUFFIX)
