"""Cascade (Mask) R-CNN (Cai & Vasconcelos, 2018) on torchvision's detection components.

The detector MOAT reports on COCO. Three box stages with rising IoU thresholds refine the RPN's
proposals in turn:

* stage k matches its input boxes to the ground truth at IoU `thresholds[k]` (0.5, 0.6, 0.7;
  no ignore band, as in Cascade R-CNN), samples them with torchvision's
  `BalancedPositiveNegativeSampler` (ground-truth boxes are added as proposals at every stage)
  and encodes regression targets with its own `BoxCoder` weights ((10,10,5,5), (20,20,10,10),
  (30,30,15,15): the targets shrink as the boxes get better, so each stage normalises them);
* the regression is class-agnostic (one box per RoI) and the refined boxes, detached, are the
  next stage's proposals (refined ground-truth proposals are dropped: the next stage adds the
  ground truth again);
* losses are weighted 1, 0.5, 0.25 across the stages;
* at inference the class scores are the mean of the three stages' softmax scores (each stage
  scoring the boxes it received) and the boxes are the last stage's; then torchvision's
  per-class score threshold, hard NMS (`batched_nms`) and top-k;
* the mask head (torchvision's `MaskRCNNHeads` / `MaskRCNNPredictor`) runs on the final
  detections, and is trained on the last stage's positive samples whose object has a mask
  (`mask_loss.py`: box-only objects train the boxes, not the masks).

Everything not listed above is torchvision's: `CascadeRoIHeads` subclasses `RoIHeads` and
reuses its sampling, ground-truth proposals, post-processing and mask inference;
`CascadeRCNN` subclasses `FasterRCNN` for the transform and RPN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from moat.errors import InvalidInputError
from moat.tasks.detection.mask_loss import instance_mask_loss

__all__ = ["CASCADE_IOU_THRESHOLDS", "CASCADE_BOX_WEIGHTS", "CASCADE_LOSS_WEIGHTS",
           "AgnosticBoxPredictor", "CascadeStage", "CascadeRoIHeads", "CascadeRCNN",
           "agnostic_fastrcnn_loss"]

CASCADE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class AgnosticBoxPredictor(FastRCNNPredictor):
    """torchvision's box predictor with one class-agnostic box per RoI (4 outputs, not 4*C).

    Initialised as in Cascade R-CNN: classifier normal(0, 0.01), regressor normal(0, 0.001).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)


class CascadeStage(nn.Module):
    """One cascade stage: its box head and predictor, IoU threshold and box coder."""

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module, iou_thresh: float,
                 box_weights: Sequence[float]) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.iou_thresh = float(iou_thresh)
        self.box_weights = tuple(float(w) for w in box_weights)
        # Equal low and high thresholds: no ignored band between background and foreground.
        self.proposal_matcher = det_utils.Matcher(iou_thresh, iou_thresh,
                                                  allow_low_quality_matches=False)
        self.box_coder = det_utils.BoxCoder(self.box_weights)

    def forward(self, box_features: Tensor) -> tuple[Tensor, Tensor]:
        return self.box_predictor(self.box_head(box_features))

    def extra_repr(self) -> str:
        return f"iou_thresh={self.iou_thresh}, box_weights={self.box_weights}"


