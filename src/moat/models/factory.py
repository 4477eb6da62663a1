"""``create_model``: names, tags and hub folders in, a model out (``moat.create_model``).

Where weights come from (the sources, see ``moat.weights.cache`` and ``moat.weights.hub``):

* ``create_model("moat_0.in1k_224", pretrained=True)``: the release, downloaded, verified and
  converted once into the cache;
* ``create_model("moat_0", weights=FILE)``: a file (our .safetensors, a PyTorch state dict
  loaded safely, an .npz of official names, a TensorFlow checkpoint or released .tar.gz);
* ``create_model("local-dir:PATH")`` / ``("hf-hub:ORG/NAME")``: a folder written by
  ``save_pretrained`` (weights are loaded unless ``pretrained=False``).

It lives here, where users of ``moat.models`` look for it, but it is the top of the weights
layer: the one module of ``models/`` that imports ``moat.weights`` (nothing in ``models/``
imports it; ``moat.models.create_model`` is resolved on first use).
"""

from __future__ import annotations

import os
from typing import Any

from moat.errors import InvalidInputError
from moat.models.config import ARCHITECTURE_ARGS
from moat.models.moat import MoatNet
from moat.models.registry import build_model
from moat.weights.cache import pretrained_file
from moat.weights.catalogue import release, split_name
from moat.weights.hub import is_hub_name, resolve
from moat.weights.loader import load_weights

__all__ = ["create_model"]


def create_model(name: str, *, pretrained: bool | None = None,
                 weights: str | os.PathLike | None = None, sha256: str | None = None,
                 ema: bool = False, allow_missing_bn_stats: bool = False,
                 progress: bool | None = None, **kwargs: Any) -> MoatNet:
    """Build a model by name, pretrained tag or hub folder, optionally with weights.

    ``name``: a variant (``"moat_0"``), its no-PE form (``"moat_0_no_pe"``), a pretrained
    tag (``"moat_0.in1k_224"``), or a saved folder (``"local-dir:PATH"``,
    ``"hf-hub:ORG/NAME"``).
    ``pretrained=True``: load the release of the tag (or of the variant), downloaded and
    converted once into the cache (``moat.weights.cache``; ``progress`` shows a bar, None:
    only on a terminal). Folder names load their weights unless ``pretrained=False``.
    ``weights``: a file instead (see ``load_weights``); its variant must match ``name``;
    ``sha256`` (or the catalogue's, when known) is checked before anything is read.
    With ``num_classes`` other than the weights', the backbone is loaded and a fresh
    classifier made (fine-tuning). Other keywords go to ``moat.models.build_model``.
    """
    if weights is not None and pretrained:
        raise InvalidInputError("pass either pretrained=True (the release) or weights=FILE, not "
                                "both")
    cfg: dict[str, Any] = {}
    if is_hub_name(name):
        folder = resolve(name)
        model_name, tag = folder.architecture, folder.pretrained_cfg.get("tag")
        kwargs = {**folder.model_args, **kwargs}
        cfg, source_classes = folder.pretrained_cfg, folder.config["num_classes"]
        if pretrained is not False and weights is None:
            weights = folder.weights
    else:
        model_name, pe, tag = split_name(name)
        if not pe:
            if kwargs.get("position_embedding", False):
                raise InvalidInputError(f"{name!r} is a model without position embedding; "
                                        "drop position_embedding=True")
            kwargs["position_embedding"] = False
        entry = release(name) if pretrained or tag else None
        if entry is not None:
            cfg, tag = entry.pretrained_cfg(with_labels=bool(pretrained or weights)), entry.tag
        if pretrained:
            weights = pretrained_file(entry.tag, progress=progress)
        elif weights is not None and sha256 is None and entry is not None:
            sha256 = entry.sha256  # the released archive's, where known
        source_classes = entry.num_classes if entry else None  # None: the file's own head
    if weights is None:
        model = build_model(model_name, **kwargs)
    else:
        num_classes = kwargs.pop("num_classes", source_classes)
        new_head = source_classes is not None and num_classes != source_classes
        # a new head: built without a classifier (the weights' one is dropped), then a fresh one
        head = {} if num_classes is None else {"num_classes": 0 if new_head else num_classes}
        model = build_model(model_name, **head, **kwargs)
        load_weights(model, weights, sha256=sha256, ema=ema,
                     allow_missing_bn_stats=allow_missing_bn_stats)
        if new_head and not kwargs.get("features_only"):
            model.reset_classifier(num_classes)
            cfg = {k: v for k, v in cfg.items() if k != "label_names"}
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = cfg  # timm's name: preprocessing and class names travel along
    model.model_args = {k: v for k, v in kwargs.items() if k in ARCHITECTURE_ARGS}
    if tag:
        model.pretrained_tag = tag
    return model
