"""The MOAT network: the variant table (`config.py`), TF-exact ops and attention
(`layers.py`), blocks, `MoatNet` (`moat.py`), `build_model` (`registry.py`: the architecture
alone), FLOP counting (`flops.py`) and the model tables (`summary.py`). `create_model`
(`factory.py`: names, tags, hub folders and weights) is imported on first use, as it loads
`moat.weights`, which builds on this package."""

from moat._lazy import lazy_exports
from moat.models.config import MODEL_CONFIGS, MoatConfig
from moat.models.moat import ARCHITECTURE_ARGS, ENDPOINTS, LAYOUT_ARGS, MoatNet
from moat.models.registry import build_model, list_models

__all__ = ["ARCHITECTURE_ARGS", "ENDPOINTS", "LAYOUT_ARGS", "MODEL_CONFIGS", "MoatConfig",
           "MoatNet", "build_model", "create_model", "list_models"]

__getattr__, __dir__ = lazy_exports(__name__, {"create_model": "moat.models.factory"})
