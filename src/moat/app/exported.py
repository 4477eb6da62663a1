"""Exported classifiers on the page: `.onnx` (onnxruntime), `.pt2` (torch.export) and `.pt`
(TorchScript). They give the top-5 classes and the time taken, but no maps: an exported
graph has no MOAT blocks to record attention from, and explanations need the PyTorch model
(`--checkpoint RUN` or `--model NAME`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moat.explain.explainer import Explanation

EXPORTED_SUFFIXES = (".onnx", ".pt2", ".pt")
NO_MAPS = "no maps for an exported model: use --checkpoint RUN or --model NAME for them"


class ExportedClassifier:
    """`explain()` with the page's interface: predictions only."""

    task = "classification"

    def __init__(self, path: str | os.PathLike, *, img_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        from moat.data.transforms import eval_transform
        from moat.preprocessing import IMAGENET_MEAN, IMAGENET_STD

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model {str(path)!r} does not exist")
        self.run, static = self._load()
        size = img_size or static or 224
        self.transform = eval_transform(size, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)
        self.mean = np.array(mean or IMAGENET_MEAN, dtype=np.float32)
        self.std = np.array(std or IMAGENET_STD, dtype=np.float32)
        self.class_names = list(class_names or [])

    def _load(self):
        """(batch [1, 3, H, W] -> logits function, static input side or None)."""
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            first = session.get_inputs()[0]
            side = first.shape[-1] if isinstance(first.shape[-1], int) else None
            return (lambda x: torch.from_numpy(session.run(None, {first.name: x.numpy()})[0]),
                    side)
        if self.path.suffix == ".pt2":
            module = torch.export.load(str(self.path)).module()
        elif self.path.suffix == ".pt":
            module = torch.jit.load(str(self.path), map_location="cpu").eval()
        else:
            raise ValueError(f"{self.path.name}: not an exported model; use one of "
                             f"{', '.join(EXPORTED_SUFFIXES)}")
        return (lambda x: module(x)), None

    def explain(self, image: Image.Image, target=None, *, method: str = "hirescam",
                top_k: int = 5, **_) -> Explanation:
        start = time.perf_counter()
        x = self.transform(image.convert("RGB"))[None]
        with torch.no_grad():
            probs = self.run(x).float().softmax(-1)[0]
        values, indices = probs.topk(max(1, min(top_k, len(probs))))
        names = self.class_names or [str(i) for i in range(len(probs))]
        view = (x[0].permute(1, 2, 0).numpy() * self.std + self.mean).clip(0, 1)
        return Explanation(
            image=(view * 255).round().astype(np.uint8), task=self.task, target=NO_MAPS,
            predictions=[{"label": names[i], "index": i, "probability": round(p, 6)}
                         for p, i in zip(values.tolist(), indices.tolist())],
            cams={}, attention={}, seconds=time.perf_counter() - start)
