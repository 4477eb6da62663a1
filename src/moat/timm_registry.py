"""Registers every MOAT variant in timm's model registry, so `timm.create_model("moat_0")`,
timm's train.py and benchmark.py work on MOAT unchanged. Imported by `import moat` when timm
is installed; the model itself never needs timm.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from moat.models import MoatNet, create_model, list_models
from moat.preprocessing import variant_data_config


def _cfg(name: str) -> dict[str, Any]:
    data = variant_data_config(name)
    return dict(
        url="", num_classes=1000, input_size=(3, *data["input_size"]), pool_size=None,
        crop_pct=data["crop_pct"], interpolation=data["interpolation"], mean=data["mean"],
        std=data["std"], first_conv="stem.conv_0", classifier="logits_head",
        license="apache-2.0", paper_ids="arXiv:2210.01820",
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in list_models()})


def _build(name: str, pretrained: bool = False, pretrained_cfg: Any = None,
           pretrained_cfg_overlay: dict | None = None, **kwargs: Any) -> MoatNet:
    if pretrained:
        raise RuntimeError(
            "moat does not download weights: convert an official checkpoint with "
            "`moat convert` and pass it as timm.create_model(..., checkpoint_path=FILE), "
            "or use moat.create_model(TAG, weights=FILE)")
    for option in ("cache_dir", "device", "dtype"):
        kwargs.pop(option, None)
    if kwargs.pop("drop_rate", 0.0):
        raise ValueError("MOAT has no dropout (the official model has none); "
                         "use drop_path_rate for regularisation")
    model = create_model(name, **kwargs)
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    cfg["num_classes"] = model.num_classes
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
