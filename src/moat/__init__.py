"""MOAT vision models in PyTorch, numerically identical to the official implementation.

The public names are imported on first use: ``import moat`` loads neither the weights
machinery, export, FLOP counting nor timm. ``moat.integrations.timm_registry`` registers
the variants with timm as soon as timm is imported (before or after moat).
"""

from moat._lazy import lazy_exports
from moat._version import __version__
from moat.integrations import timm_hook

_EXPORTS = {
    "MoatConfig": "moat.models", "MoatNet": "moat.models", "list_models": "moat.models",
    "count_flops": "moat.models.flops", "optimize_for_inference": "moat.export.fused",
    "load_official_weights": "moat.weights.official",
    "list_pretrained": "moat.weights.catalogue",
    "create_model": "moat.models.factory", "create_transform": "moat.data.transforms",
    "data_config": "moat.weights.loader",
    "save_pretrained": "moat.weights.hub", "push_to_hub": "moat.weights.hub",
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

timm_hook.install()
