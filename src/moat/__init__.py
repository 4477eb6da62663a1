"""MOAT vision models in PyTorch, numerically identical to the official implementation."""

import importlib.util

from moat.export.inference import optimize_for_inference
from moat.flops import count_flops
from moat.models import MoatConfig, MoatNet, list_models
from moat.weights.official import load_official_weights
# create_model accepts pretrained tags and weights files; it builds on moat.models.create_model
from moat.weights.zoo import create_model, create_transform, data_config, list_pretrained

__version__ = "0.1.0"
__all__ = ["MoatConfig", "MoatNet", "count_flops", "create_model", "create_transform",
           "data_config", "list_models", "list_pretrained", "load_official_weights",
           "optimize_for_inference"]

if importlib.util.find_spec("timm") is not None:
    import moat.timm_registry  # noqa: F401  (registers the variants with timm)
