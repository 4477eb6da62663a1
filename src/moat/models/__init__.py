from moat.models.config import MODEL_CONFIGS, MoatConfig
from moat.models.moat import ARCHITECTURE_ARGS, ENDPOINTS, LAYOUT_ARGS, MoatNet
from moat.models.registry import build_model, list_models

__all__ = ["ARCHITECTURE_ARGS", "ENDPOINTS", "LAYOUT_ARGS", "MODEL_CONFIGS", "MoatConfig", "MoatNet",
           "build_model", "list_models"]
