"""Tables for `moat models` and `moat summary`: every number is computed, none typed in."""

from __future__ import annotations

import torch

from moat.errors import InvalidInputError
from moat.models import ENDPOINTS, build_model, list_models
from moat.models.config import MODEL_CONFIGS
from moat.models.flops import count_flops


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def models_table(with_flops: bool = True) -> str:
    """Every variant, with and without position embedding, at its native resolution."""
    header = ["model", "PE", "params", "res"] + (["GFLOPs (official)", "GMACs"] if with_flops else [])
    rows = []
    for name in list_models():
        size = MODEL_CONFIGS[name].native_resolution
        for pe in (True, False):
            with torch.device("meta"):
                model = build_model(name, position_embedding=pe)
            row = [name, "yes" if pe else "no", f"{_params(model):,}", str(size)]
            if with_flops:
                row += [f"{count_flops(model, size) / 1e9:.3f}",
                        f"{count_flops(model, size, method='macs') / 1e9:.3f}"]
            rows.append(row)
    return _table(header, rows)


def model_summary(name: str, img_size: list[int] | None = None, **options) -> str:
    """Per-stage output shapes, parameters and FLOPs of one configuration."""
    if name not in MODEL_CONFIGS:
        raise InvalidInputError(f"unknown model {name!r}; choose one of {list_models()}")
    if not img_size:
        img_size = [MODEL_CONFIGS[name].native_resolution]
    if len(img_size) > 2:
        raise InvalidInputError(f"--img-size takes H [W], got {img_size}")
    height, width = img_size[0], img_size[-1]
    with torch.device("meta"):
        model = build_model(name, **options).eval()
        endpoints = model.forward_endpoints(torch.zeros(1, 3, height, width))
    parts = [model.stem, *model.stages]
    rows = []
    for endpoint, part, info in zip(ENDPOINTS, parts, model.feature_info):
        shape = "x".join(str(s) for s in endpoints[endpoint].shape[1:])
        rows.append([endpoint, info["module"], shape, str(info["reduction"]), f"{_params(part):,}"])
    head = _params(model.final_layer_norm) + _params(model.logits_head)
    rows.append(["head", "final_layer_norm+logits_head", str(model.num_classes), "-", f"{head:,}"])
    table = _table(["endpoint", "module", "C x H x W", "stride", "params"], rows)
    windows = ", ".join("global" if w is None else f"{w[0]}x{w[1]}" for w in model.window_size[2:])
    return (f"{name}  input {height}x{width}  attention: {windows}\n{table}\n"
            f"total params {_params(model):,}   "
            f"GFLOPs (official method) {count_flops(model, (height, width)) / 1e9:.3f}   "
            f"GMACs {count_flops(model, (height, width), method='macs') / 1e9:.3f}")
