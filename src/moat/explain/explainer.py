"""One image in, predictions and maps out: `Explainer` for a classifier, a segmenter or a
detector built on MOAT, loaded by name (`Explainer.from_name`) or from a training
checkpoint (`Explainer.from_checkpoint`).

All maps come back on the image the model saw (after its resizing and cropping), one value
per pixel: class-activation maps per stage ([H, W]) and, per MOAT block, the attention each
position receives averaged over its window's queries ([heads, H, W]; the head mean is one
`.mean(0)` away).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from moat.errors import InvalidInputError, MoatError
from moat.explain.attention import AttentionMap, record_attention
from moat.explain.cam import (box_score, class_activation_maps, class_score, mask_score,
                              stage_layers, to_input_size)

TASKS = ("classification", "segmentation", "detection")


class NoDetectionError(MoatError, ValueError):
    """The detector found nothing (of the asked class, at the asked box) in this image: a
    fact about the image, not an error of the model or the options."""


@dataclass
class Explanation:
    """What `Explainer.explain` returns; arrays are numpy, maps on `image`'s pixels."""

    image: np.ndarray                      # uint8 [H, W, 3]: the model's view of the input
    task: str
    target: str                            # what the maps explain, e.g. "class 'cat' (3)"
    predictions: list[dict[str, Any]]      # top-k classes / classes' pixel shares / boxes
    cams: dict[str, np.ndarray]            # stage1..stage5 -> [H, W], >= 0
    attention: dict[str, np.ndarray]       # MOAT block name -> [heads, H, W]
    attention_maps: dict[str, AttentionMap] = field(repr=False, default_factory=dict)
    mask: np.ndarray | None = None         # segmentation: class id per pixel [H, W]
    box: int | None = None                 # detection: index of the explained prediction
    seconds: float = 0.0                   # prediction and maps, this image


def _class_index(target: int | str | None, names: Sequence[str], default: int) -> int:
    if target is None:
        return default
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in names:
            raise InvalidInputError(f"unknown class {target!r}; the model's classes: "
                                    f"{', '.join(list(names)[:20])}{' ...' if len(names) > 20 else ''}")
        return list(names).index(target)
    index = int(target)
    if not 0 <= index < len(names):
        raise InvalidInputError(f"class index {index} is out of range: the model has {len(names)} "
                                "classes")
    return index