def agnostic_fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                           regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """torchvision's `fastrcnn_loss` for class-agnostic regression ([N, 4] deltas): cross
    entropy over the sampled RoIs, smooth L1 (beta 1/9) over the positives divided by the
    number of sampled RoIs."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    box_loss = F.smooth_l1_loss(box_regression[positive], regression_targets[positive],
                                beta=1 / 9, reduction="sum") / max(labels.numel(), 1)
    return classification_loss, box_loss


class CascadeRoIHeads(RoIHeads):
    """RoI heads of Cascade (Mask) R-CNN: `stages` share the box RoI pooler; see the module
    docstring for the training and inference rules."""

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        stages: Sequence[CascadeStage],
        stage_loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        if len(stage_loss_weights) != len(stages):
            raise InvalidInputError(f"{len(stages)} stages but {len(stage_loss_weights)} loss "
                                    f"weights")
        last = stages[-1]
        # The base class keeps the sampler, thresholds and mask parts; its matcher and coder
        # are the first and last stage's (the coder decodes the final boxes).
        super().__init__(box_roi_pool, None, None, stages[0].iou_thresh, stages[0].iou_thresh,
                         batch_size_per_image, positive_fraction, last.box_weights,
                         score_thresh, nms_thresh, detections_per_img,
                         mask_roi_pool, mask_head, mask_predictor)
        self.stages = nn.ModuleList(stages)
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)

    # --- training targets ---------------------------------------------------------------

    def match(self, stage: int, proposals: list[Tensor], gt_boxes: list[Tensor],
              gt_labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's proposal assignment with stage `stage`'s matcher.

        Returns, per image, the matched ground-truth index of every proposal (0 where
        unmatched) and its label: the ground truth's class at IoU >= the stage's threshold,
        else 0 (background).
        """
        # RoIHeads.assign_targets_to_proposals only reads `self.proposal_matcher`: call it on
        # the stage, which carries its own.
        return RoIHeads.assign_targets_to_proposals(self.stages[stage], proposals, gt_boxes,
                                                    gt_labels)

    def stage_targets(self, stage: int, proposals: list[Tensor], gt_boxes: list[Tensor],
                      gt_labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Labels and regression targets (stage's box weights) of every proposal, unsampled."""
        matched, labels = self.match(stage, proposals, gt_boxes, gt_labels)
        matched_boxes = [gt[m] if gt.numel() else torch.zeros_like(p)
                         for gt, m, p in zip(gt_boxes, matched, proposals)]
        return labels, list(self.stages[stage].box_coder.encode(matched_boxes, proposals))

    def select_stage_samples(self, stage: int, proposals: list[Tensor],
                             targets: list[dict[str, Tensor]]):
        """Stage `stage`'s training RoIs: proposals + ground truth, matched at the stage's IoU,
        sampled (`batch_size_per_image`, `positive_fraction`), regression targets encoded with
        the stage's weights. Also returns which sampled RoIs are ground-truth boxes."""
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        num_proposals = [len(p) for p in proposals]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.match(stage, proposals, gt_boxes, gt_labels)
        sampled = self.subsample(labels)
        rois, matched, roi_labels, from_gt, matched_boxes = [], [], [], [], []
        for img, inds in enumerate(sampled):
            rois.append(proposals[img][inds])
            roi_labels.append(labels[img][inds])
            matched.append(matched_idxs[img][inds])
            from_gt.append(inds >= num_proposals[img])
            gt = gt_boxes[img]
            if gt.numel() == 0:
                gt = torch.zeros((1, 4), dtype=dtype, device=device)
            matched_boxes.append(gt[matched[-1]])
        regression_targets = list(self.stages[stage].box_coder.encode(matched_boxes, rois))
        return rois, matched, roi_labels, regression_targets, from_gt

    # --- forward ------------------------------------------------------------------------

    def _refine(self, stage: int, box_regression: Tensor, rois: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Decode a stage's class-agnostic deltas on its RoIs, clipped to each image (in
        float32: half-precision coordinates are off by up to 0.5 px beyond 1024)."""
        boxes = self.stages[stage].box_coder.decode(box_regression.float(), rois)[:, 0]
        return [box_ops.clip_boxes_to_image(b, shape)
                for b, shape in zip(boxes.split([len(r) for r in rois]), image_shapes)]

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            self.check_targets(targets)
            return [], self._forward_train(features, proposals, image_shapes, targets)
        return self._forward_test(features, proposals, image_shapes), {}

    def _forward_train(self, features, proposals, image_shapes, targets):
        losses: dict[str, Tensor] = {}
        for k, (stage, weight) in enumerate(zip(self.stages, self.stage_loss_weights)):
            rois, matched, labels, regression_targets, from_gt = self.select_stage_samples(
                k, proposals, targets)
            class_logits, box_regression = stage(self.box_roi_pool(features, rois, image_shapes))
            loss_cls, loss_box = agnostic_fastrcnn_loss(class_logits, box_regression, labels,
                                                        regression_targets)
            losses[f"loss_classifier_{k}"] = weight * loss_cls
            losses[f"loss_box_reg_{k}"] = weight * loss_box
            if k + 1 < len(self.stages):
                refined = self._refine(k, box_regression.detach(), rois, image_shapes)
                proposals = [b[~g] for b, g in zip(refined, from_gt)]
        if self.has_mask():
            losses["loss_mask"] = instance_mask_loss(self, features, rois, labels, matched,
                                                     image_shapes, targets)
        return losses

    def _forward_test(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        rois, probs = proposals, None
        for k, stage in enumerate(self.stages):
            class_logits, box_regression = stage(self.box_roi_pool(features, rois, image_shapes))
            p = F.softmax(class_logits.float(), -1)
            probs = p if probs is None else probs + p
            if k + 1 < len(self.stages):
                rois = self._refine(k, box_regression, rois, image_shapes)
        probs = probs / len(self.stages)
        # torchvision's post-processing (decode with the last stage's coder, clip, per-class
        # score threshold, small-box removal, batched NMS, top-k) takes logits and per-class
        # deltas: log of the averaged probabilities softmaxes back to them, and the agnostic
        # deltas are repeated for every class.
        num_classes = probs.shape[-1]
        boxes, scores, labels = self.postprocess_detections(
            probs.clamp_min(1e-12).log(), box_regression.float().repeat(1, num_classes), rois,
            image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s}
                  for b, s, lab in zip(boxes, scores, labels)]
        if self.has_mask():
            mask_logits = self.mask_predictor(self.mask_head(
                self.mask_roi_pool(features, [r["boxes"] for r in result], image_shapes)))
            for mask_prob, r in zip(maskrcnn_inference(mask_logits,
                                                       [r["labels"] for r in result]), result):
                r["masks"] = mask_prob
        return result


class CascadeRCNN(FasterRCNN):
    """Cascade R-CNN, or Cascade Mask R-CNN when a mask head is given.

    Takes FasterRCNN's arguments (transform, anchors, RPN, box inference settings) plus the
    cascade's: per-stage IoU thresholds, box-coder weights and loss weights, and the size of
    each stage's two-layer box head. Each stage has its own `TwoMLPHead` and
    `AgnosticBoxPredictor`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        iou_thresholds: Sequence[float] = CASCADE_IOU_THRESHOLDS,
        box_weights: Sequence[Sequence[float]] = CASCADE_BOX_WEIGHTS,
        stage_loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS,
        representation_size: int = 1024,
        box_roi_pool: MultiScaleRoIAlign | None = None,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        **kwargs,
    ) -> None:
        if not len(iou_thresholds) == len(box_weights) == len(stage_loss_weights):
            raise InvalidInputError("iou_thresholds, box_weights and stage_loss_weights need one "
                                    "entry per stage")
        if box_roi_pool is None:
            box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        resolution = box_roi_pool.output_size[0]
        in_features = backbone.out_channels * resolution ** 2
        stages = [CascadeStage(TwoMLPHead(in_features, representation_size),
                               AgnosticBoxPredictor(representation_size, num_classes), iou, w)
                  for iou, w in zip(iou_thresholds, box_weights)]
        # FasterRCNN builds the transform and the RPN; its single-stage RoI heads are replaced.
        super().__init__(backbone, None, box_roi_pool=box_roi_pool,
                         box_head=stages[0].box_head, box_predictor=stages[0].box_predictor,
                         **kwargs)
        self.roi_heads = CascadeRoIHeads(
            box_roi_pool, stages, stage_loss_weights, box_batch_size_per_image,
            box_positive_fraction, box_score_thresh, box_nms_thresh, box_detections_per_img,
            mask_roi_pool, mask_head, mask_predictor)
