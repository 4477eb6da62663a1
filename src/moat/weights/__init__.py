"""Weights, in layers that import one way (each module imports only those above it):

1. ``catalogue``: the 18 releases (pure data: tags, files, preprocessing, class names);
2. ``metadata``: the header of every weights file (one dataclass, encoded in one place);
3. ``variant``: which variant weights or a model are;
4. readers: ``tf_format`` and ``tf_checkpoint`` (TensorFlow checkpoints without
   TensorFlow), ``files`` (safetensors and safe PyTorch files);
5. conversion: ``official`` (official names and layouts), ``convert`` (checkpoint ->
   state dict / .safetensors), ``info`` (``moat info``);
6. sources: ``cache`` (download, verify, convert once), ``hub`` (Hugging Face folders);
7. ``adapt``: one adapter from any state dict to a model (classifier kept, replaced or
   dropped), under ``loader``: the one loader behind ``moat.create_model``
   (``moat.models.factory``, where ``models`` users look for it).

Names below are imported on first use, so ``import moat.weights`` stays cheap.
"""

from moat._lazy import lazy_exports

_EXPORTS = {
    "PRETRAINED": "moat.weights.catalogue", "PretrainedWeights": "moat.weights.catalogue",
    "imagenet_classes": "moat.weights.catalogue", "list_pretrained": "moat.weights.catalogue",
    "WeightsMetadata": "moat.weights.metadata",
    "CheckpointError": "moat.weights.tf_checkpoint", "TFCheckpoint": "moat.weights.tf_checkpoint",
    "read_checkpoint": "moat.weights.tf_checkpoint",
    "load_state_dict": "moat.weights.files", "save_weights": "moat.weights.files",
    "convert_checkpoint": "moat.weights.convert", "checkpoint_info": "moat.weights.info",
    "DownloadError": "moat.weights.cache", "moat_home": "moat.weights.cache",
    "pretrained_file": "moat.weights.cache",
    "push_to_hub": "moat.weights.hub", "save_pretrained": "moat.weights.hub",
    "create_model": "moat.models.factory",
    "data_config": "moat.weights.loader", "load_tf_checkpoint": "moat.weights.loader",
    "load_weights": "moat.weights.loader",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