class Explainer:
    """`model` (eval mode) of `task`, its input `transform` (PIL -> normalised tensor; not
    used by detectors, which normalise themselves), `mean`/`std` of that normalisation and
    the class names."""

    def __init__(self, model: nn.Module, task: str = "classification", *,
                 transform: Any = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5),
                 class_names: Sequence[str] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if task not in TASKS:
            raise InvalidInputError(f"cannot explain a {task!r} model: one of {TASKS}")
        self.model, self.task, self.transform = model.eval(), task, transform
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.device = torch.device(device)
        self.class_names = list(class_names or [])
        self._lock = threading.Lock()  # attention recording switches model state on and off
        stage_layers(model)  # fails early, with a message, on a model without a MoatNet

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, *, device: str = "cpu", img_size: int | None = None,
                  **model_kwargs: Any) -> Explainer:
        """A classifier from a pretrained tag (its release is loaded: downloaded once, then
        cached), a hub folder, or a bare variant (random weights: for trying the tools)."""
        import moat

        pretrained = True if name in moat.list_pretrained() else None
        model = moat.create_model(name, pretrained=pretrained, **model_kwargs).to(device)
        config = moat.data_config(name)
        # class names travel with pretrained weights (timm's pretrained_cfg["label_names"])
        names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        return cls(model, "classification", transform=moat.create_transform(
            name, img_size=img_size), mean=config["mean"], std=config["std"],
            class_names=names or [str(i) for i in range(model.num_classes)], device=device)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *, device: str = "cpu",
                        img_size: int | None = None) -> Explainer:
        """Any `moat train` checkpoint (run directory, checkpoint folder or weights file)."""
        from moat.train.eval_predict import load_task_and_model

        task, model, _ = load_task_and_model(checkpoint, device=device)
        config = task.config
        names = (getattr(task, "classes", None) or getattr(task, "class_names", None)
                 or [str(i) for i in range(config.num_classes or 0)])
        transform = None
        if task.name == "classification":
            transform = task.eval_transform(img_size)
        elif task.name == "segmentation":
            from moat.data.segmentation import eval_transform

            size = img_size or config.eval_img_size
            joint = eval_transform(size, mean=config.mean, std=config.std)
            transform = lambda rgb: joint(_to_uint8_tensor(rgb), torch.zeros(1, 1))[0]  # noqa: E731
        return cls(model, task.name, transform=transform, mean=config.mean, std=config.std,
                   class_names=names, device=device)

    # --- one image ----------------------------------------------------------------------------
    def explain(self, image: Image.Image | str | os.PathLike, target: int | str | None = None,
                *, box: int | None = None, method: str = "hirescam",
                top_k: int = 5) -> Explanation:
        """Predict `image` and explain `target`: a class (name or index; default the
        predicted one for classification, the largest predicted class for segmentation, the
        class of the chosen detection for detection) or, for detectors, `box` (index into
        the detections, best first; default 0). Raises BadImageError for an unreadable
        file, NoDetectionError for a detector that found nothing to explain."""
        from moat.data.images import load_rgb

        rgb = image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(image)
        with self._lock:
            return self._explain(rgb, target, box, method, top_k)

    def _explain(self, rgb: Image.Image, target, box, method: str, top_k: int) -> Explanation:
        start = time.perf_counter()
        if self.task == "detection":
            result = self._detection(rgb, target, box, method)
        else:
            x = self.transform(rgb)[None].to(self.device)
            view = self._denormalise(x[0])
            with torch.no_grad(), record_attention(self.model) as maps:
                output = self.model(x)
            if self.task == "classification":
                result = self._classification(x, output, target, method, top_k)
            else:
                result = self._segmentation(x, output, target, method)
            result.update(image=view, attention=self._attention(maps, x.shape[-2:]),
                          attention_maps=maps)
        return Explanation(task=self.task, seconds=time.perf_counter() - start, **result)

    def _classification(self, x: Tensor, logits: Tensor, target, method: str,
                        top_k: int) -> dict[str, Any]:
        probs = logits.float().softmax(-1)[0].cpu()
        names = self._names(len(probs))
        values, indices = probs.topk(max(1, min(top_k, len(probs))))
        index = _class_index(target, names, int(indices[0]))
        cams = class_activation_maps(self.model, x, class_score(index), method=method)
        return dict(target=f"class {names[index]!r} ({index})",
                    predictions=[{"label": names[i], "index": i, "probability": round(p, 6)}
                                 for p, i in zip(values.tolist(), indices.tolist())],
                    cams=self._on_input(cams, x.shape[-2:]))

    def _segmentation(self, x: Tensor, logits: Tensor, target, method: str) -> dict[str, Any]:
        names = self._names(logits.shape[1])
        mask = logits.argmax(1)[0].cpu()
        ids, counts = mask.unique(return_counts=True)
        largest = int(ids[counts.argmax()])
        index = _class_index(target, names, largest)
        cams = class_activation_maps(self.model, x, mask_score(index), method=method)
        shares = sorted(zip(counts.tolist(), ids.tolist()), reverse=True)
        return dict(target=f"class {names[index]!r} ({index}) over its predicted pixels",
                    predictions=[{"label": names[i], "index": i,
                                  "share": round(c / mask.numel(), 6)} for c, i in shares],
                    cams=self._on_input(cams, x.shape[-2:]), mask=mask.numpy())

    def _detection(self, rgb: Image.Image, target, box: int | None,
                   method: str) -> dict[str, Any]:
        names = self.class_names
        image = _to_uint8_tensor(rgb).float().div(255).to(self.device)
        transformed, _ = self.model.transform([image])
        padded = tuple(transformed.tensors.shape[-2:])
        resized = tuple(transformed.image_sizes[0])
        with torch.no_grad(), record_attention(self.model) as maps:
            out = self.model([image])[0]
        order = out["scores"].argsort(descending=True)
        if target is not None:  # the best detection of that class
            label = _class_index(target, names, 0) + 1
            order = order[out["labels"][order] == label]
        if box is not None:
            order = order[box:]
        if len(order) == 0:
            raise NoDetectionError("no detection to explain" + (
                f" of class {target!r}" if target is not None else "") +
                ": try another image, class or box")
        chosen = int(order[0])
        label = int(out["labels"][chosen])
        score = box_score(out["boxes"][chosen].detach(), label)
        cams = class_activation_maps(self.model, [image], score, method=method)

        def on_image(maps: dict[str, Tensor]) -> dict[str, np.ndarray]:
            return {k: _resize(to_input_size(v, padded)[..., :resized[0], :resized[1]],
                               (rgb.height, rgb.width)) for k, v in maps.items()}

        detections = [{"label": names[int(l) - 1] if 0 < int(l) <= len(names) else str(int(l)),
                       "index": int(l), "score": round(float(s), 6),
                       "box": [round(float(v), 2) for v in b]}
                      for b, l, s in zip(out["boxes"], out["labels"], out["scores"])]
        received = {k: m.received()[0] for k, m in maps.items()}
        return dict(image=np.asarray(rgb), predictions=detections, box=chosen,
                    target=f"box {detections[chosen]['box']} ({detections[chosen]['label']})",
                    cams={k: v[0] for k, v in on_image(cams).items()},
                    attention=on_image(received), attention_maps=maps)

    # --- helpers ------------------------------------------------------------------------------
    def _names(self, count: int) -> list[str]:
        """The class names, or the indices as names when none were given."""
        return self.class_names or [str(i) for i in range(count)]

    def _denormalise(self, x: Tensor) -> np.ndarray:
        rgb = (x.cpu().float() * self.std + self.mean).clamp(0, 1)
        return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    @staticmethod
    def _on_input(maps: dict[str, Tensor], size) -> dict[str, np.ndarray]:
        return {k: to_input_size(v, tuple(size))[0].cpu().numpy() for k, v in maps.items()}

    @staticmethod
    def _attention(maps: dict[str, AttentionMap], size) -> dict[str, np.ndarray]:
        return {k: to_input_size(m.received()[0], tuple(size)).cpu().numpy()
                for k, m in maps.items()}


def _to_uint8_tensor(rgb: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _resize(maps: Tensor, size: tuple[int, int]) -> np.ndarray:
    import torch.nn.functional as F

    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=size, mode="nearest")
    return out.reshape(*lead, *size).cpu().numpy()
