"""The MOAT network: the variant table (`config.py`, pure data, with the model's rules for
its arguments), TF-exact ops and attention (`layers.py`), blocks, `MoatNet` (`moat.py`),
`build_model` (`registry.py`: the architecture alone), FLOP counting (`flops.py`) and the
model tables (`summary.py`). `create_model` (`factory.py`: names, tags, hub folders and
weights) loads `moat.weights`, which builds on this package. Names are imported on first
use, so that `moat.models.config` (read by the command line's help and the training config)
does not import torch."""

from moat._lazy import lazy_exports

_EXPORTS = {"MODEL_CONFIGS": "moat.models.config", "MoatConfig": "moat.models.config",
            "ARCHITECTURE_ARGS": "moat.models.config", "LAYOUT_ARGS": "moat.models.config",
            "ENDPOINTS": "moat.models.moat", "MoatNet": "moat.models.moat",
            "build_model": "moat.models.registry", "list_models": "moat.models.registry",
            "create_model": "moat.models.factory"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
