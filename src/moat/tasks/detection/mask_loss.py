"""The mask head's training loss over the objects that have a mask.

A COCO dataset may give some objects a segmentation and others only a box. The loader marks
each object (`has_mask` in the target, `moat.data.coco`); the loss here is torchvision's
`maskrcnn_loss` over the positive RoIs whose matched object has a mask, so a box-only object
trains the box and class heads but never teaches the mask head a box-shaped mask. Targets
without `has_mask` count every object as masked (torchvision's behaviour).

* `instance_mask_loss`: the loss, for Cascade Mask R-CNN's heads (`cascade.py`) and
* `MaskAwareRoIHeads`: torchvision's Mask R-CNN heads with it (`model.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss

__all__ = ["masked_positives", "instance_mask_loss", "MaskAwareRoIHeads"]


def masked_positives(labels: list[Tensor], matched: list[Tensor],
                     targets: list[dict[str, Tensor]]) -> list[Tensor]:
    """Per image, the indices of the sampled RoIs that train the mask head: positive (label
    > 0) and matched to an object whose `has_mask` is True."""
    out = []
    for lab, m, target in zip(labels, matched, targets):
        keep = lab > 0
        has_mask = target.get("has_mask")
        if has_mask is not None and has_mask.numel():
            keep = keep & has_mask[m]
        out.append(torch.where(keep)[0])
    return out


def instance_mask_loss(heads: RoIHeads, features: dict[str, Tensor], rois: list[Tensor],
                       labels: list[Tensor], matched: list[Tensor],
                       image_shapes: list[tuple[int, int]],
                       targets: list[dict[str, Tensor]]) -> Tensor:
    """`maskrcnn_loss` of `heads`' mask branch on the sampled RoIs `rois` (their `labels` and
    `matched` ground-truth indices) that `masked_positives` keeps; 0 (still a function of
    the mask head's weights) when none is kept."""
    keep = masked_positives(labels, matched, targets)
    mask_rois = [r[k] for r, k in zip(rois, keep)]
    mask_matched = [m[k] for m, k in zip(matched, keep)]
    logits = heads.mask_predictor(heads.mask_head(
        heads.mask_roi_pool(features, mask_rois, image_shapes)))
    return maskrcnn_loss(logits, mask_rois, [t["masks"] for t in targets],
                         [t["labels"] for t in targets], mask_matched)


class MaskAwareRoIHeads(RoIHeads):
    """torchvision's Mask R-CNN heads whose training mask loss is `instance_mask_loss`: the
    box branch runs as torchvision's with the mask branch switched off, then the mask loss
    is computed on the RoIs that branch sampled. Inference is torchvision's."""

    _boxes_only = False

    def has_mask(self) -> bool:
        return not self._boxes_only and super().has_mask()

    def select_training_samples(self, proposals, targets):
        self._sampled = super().select_training_samples(proposals, targets)
        return self._sampled

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]], targets: Any = None):
        if not (self.training and self.has_mask()):
            return super().forward(features, proposals, image_shapes, targets)
        self.check_targets(targets)  # with the mask branch on: targets need masks
        self._boxes_only = True
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            self._boxes_only = False
        rois, matched, labels, _ = self._sampled
        del self._sampled
        losses["loss_mask"] = instance_mask_loss(self, features, rois, labels, matched,
                                                 image_shapes, targets)
        return result, losses
