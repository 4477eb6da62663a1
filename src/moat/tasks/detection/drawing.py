"""Drawing detections: boxes, labels, scores and mask overlays in class colours."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def _palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0))
            for i in range(n)]


def draw_detections(image: Tensor, output: Mapping[str, Tensor], class_names: Sequence[str],
                    score_threshold: float = 0.5, mask_threshold: float = 0.5,
                    mask_alpha: float = 0.45) -> Tensor:
    """The uint8 CHW image with mask overlays, boxes and "name score" labels of the detections
    scoring at least `score_threshold` (torchvision's draw_segmentation_masks /
    draw_bounding_boxes). Colours follow the class."""
    keep = output["scores"] >= score_threshold
    boxes = output["boxes"][keep].float().cpu()
    labels = output["labels"][keep].cpu().tolist()
    scores = output["scores"][keep].float().cpu().tolist()
    palette = _palette(len(class_names) + 1)
    colors = [palette[label] for label in labels]
    out = image.cpu()
    if "masks" in output and len(labels):
        masks = output["masks"][keep][:, 0].float().cpu() > mask_threshold
        out = draw_segmentation_masks(out, masks, alpha=mask_alpha, colors=colors)
    if len(labels):
        text = [f"{class_names[label - 1] if 0 < label <= len(class_names) else label} "
                f"{score:.2f}" for label, score in zip(labels, scores)]
        width = max(1, round(max(image.shape[-2:]) / 300))
        out = draw_bounding_boxes(out, boxes, labels=text, colors=colors, width=width)
    return out
