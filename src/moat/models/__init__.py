from moat.models.config import MODEL_CONFIGS, MoatConfig
from moat.models.moat import ENDPOINTS, MoatNet
from moat.models.registry import build_model, list_models

__all__ = ["ENDPOINTS", "MODEL_CONFIGS", "MoatConfig", "MoatNet", "build_model", "list_models"]
