"""The MOAT models: the variant table (`config`, pure data), the layers and blocks, `MoatNet`
and its builder. Names are imported on first use, so that `moat.models.config` (read by the
command line's help and the training config) does not import torch."""

from moat._lazy import lazy_exports

_EXPORTS = {"MODEL_CONFIGS": "moat.models.config", "MoatConfig": "moat.models.config",
            "ENDPOINTS": "moat.models.moat", "MoatNet": "moat.models.moat",
            "build_model": "moat.models.registry", "list_models": "moat.models.registry"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
