"""Weights: official TensorFlow checkpoints (read without TensorFlow), conversion to
safetensors, the zoo of released checkpoints, and safe loading rules (see each module)."""

from moat.weights.convert import checkpoint_info, convert_checkpoint, load_tf_checkpoint
from moat.weights.io import load_weights, read_metadata, save_weights
from moat.weights.tf_checkpoint import CheckpointError, TFCheckpoint, read_checkpoint
from moat.weights.zoo import PRETRAINED, create_transform, data_config, list_pretrained

__all__ = ["PRETRAINED", "CheckpointError", "TFCheckpoint", "checkpoint_info",
           "convert_checkpoint", "create_transform", "data_config", "list_pretrained",
           "load_tf_checkpoint", "load_weights", "read_checkpoint", "read_metadata",
           "save_weights"]
