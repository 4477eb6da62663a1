"""Exported classifiers on the page: `.onnx` (ONNX Runtime), `.pt2` (torch.export) and `.pt`
(TorchScript). They give the top-5 classes and the time taken, but no maps: an exported
graph has no MOAT blocks to record attention from, and explanations need the PyTorch model
(`--checkpoint RUN` or `--model NAME`).

An `.onnx` file from `moat export onnx` records its preprocessing (the variant's release,
or the training run's) and, exported from a run, its class names: the page uses them.
`.pt2` and `.pt` files record neither: ImageNet's preprocessing and class indices, unless
given."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moat.data.preprocessing import imagenet_data_config
from moat.data.transforms import eval_transform
from moat.errors import InvalidInputError
from moat.explain.explainer import Explanation
from moat.export.onnx_metadata import OnnxMetadata, read_preprocessing
from moat.export.ort import OnnxRuntimeModel

EXPORTED_SUFFIXES = (".onnx", ".pt2", ".pt")
NO_MAPS = "no maps for an exported model: use --checkpoint RUN or --model NAME for them"


class ExportedClassifier:
    """`explain()` with the page's interface: predictions only. `img_size`, `mean`, `std`
    and `class_names` override what the file records."""

    task = "classification"

    def __init__(self, path: str | os.PathLike, *, img_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model {str(path)!r} does not exist")
        self.model, pre, names = self._load(img_size or 224)
        mean, std = mean or pre["mean"], std or pre["std"]
        self.transform = eval_transform(img_size or pre["input_size"][-2:], mean=mean, std=std,
                                        crop_pct=pre["crop_pct"],
                                        interpolation=pre["interpolation"])
        self.mean, self.std = (np.array(v, dtype=np.float32) for v in (mean, std))
        self.class_names = list(class_names or names)

    def _load(self, img_size: int):
        """(batch [1, 3, H, W] -> logits, the preprocessing it records (else ImageNet's at
        `img_size`), the class names it records)."""
        if self.path.suffix == ".onnx":
            meta = OnnxMetadata.read(self.path)
            if meta.task not in (None, self.task):
                raise InvalidInputError(f"{self.path.name} is a {meta.task} model: the page shows "
                                        "exported classifiers only; use --checkpoint RUN_DIR for "
                                        "it")
            return (OnnxRuntimeModel(self.path), read_preprocessing(self.path, img_size),
                    meta.class_names)
        if self.path.suffix == ".pt2":
            module = torch.export.load(str(self.path)).module()
        elif self.path.suffix == ".pt":
            module = torch.jit.load(str(self.path), map_location="cpu").eval()
        else:
            raise InvalidInputError(f"{self.path.name}: not an exported model; use one of "
                                    f"{', '.join(EXPORTED_SUFFIXES)}")
        return module, imagenet_data_config(img_size), []

    def explain(self, image: Image.Image, target=None, *, method: str = "hirescam",
                top_k: int = 5, **_) -> Explanation:
        start = time.perf_counter()
        x = self.transform(image.convert("RGB"))[None]
        with torch.no_grad():
            probs = self.model(x).float().softmax(-1)[0]
        values, indices = probs.topk(max(1, min(top_k, len(probs))))
        names = self.class_names or [str(i) for i in range(len(probs))]
        view = (x[0].permute(1, 2, 0).numpy() * self.std + self.mean).clip(0, 1)
        return Explanation(
            image=(view * 255).round().astype(np.uint8), task=self.task, target=NO_MAPS,
            predictions=[{"label": names[i], "index": i, "probability": round(p, 6)}
                         for p, i in zip(values.tolist(), indices.tolist())],
            cams={}, attention={}, seconds=time.perf_counter() - start)
