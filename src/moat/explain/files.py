"""`moat explain` as a library function: explain image files and write the pictures, the
arrays (.npz) and the predictions (.json) of each."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from moat.data.folders import output_names
from moat.errors import InvalidInputError
from moat.explain.explainer import Explainer, Explanation, NoDetectionError
from moat.explain.render import attention_row, boxes_image, cam_row, mask_overlay
from moat.atomic import atomic_output
from moat.device import pick_device


def _atomic(path: Path, write) -> str:
    """write(temporary path) then rename it onto `path` (moat.atomic.atomic_output): no
    half-written file is ever left."""
    with atomic_output(path) as tmp:
        write(str(tmp))
    return str(path)


def write_explanation(expl: Explanation, output_dir: str | os.PathLike, stem: str) -> list[str]:
    """<stem>_cam.png (all stages), <stem>_attention_<block>.png (mean + heads per MOAT
    block), <stem>_mask.png or <stem>_boxes.png for dense tasks, <stem>_maps.npz (every map
    as an array) and <stem>.json (predictions, target). Returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_atomic(out / f"{stem}_cam.png", lambda p: cam_row(expl).save(p, format="PNG"))]
    for block in expl.attention:
        paths.append(_atomic(out / f"{stem}_attention_{block.replace('.', '_')}.png",
                             lambda p, b=block: attention_row(expl, b).save(p, format="PNG")))
    if expl.mask is not None:
        picture = mask_overlay(expl.image, expl.mask)
        paths.append(_atomic(out / f"{stem}_mask.png",
                             lambda p: Image.fromarray(picture).save(p, format="PNG")))
    if expl.task == "detection":
        picture = boxes_image(expl.image, expl.predictions, highlight=expl.box)
        paths.append(_atomic(out / f"{stem}_boxes.png",
                             lambda p: Image.fromarray(picture).save(p, format="PNG")))
    arrays = {"image": expl.image, **{f"cam_{k}": v for k, v in expl.cams.items()},
              **{f"attention_{k}": v for k, v in expl.attention.items()}}
    if expl.mask is not None:
        arrays["mask"] = expl.mask

    def save_npz(p: str) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)
    paths.append(_atomic(out / f"{stem}_maps.npz", save_npz))
    summary = {"task": expl.task, "target": expl.target, "predictions": expl.predictions,
               "seconds": round(expl.seconds, 3)}
    paths.append(_atomic(out / f"{stem}.json", lambda p: Path(p).write_text(
        json.dumps(summary, indent=1) + "\n")))
    return paths


def explain_files(images: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                  model: str | None = None, checkpoint: str | os.PathLike | None = None,
                  target: int | str | None = None, box: int | None = None,
                  method: str = "hirescam", img_size: int | None = None,
                  device: str = "cpu") -> list[dict]:
    """Explain each image (files, or folders of images) with the model named `model` or the
    training `checkpoint`; write its files into output_dir, named after the image's stem made
    unique among the images (`moat.data.folders.output_names`). Returns per image {"path",
    "target", "predictions", "files"}, or {"path", "error"} for an unreadable image or one
    with no detection to explain."""
    from moat.data.images import BadImageError
    from moat.train.eval_predict import expand_images

    if (model is None) == (checkpoint is None):
        raise InvalidInputError("give exactly one of --model NAME or --checkpoint RUN")
    device = pick_device(device)  # checked before any model is built
    explainer = (Explainer.from_name(model, device=device, img_size=img_size) if model
                 else Explainer.from_checkpoint(checkpoint, device=device, img_size=img_size))
    results = []
    paths = expand_images(images)
    for path, name in zip(paths, output_names(paths)):
        try:
            expl = explainer.explain(path, target, box=box, method=method)
        except (BadImageError, NoDetectionError) as err:
            results.append({"path": str(path), "error": str(err)})
            continue
        files = write_explanation(expl, output_dir, name)
        results.append({"path": str(path), "target": expl.target,
                        "predictions": expl.predictions, "files": files})
    return results
