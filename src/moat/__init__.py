"""MOAT vision models in PyTorch, numerically identical to the official implementation."""

from moat.models import MoatConfig, MoatNet, create_model, list_models
from moat.weights.official import load_official_weights

__version__ = "0.1.0"
__all__ = ["MoatConfig", "MoatNet", "create_model", "list_models", "load_official_weights"]
