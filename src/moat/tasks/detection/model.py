"""Detectors on a MOAT + FPN backbone (torchvision's detection framework).

* `MoatFPN`: a `moat.tasks.backbone` MOAT ("detection" preset: 14x14 window attention at
  stride 16, global attention at stride 32, shortcut pool 3; any input size) followed by
  torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool`: five maps at strides
  4..64 with `out_channels` channels, as `BackboneWithFPN` gives for ResNets.
* `build_detector(arch, variant, num_classes)`: "faster_rcnn", "mask_rcnn" (torchvision's
  `FasterRCNN` / `MaskRCNN`), "cascade_rcnn" or "cascade_mask_rcnn" (`cascade.py`, the
  detector of the MOAT paper's COCO results).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from moat.errors import InvalidInputError
from moat.tasks.backbone import MoatBackbone, build_backbone
from moat.tasks.detection.cascade import CascadeRCNN
from moat.tasks.detection.mask_loss import MaskAwareRoIHeads
from moat.weights.catalogue import release

ARCHITECTURES = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn")


class MoatFPN(nn.Module):
    """MOAT body + torchvision FPN (+ max-pooled extra level), torchvision's backbone API:
    `forward(images) -> OrderedDict[name, NCHW map]` and `out_channels`.

    Output names: the body's endpoints ("stage2".."stage5": strides 4, 8, 16, 32) and "pool"
    (stride 64, RPN only).
    """

    def __init__(self, body: MoatBackbone, out_channels: int = 256,
                 norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
        self.out_channels = out_channels

    @property
    def featmap_names(self) -> list[str]:
        """The FPN levels the RoI heads pool from (all but "pool")."""
        return list(self.body.names)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body.forward_dict(x))


def moat_fpn_backbone(
    variant: str,
    out_channels: int = 256,
    *,
    preset: str = "detection",
    out_indices: Sequence[int] = (1, 2, 3, 4),
    frozen_stages: int = -1,
    freeze_bn: bool = False,
    grad_checkpointing: bool = False,
    weights=None,
    drop_path_rate: float | None = None,
    **overrides,
) -> MoatFPN:
    """A MOAT + FPN backbone. Arguments as `moat.tasks.backbone.build_backbone`: frozen_stages
    -1 (none), 0 (stem) .. 4; freeze_bn turns BatchNorm into FrozenBatchNorm2d (the usual
    choice when fine-tuning pretrained weights at small per-device batches); weights loads
    pretrained backbone weights; overrides change the preset's window_size /
    global_attention_at_end / pool_size."""
    body = build_backbone(variant, preset, out_indices=out_indices, frozen_stages=frozen_stages,
                          freeze_bn=freeze_bn, grad_checkpointing=grad_checkpointing,
                          weights=weights, drop_path_rate=drop_path_rate, **overrides)
    return MoatFPN(body, out_channels)


def area_scaled(coco_value: int, min_size: int, floor: int) -> int:
    """A per-image count that torchvision sets for COCO's 800 px images (RoIs sampled for the
    box loss: 512; proposals kept at test time: 1000), in proportion to the image area at
    shorter side `min_size` (its candidate regions scale with it), within floor..coco_value.
    At 96 px, 64 sampled RoIs make a tiny-MOAT-0 Cascade R-CNN training step on a CPU cost
    a fifth of 512's (1.75 s vs 9.3 s, batch 4)."""
    return max(floor, min(coco_value, round(coco_value * (min_size / 800) ** 2)))


def build_detector(
    arch: str = "cascade_mask_rcnn",
    variant: str = "tiny_moat_0",
    num_classes: int = 80,
    *,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int | Sequence[int]] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    representation_size: int = 1024,
    mask_channels: int = 256,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    train_resize: bool = False,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    preset: str = "detection",
    frozen_stages: int = -1,
    freeze_bn: bool = False,
    grad_checkpointing: bool = False,
    weights=None,
    drop_path_rate: float | None = None,
    **backbone_overrides,
) -> nn.Module:
    """A torchvision detector on a MOAT + FPN backbone.

    Args:
        arch: "faster_rcnn", "mask_rcnn", "cascade_rcnn" or "cascade_mask_rcnn".
        variant: MOAT variant of the backbone, e.g. "tiny_moat_0" or "moat_0".
        num_classes: object categories, without the background (the heads get one more).
        fpn_channels: FPN width (256 as in the papers; smaller is faster).
        min_size, max_size: evaluation resize of the detector's transform (shorter side,
            longer-side cap); images are mapped back to their own size in the outputs.
        train_resize: False (default) leaves training images at the size the data pipeline
            made (its scale jitter, see `moat.data.coco.train_transforms`); True resizes them
            like evaluation images.
        anchor_sizes: anchor size(s) per FPN level (5 levels): a number or a list of
            sizes each, every size with every one of `aspect_ratios`.
        representation_size: width of the two-layer box heads; mask_channels: width of the
            four mask-head convs.
        rpn_* / box_*: torchvision's FasterRCNN settings of the same names.
        image_mean, image_std: normalisation on [0, 1] images; default the variant's
            released checkpoints' (`moat.data.preprocessing`).
        preset, frozen_stages, freeze_bn, grad_checkpointing, weights, drop_path_rate,
            backbone_overrides: the backbone's (`moat_fpn_backbone`).

    Returns a `torchvision.models.detection.GeneralizedRCNN`: in train mode
    `model(images, targets)` gives a dict of losses, in eval mode `model(images)` a list of
    {"boxes" (XYXY), "labels" (1..num_classes), "scores"[, "masks" [N,1,H,W]]} per image.
    """
    if arch not in ARCHITECTURES:
        raise InvalidInputError(f"unknown detector {arch!r}; choose one of {list(ARCHITECTURES)}")
    if num_classes < 1:
        raise InvalidInputError(f"num_classes must be at least 1, got {num_classes}")
    backbone = moat_fpn_backbone(
        variant, fpn_channels, preset=preset, frozen_stages=frozen_stages, freeze_bn=freeze_bn,
        grad_checkpointing=grad_checkpointing, weights=weights, drop_path_rate=drop_path_rate,
        **backbone_overrides)
    levels = len(backbone.featmap_names) + 1  # + the max-pooled level
    if len(anchor_sizes) != levels:
        raise InvalidInputError(f"anchor_sizes needs one size per FPN level ({levels}), "
                                f"got {list(anchor_sizes)}")
    sizes = tuple(tuple(int(v) for v in s) if isinstance(s, Sequence) else (int(s),)
                  for s in anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(float(a) for a in aspect_ratios),) * levels)
    data = release(variant).data_config()
    names = backbone.featmap_names
    box_roi_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    common = dict(
        min_size=min_size, max_size=max_size,
        image_mean=list(image_mean or data["mean"]), image_std=list(image_std or data["std"]),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=box_roi_pool, box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh, box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        _skip_resize=not train_resize,  # GeneralizedRCNNTransform: no resize in training
    )
    mask = {}
    if arch.endswith("mask_rcnn"):
        mask = dict(mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
                    mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, 1),
                    mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels,
                                                     num_classes + 1))
    if arch.startswith("cascade"):
        model = CascadeRCNN(backbone, num_classes + 1, representation_size=representation_size,
                            **common, **mask)
    else:
        box = dict(box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
                   box_predictor=FastRCNNPredictor(representation_size, num_classes + 1))
        model = (MaskRCNN if mask else FasterRCNN)(backbone, None, **common, **box, **mask)
        if mask:  # its mask loss leaves out the objects without a mask (`mask_loss.py`)
            model.roi_heads.__class__ = MaskAwareRoIHeads
    model.arch = arch
    return model
