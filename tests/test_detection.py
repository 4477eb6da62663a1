"""Detection: the cascade's per-stage targets and decoding, COCO loading and augmentation, COCO
evaluation against pycocotools (also split over two processes), checkpoint round trip, and a
few steps of the shared training loop."""

from __future__ import annotations

import copy
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings(  # pycocotools' mask decoding under NumPy 2
    "ignore:__array__ implementation:DeprecationWarning")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from torchvision.models.detection._utils import BoxCoder  # noqa: E402
from torchvision.models.detection.faster_rcnn import TwoMLPHead  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from moat.data.coco import (CocoDetection, coco_evaluate,  # noqa: E402
                            detections_to_coco, load_coco, train_transforms)
from moat.tasks.detection.cascade import (CASCADE_BOX_WEIGHTS, CASCADE_IOU_THRESHOLDS,  # noqa: E402
                                AgnosticBoxPredictor, CascadeRoIHeads, CascadeStage)
from moat.tasks.detection import DetectionTask, build_detector  # noqa: E402

TINY = dict(fpn_channels=16, representation_size=32, mask_channels=8, min_size=64, max_size=64,
            anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=100,
            rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
            box_batch_size_per_image=32)


# --- the cascade ----------------------------------------------------------------------------

def _heads(num_classes: int = 3, channels: int = 4, mask: bool = False, **kwargs):
    stages = [CascadeStage(TwoMLPHead(channels * 7 * 7, 16), AgnosticBoxPredictor(16, num_classes),
                           iou, w) for iou, w in zip(CASCADE_IOU_THRESHOLDS, CASCADE_BOX_WEIGHTS)]
    extra = {}
    if mask:
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        extra = dict(mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                     mask_head=MaskRCNNHeads(channels, [4], 1),
                     mask_predictor=MaskRCNNPredictor(4, 4, num_classes))
    return CascadeRoIHeads(MultiScaleRoIAlign(["0"], 7, 2), stages, **extra, **kwargs)


GT = torch.tensor([[0.0, 0.0, 100.0, 100.0], [200.0, 200.0, 300.0, 300.0]])
GT_LABELS = torch.tensor([1, 2])
# Proposals and their IoU with the first ground-truth box (the last one is the second's).
PROPOSALS = torch.tensor([
    [0.0, 0.0, 100.0, 100.0],   # IoU 1.0
    [0.0, 0.0, 100.0, 75.0],    # 0.75
    [0.0, 0.0, 100.0, 65.0],    # 0.65
    [0.0, 0.0, 100.0, 55.0],    # 0.55
    [0.0, 0.0, 100.0, 45.0],    # 0.45
    [200.0, 200.0, 300.0, 262.0],  # 0.62 with the second box
])


def _expected_targets(proposal, gt, weights):
    wx, wy, ww, wh = weights
    pw, ph = proposal[2] - proposal[0], proposal[3] - proposal[1]
    px, py = proposal[0] + pw / 2, proposal[1] + ph / 2
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    gx, gy = gt[0] + gw / 2, gt[1] + gh / 2
    return [wx * (gx - px) / pw, wy * (gy - py) / ph, ww * math.log(gw / pw), wh * math.log(gh / ph)]


def test_cascade_stage_assignment_follows_each_iou_threshold():
    heads = _heads()
    expected_labels = {0: [1, 1, 1, 1, 0, 2], 1: [1, 1, 1, 0, 0, 2], 2: [1, 1, 0, 0, 0, 0]}
    for stage, weights in enumerate(CASCADE_BOX_WEIGHTS):
        labels, targets = heads.stage_targets(stage, [PROPOSALS], [GT], [GT_LABELS])
        assert labels[0].tolist() == expected_labels[stage], stage
        for i, label in enumerate(expected_labels[stage]):  # positives: towards their box
            if label == 0:
                continue  # background: no regression target
            gt = GT[label - 1]
            want = torch.tensor(_expected_targets(PROPOSALS[i].tolist(), gt.tolist(), weights))
            torch.testing.assert_close(targets[0][i], want, atol=1e-5, rtol=1e-5)
    # Hand numbers: proposal (0,0,100,65) vs (0,0,100,100): dy = w_y*17.5/65, dh = w_h*ln(100/65).
    _, targets = heads.stage_targets(2, [PROPOSALS], [GT], [GT_LABELS])
    torch.testing.assert_close(targets[0][2], torch.tensor(
        [0.0, 30 * 17.5 / 65, 0.0, 15 * math.log(100 / 65)]), atol=1e-5, rtol=1e-5)


def test_cascade_image_without_objects_is_all_background():
    heads = _heads()
    for stage in range(3):
        labels, _ = heads.stage_targets(stage, [PROPOSALS], [torch.zeros(0, 4)],
                                        [torch.zeros(0, dtype=torch.int64)])
        assert labels[0].tolist() == [0] * len(PROPOSALS)


def test_box_coder_decodes_known_numbers_and_round_trips():
    proposal = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # w 20, h 40, centre (20, 40)
    for weights in CASCADE_BOX_WEIGHTS:
        coder = BoxCoder(weights)
        wx, wy, ww, wh = weights
        # centre + (0.1 w, -0.2 h), width x2, height unchanged -> (2, 12, 42, 52)
        deltas = torch.tensor([[wx * 0.1, wy * -0.2, ww * math.log(2.0), 0.0]])
        decoded = coder.decode(deltas, [proposal])[:, 0]
        torch.testing.assert_close(decoded, torch.tensor([[2.0, 12.0, 42.0, 52.0]]))
        torch.testing.assert_close(coder.encode([decoded], [proposal])[0], deltas,
                                   atol=1e-5, rtol=1e-5)
        gt = torch.tensor([[3.0, 7.0, 50.0, 44.0], [0.0, 0.0, 1.0, 1.0]])
        props = torch.tensor([[5.0, 5.0, 40.0, 40.0], [0.5, 0.5, 2.0, 3.0]])
        codes = coder.encode([gt], [props])[0]
        torch.testing.assert_close(coder.decode(codes, [props])[:, 0], gt, atol=1e-4, rtol=1e-5)
    assert [s.box_coder.weights for s in _heads().stages] == list(CASCADE_BOX_WEIGHTS)


def _features(channels: int = 4, size: int = 40):
    return {"0": torch.randn(1, channels, size, size)}


def test_cascade_training_refines_detached_boxes_for_the_next_stage():
    torch.manual_seed(0)
    heads = _heads(batch_size_per_image=64, positive_fraction=1.0)
    heads.train()
    with torch.no_grad():  # stage 0 moves every box right by 0.1 of its width
        heads.stages[0].box_predictor.bbox_pred.weight.zero_()
        heads.stages[0].box_predictor.bbox_pred.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    seen = []
    original = heads.select_stage_samples

    def record(stage, proposals, targets):
        seen.append([p.clone() for p in proposals])
        out = original(stage, proposals, targets)
        seen[-1].append(out[0][0])  # the sampled RoIs
        seen[-1].append(out[4][0])  # which of them are ground truth
        return out

    heads.select_stage_samples = record
    targets = [{"boxes": GT * 0.5, "labels": GT_LABELS}]
    losses = heads(_features(), [PROPOSALS * 0.5], [(160, 160)], targets)[1]
    assert set(losses) == {f"loss_{k}_{s}" for k in ("classifier", "box_reg") for s in range(3)}
    assert all(torch.isfinite(v) for v in losses.values())
    stage0_rois, stage0_gt = seen[0][1], seen[0][2]
    stage1_input = seen[1][0]
    w = stage0_rois[:, 2] - stage0_rois[:, 0]
    shifted = stage0_rois + torch.stack([0.1 * w, 0 * w, 0.1 * w, 0 * w], dim=1)
    shifted[:, 0::2] = shifted[:, 0::2].clamp(0, 160)
    # The refined non-ground-truth RoIs of stage 0 are stage 1's proposals, without gradient.
    torch.testing.assert_close(stage1_input, shifted[~stage0_gt])
    assert not stage1_input.requires_grad


def test_cascade_inference_averages_stage_scores_and_keeps_last_stage_boxes():
    heads = _heads(num_classes=3, score_thresh=0.0, nms_thresh=0.5, detections_per_img=10)
    heads.eval()
    stage_logits = [torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 1.5]),
                    torch.tensor([1.0, 1.0, 1.0])]
    with torch.no_grad():
        for k, stage in enumerate(heads.stages):
            stage.box_predictor.cls_score.weight.zero_()
            stage.box_predictor.cls_score.bias.copy_(stage_logits[k])
            stage.box_predictor.bbox_pred.weight.zero_()
            stage.box_predictor.bbox_pred.bias.zero_()
        # only the last stage moves boxes: down by 0.1 of their height
        heads.stages[2].box_predictor.bbox_pred.bias.copy_(torch.tensor([0.0, 3.0, 0.0, 0.0]))
    proposal = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    result, losses = heads(_features(), [proposal], [(160, 160)])
    assert losses == {}
    probs = sum(torch.softmax(l, 0) for l in stage_logits) / 3
    det = result[0]
    assert det["labels"].tolist() == [1, 2]  # both foreground classes, best first
    torch.testing.assert_close(det["scores"], probs[1:].sort(descending=True).values)
    torch.testing.assert_close(det["boxes"], torch.tensor([[10.0, 14.0, 50.0, 54.0]] * 2))


# --- COCO data ------------------------------------------------------------------------------

def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _write_coco(root: Path) -> Path:
    """Three 40x60 images: polygon + RLE + crowd (uncompressed RLE) objects, and one empty."""
    (root / "images").mkdir(parents=True)
    for i in (1, 2, 3):
        img = np.zeros((40, 60, 3), np.uint8)
        img[5:15, 10:30] = (255, 0, 0)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
    disk = np.zeros((40, 60), np.uint8)
    yy, xx = np.mgrid[:40, :60]
    disk[(yy - 25) ** 2 + (xx - 40) ** 2 <= 64] = 1
    crowd = np.zeros((40, 60), np.uint8)
    crowd[30:38, 2:12] = 1
    counts, prev, run = [], 0, 0  # uncompressed RLE (column-major runs)
    for v in crowd.flatten(order="F"):
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 60} for i in (1, 2, 3)],
        "categories": [{"id": 7, "name": "box"}, {"id": 9, "name": "disk"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "area": 200,
             "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [32, 17, 17, 17],
             "area": float(disk.sum()), "iscrowd": 0, "segmentation": _rle(disk)},
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [2, 30, 10, 8], "area": 80,
             "iscrowd": 1, "segmentation": {"size": [40, 60], "counts": counts}},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [10, 5, 20, 10], "area": 200,
             "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_loading_polygons_rle_crowd_and_empty_images(tmp_path):
    ann = _write_coco(tmp_path)
    full = CocoDetection(tmp_path / "images", ann)
    assert full.classes == ["box", "disk"] and full.label_to_category == {1: 7, 2: 9}
    assert len(full) == 3
    image, target = full[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 60)
    assert target["labels"].tolist() == [1, 2, 2] and target["iscrowd"].tolist() == [0, 0, 1]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([10.0, 5.0, 30.0, 15.0]))
    masks = target["masks"]
    assert masks.shape == (3, 40, 60) and masks.dtype == torch.uint8
    assert masks[0, 5:15, 10:30].all() and masks[0].sum() == 200       # polygon
    assert masks[1].sum() == target["area"][1]                          # compressed RLE
    assert masks[2, 30:38, 2:12].all() and masks[2].sum() == 80         # uncompressed RLE
    assert type(target["boxes"]) is torch.Tensor

    train = CocoDetection(tmp_path / "images", ann, train=True)
    _, t = train[0]
    assert t["labels"].tolist() == [1, 2] and t["masks"].shape[0] == 2  # crowd left out
    _, empty = train[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 40, 60)
    assert len(CocoDetection(tmp_path / "images", ann, train=True, skip_empty=True)) == 2


def test_joint_augmentation_keeps_boxes_and_masks_on_the_object(tmp_path):
    ann = _write_coco(tmp_path)
    tf = train_transforms(48, 80, scale_range=(0.6, 1.6), hflip=0.5)
    ds = CocoDetection(tmp_path / "images", ann, tf, train=True)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = ds[0]
        assert image.dtype == torch.float32 and image.shape[-2:] == target["masks"].shape[-2:]
        box, mask = target["boxes"][0], target["masks"][0].bool()
        red = (image[0] > 0.5) & (image[1] < 0.5)
        # the mask covers the red rectangle (up to resampling at its border)
        assert (mask & red).sum() >= 0.85 * red.sum() and (mask & ~red).sum() <= 0.15 * mask.sum()
        ys, xs = torch.nonzero(mask, as_tuple=True)
        torch.testing.assert_close(box, torch.tensor([xs.min(), ys.min(), xs.max() + 1,
                                                      ys.max() + 1], dtype=torch.float32),
                                   atol=1.5, rtol=0)
        flips.add(bool(xs.float().mean() > image.shape[-1] / 2))
    assert flips == {True, False}  # both flipped and unflipped samples were checked


# --- objects without masks -----------------------------------------------------------------

def _mixed_masks_coco(root: Path) -> dict:
    """One 40x60 image, five objects: polygon, a 0.4 px wide sliver with a polygon (dropped
    by the augmentation), no "segmentation", an empty one, RLE."""
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "images" / "1.png")
    disk = np.zeros((40, 60), np.uint8)
    disk[20:30, 40:50] = 1
    anns = [([10, 5, 20, 10], [[10, 5, 30, 5, 30, 15, 10, 15]]),
            ([2, 2, 0.4, 20], [[2, 2, 2.4, 2, 2.4, 22, 2, 22]]),
            ([5, 20, 12, 15], None), ([25, 25, 8, 8], []), ([40, 20, 10, 10], _rle(disk))]
    annotations = []
    for i, (box, seg) in enumerate(anns, start=1):
        a = {"id": i, "image_id": 1, "category_id": 1, "bbox": box, "iscrowd": 0,
             "area": box[2] * box[3]}
        if seg is not None:
            a["segmentation"] = seg
        annotations.append(a)
    return {"images": [{"id": 1, "file_name": "1.png", "height": 40, "width": 60}],
            "categories": [{"id": 1, "name": "thing"}], "annotations": annotations}


def test_objects_without_a_mask_are_flagged_through_the_augmentation(tmp_path):
    data = _mixed_masks_coco(tmp_path)
    raw = CocoDetection(tmp_path / "images", data, train=True)
    _, target = raw[0]
    assert target["has_mask"].tolist() == [True, True, False, False, True]
    assert target["masks"][2:4].sum() == 0  # no box-shaped masks for them
    assert target["masks"][0].sum() == 200 and target["masks"][4].sum() == 100
    tf = train_transforms(40, 60, scale_range=(1, 1), hflip=0)
    _, target = CocoDetection(tmp_path / "images", data, tf, train=True)[0]
    assert target["has_mask"].tolist() == [True, False, False, True]  # the sliver dropped
    assert target["boxes"][~target["has_mask"]].tolist() == [[5, 20, 17, 35], [25, 25, 33, 33]]


def _mask_heads():
    torch.manual_seed(0)
    return build_detector("cascade_mask_rcnn", "tiny_moat_0", 2, **TINY).roi_heads


def test_mask_loss_leaves_out_objects_without_a_mask():
    """Known answer: the loss over RoIs on a masked and a box-only object equals the loss of
    the same batch without the box-only object and its RoI."""
    from moat.tasks.detection.mask_loss import instance_mask_loss

    heads = _mask_heads()
    features = {name: torch.randn(1, 16, 64 // s, 64 // s)
                for name, s in (("stage2", 4), ("stage3", 8), ("stage4", 16), ("stage5", 32),
                                ("pool", 64))}
    shapes = [(64, 64)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 40:60, 30:50] = 1  # the box-only object's: ignored, whatever it holds
    boxes = torch.tensor([[8.0, 8, 42, 32], [28, 38, 52, 62]])
    rois = torch.tensor([[9.0, 9, 41, 31], [29, 39, 51, 61], [0, 0, 20, 20]])
    both = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks,
            "has_mask": torch.tensor([True, False])}
    loss = instance_mask_loss(heads, features, [rois], [torch.tensor([1, 2, 0])],
                              [torch.tensor([0, 1, 0])], shapes, [both])
    alone = {"boxes": boxes[:1], "labels": torch.tensor([1]), "masks": masks[:1]}
    expected = instance_mask_loss(heads, features, [rois[[0, 2]]], [torch.tensor([1, 0])],
                                  [torch.tensor([0, 0])], shapes, [alone])
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    unflagged = instance_mask_loss(heads, features, [rois], [torch.tensor([1, 2, 0])],
                                   [torch.tensor([0, 1, 0])], shapes,
                                   [{k: v for k, v in both.items() if k != "has_mask"}])
    assert abs(float((unflagged - expected).detach())) > 1e-3  # without the flag it would count
    none = dict(both, has_mask=torch.tensor([False, False]))
    zero = instance_mask_loss(heads, features, [rois], [torch.tensor([1, 2, 0])],
                              [torch.tensor([0, 1, 0])], shapes, [none])
    assert zero.detach().item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("arch", ["cascade_mask_rcnn", "mask_rcnn"])
def test_detectors_train_boxes_but_not_masks_of_objects_without_one(arch):
    """A box-only object's mask content changes no loss; a masked object's changes the mask
    loss only; all box-only: the mask loss is 0 and the box losses are unchanged."""
    torch.manual_seed(0)
    model = build_detector(arch, "tiny_moat_0", 2, **TINY).train()
    images = [torch.rand(3, 64, 64)]

    def losses(first: slice, second: slice, has_mask=(True, False)):
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        masks[0, first, first] = 1
        masks[1, second, second] = 1
        target = {"boxes": torch.tensor([[8.0, 8, 40, 40], [30, 30, 60, 60]]),
                  "labels": torch.tensor([1, 2]), "masks": masks,
                  "has_mask": torch.tensor(has_mask)}
        torch.manual_seed(1)  # the same proposals sampled each time
        return {k: v.item() for k, v in model(images, [target]).items()}

    base = losses(slice(8, 40), slice(30, 60))
    assert losses(slice(8, 40), slice(40, 50)) == base
    moved = losses(slice(20, 30), slice(30, 60))
    assert moved["loss_mask"] != base["loss_mask"]
    assert {k: v for k, v in moved.items() if k != "loss_mask"} == \
        {k: v for k, v in base.items() if k != "loss_mask"}
    boxes_only = losses(slice(8, 40), slice(30, 60), (False, False))
    assert boxes_only.pop("loss_mask") == 0.0
    assert boxes_only == {k: v for k, v in base.items() if k != "loss_mask"}


def test_mask_ap_counts_only_objects_with_a_mask():
    """Mask AP: a detection on a box-only object is neither a hit nor a false positive
    (pycocotools stopped on such objects before); box AP counts every object."""
    annotations = [{"id": i, "image_id": 1, "category_id": 1, "bbox": box, "area": 100,
                    "iscrowd": 0, **seg} for i, (box, seg) in enumerate([
                        ([10, 5, 20, 10], {"segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]}),
                        ([35, 20, 10, 10], {"segmentation": []}), ([45, 2, 10, 10], {})], 1)]
    truth = {"images": [{"id": 1, "width": 60, "height": 40, "file_name": "1.png"}],
             "categories": [{"id": 1, "name": "thing"}], "annotations": annotations}

    def detection(x0, y0, x1, y1, score):
        mask = np.zeros((40, 60), np.uint8)
        mask[y0:y1, x0:x1] = 1
        return {"image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": score, "segmentation": _rle(mask)}

    # the masked object found (score 0.5) and, scoring higher, the empty-segmentation one
    results = [detection(10, 5, 30, 15, 0.5), detection(36, 21, 44, 29, 0.9)]
    metrics = coco_evaluate(load_coco(truth), results, ("bbox", "segm"))
    assert metrics["mask_AP"] == pytest.approx(1.0) and metrics["mask_AR100"] == 1.0
    # boxes: all three objects count; the second found at IoU 0.64 (3 of 10 thresholds)
    assert metrics["AP"] < 0.5 and metrics["AR100"] == pytest.approx((1 + 0.3 + 0) / 3)


# --- evaluation -----------------------------------------------------------------------------

def _gt_dict():
    anns, aid = [], 0
    boxes = {1: [[10, 10, 30, 20], [60, 50, 25, 25]], 2: [[5, 40, 40, 30]]}
    for image_id, bs in boxes.items():
        for b in bs:
            aid += 1
            x, y, w, h = b
            anns.append({"id": aid, "image_id": image_id, "category_id": 3, "bbox": b,
                         "area": w * h, "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    return {"images": [{"id": i, "height": 100, "width": 100, "file_name": f"{i}.png"}
                       for i in (1, 2)],
            "categories": [{"id": 3, "name": "thing"}], "annotations": anns}


def _perfect(gt):
    coco = load_coco(gt)
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.9, "segmentation": _rle(coco.annToMask(a))} for a in gt["annotations"]]


def test_perfect_detections_score_ap_one_and_a_missed_object_costs_recall():
    gt = _gt_dict()
    coco = load_coco(gt)
    metrics = coco_evaluate(coco, _perfect(gt), ("bbox", "segm"))
    for key in ("AP", "AP50", "AP75", "AR100", "mask_AP", "mask_AP50"):
        assert metrics[key] == pytest.approx(1.0), key
    missed = coco_evaluate(coco, _perfect(gt)[:2], ("bbox",))
    assert missed["AR100"] == pytest.approx(2 / 3, abs=1e-6)
    # precision 1 up to recall 2/3, then nothing: 67 of COCO's 101 recall points
    assert missed["AP"] == pytest.approx(67 / 101, abs=1e-6)
    assert coco_evaluate(coco, [], ("bbox",))["AP"] == 0.0


def _noisy_detections(gt, seed=0):
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        for _ in range(3):
            x, y, w, h = a["bbox"]
            jitter = rng.normal(0, 3, 4)
            dets.append({"image_id": a["image_id"], "category_id": 3,
                         "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                         "score": float(rng.uniform(0.1, 1.0))})
    return dets


def _direct_cocoeval(gt, dets):
    coco = load_coco(gt)
    dt = coco.loadRes(copy.deepcopy(dets))
    e = COCOeval(coco, dt, "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    return e.stats


def test_our_ap_equals_pycocotools(capsys):
    gt = _gt_dict()
    dets = _noisy_detections(gt)
    ours = coco_evaluate(load_coco(gt), dets, ("bbox",))
    stats = _direct_cocoeval(gt, dets)
    capsys.readouterr()
    assert [ours[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == \
        pytest.approx(list(stats[:6]))


class _ReplayDetector(torch.nn.Module):
    """A 'model' that returns stored detections: the image's first pixel is its id."""

    def __init__(self, dets):
        super().__init__()
        self.dets = dets

    def forward(self, images):
        out = []
        for img in images:
            mine = [d for d in self.dets if d["image_id"] == int(img[0, 0, 0])]
            xywh = torch.tensor([d["bbox"] for d in mine], dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                        "scores": torch.tensor([d["score"] for d in mine]),
                        "labels": torch.ones(len(mine), dtype=torch.int64)})
        return out


def _task_for(gt, tmp: Path) -> tuple[DetectionTask, list]:
    from moat.train.config import TrainConfig

    task = DetectionTask(TrainConfig(task="detection", task_options={"arch": "faster_rcnn"}))
    task._eval_dataset = CocoDetection(tmp, gt)
    task.label_to_category = {1: 3}
    batches = [([torch.full((3, 4, 4), float(i))], [{"image_id": i}]) for i in (1, 2)]
    return task, batches


def _distributed_worker(rank: int, world: int, port: int, gt, dets, tmp: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        task, batches = _task_for(gt, Path(tmp))
        metrics = task.evaluate(_ReplayDetector(dets), iter(batches[rank::world]),
                                torch.device("cpu"))
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_task_evaluation_matches_pycocotools_also_split_over_two_processes(tmp_path, capsys):
    gt = _gt_dict()
    dets = _noisy_detections(gt, seed=1)
    stats = _direct_cocoeval(gt, dets)
    capsys.readouterr()
    task, batches = _task_for(gt, tmp_path)
    single = task.evaluate(_ReplayDetector(dets), iter(batches), torch.device("cpu"))
    assert single["AP"] == pytest.approx(stats[0]) and single["AP50"] == pytest.approx(stats[1])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_distributed_worker, args=(2, port, gt, dets, str(tmp_path),
                                                           str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):  # every process gets rank 0's metrics of the whole set
        metrics = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert metrics["AP"] == pytest.approx(stats[0]), rank
        assert metrics["AP75"] == pytest.approx(stats[2]), rank


def test_detections_to_coco_converts_boxes_labels_and_masks():
    mask = torch.zeros(1, 1, 20, 30)
    mask[0, 0, 2:6, 3:9] = 0.8
    out = {"boxes": torch.tensor([[3.0, 2.0, 9.0, 6.0]]), "scores": torch.tensor([0.75]),
           "labels": torch.tensor([2]), "masks": mask}
    (r,) = detections_to_coco(out, 5, {1: 7, 2: 9})
    assert r["image_id"] == 5 and r["category_id"] == 9 and r["score"] == 0.75
    assert r["bbox"] == [3.0, 2.0, 6.0, 4.0]
    assert mask_utils.area(r["segmentation"]) == 24


# --- models, checkpoints and the training loop ----------------------------------------------

@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn", "cascade_mask_rcnn"])
def test_detectors_train_and_predict_at_any_size(arch):
    torch.manual_seed(0)
    model = build_detector(arch, "tiny_moat_0", 2, **TINY)
    images = [torch.rand(3, 70, 50), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 70, 50, dtype=torch.uint8)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]
    targets[0]["masks"][0, 5:40, 5:30] = 1
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 45, 83)])
    assert out[0]["boxes"].shape[1] == 4
    if "mask" in arch:
        assert out[0]["masks"].shape[-2:] == (45, 83)


def test_frozen_stages_and_frozen_batch_norm():
    from moat.tasks.backbone import FrozenBatchNorm2d

    model = build_detector("faster_rcnn", "tiny_moat_0", 2, frozen_stages=2, freeze_bn=True,
                           grad_checkpointing=True, **TINY)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.stem.parameters())
    assert not any(p.requires_grad for p in body.stages[1].parameters())
    assert all(p.requires_grad for p in body.stages[2].parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert body.grad_checkpointing


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from moat.data.synthetic_detection import write_synthetic_detection

    root = tmp_path_factory.mktemp("synthetic_detection")
    return write_synthetic_detection(root, num_train=8, num_val=4, img_size=64, seed=3)


def test_synthetic_dataset_is_deterministic_and_loads(synthetic, tmp_path):
    from moat.data.synthetic_detection import write_synthetic_detection

    again = write_synthetic_detection(tmp_path / "again", num_train=8, num_val=4, img_size=64,
                                      seed=3)
    for split in ("train", "val"):
        assert synthetic.annotations(split).read_text() == again.annotations(split).read_text()
        for f in sorted(synthetic.images(split).iterdir()):
            assert f.read_bytes() == (again.images(split) / f.name).read_bytes()
    ds = CocoDetection(synthetic.images("train"), synthetic.annotations("train"), train=True)
    segs = [a["segmentation"] for a in ds.coco.anns.values()]
    assert any(isinstance(s, list) for s in segs) and any(isinstance(s, dict) for s in segs)
    for i in range(len(ds)):
        _, t = ds[i]
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
            assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1


def _tiny_config(data_root: Path, output: Path, arch: str = "cascade_mask_rcnn"):
    from moat.train.config import load_config

    options = {k: v for k, v in TINY.items() if k not in ("min_size", "max_size")}
    return load_config(None, [], task="detection", model="tiny_moat_0", data=str(data_root),
                       output=str(output), img_size=64, epochs=1, batch_size=4, lr=1e-3,
                       workers=0, progress=False, tensorboard=False,
                       task_options=dict(options, arch=arch))


@pytest.fixture(scope="module")
def trained_run(synthetic, tmp_path_factory):
    """Two steps of the shared loop (Cascade Mask R-CNN, 8 images, batch 4) + evaluation;
    returns (run directory, the in-memory trained model, the loop's result)."""
    from moat.train import distributed as dist_utils
    from moat.train.assemble import assemble
    from moat.train.loop import Trainer

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("detection_run") / "run"
    config = _tiny_config(synthetic.root, run_dir)
    info = dist_utils.setup("cpu")
    try:
        run, progress = assemble(config, info, resume=False)  # train() keeping the model
        result = Trainer(run, progress).fit()
    finally:
        dist_utils.cleanup()
    assert progress.step == 2 and config.num_classes == 3
    return run_dir, run.model.eval(), result


@pytest.mark.slow
def test_training_loop_evaluates_coco_metrics(trained_run):
    metrics = trained_run[2]["metrics"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "mask_AP", "mask_AP50"} <= set(metrics)
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())


@pytest.mark.slow
def test_checkpoint_reloads_and_predicts_identically(trained_run, synthetic):
    from moat.train.eval_predict import load_task_and_model

    run_dir, trained, _ = trained_run
    task, model, _ = load_task_and_model(run_dir)
    assert task.classes == ["circle", "square", "triangle"]
    assert task.label_to_category == {1: 1, 2: 2, 3: 3}
    for name, value in trained.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    images = [_image(synthetic.images("val") / f"00000{i}.png") for i in range(2)]
    with torch.no_grad():
        expected, got = trained(images), model(images)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() == {"boxes", "labels", "scores", "masks"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
def test_predict_writes_png_and_coco_json(trained_run, synthetic, tmp_path):
    from moat.train.eval_predict import predict_checkpoint

    out = tmp_path / "pred"
    results = predict_checkpoint([synthetic.images("val") / "000001.png"], trained_run[0],
                                 output_dir=out, json_path=out / "all.json")
    png, js = Path(results[0]["image"]), Path(results[0]["json"])
    assert png.is_file() and Image.open(png).size == (64, 64)
    coco_results = json.loads(js.read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r)
               for r in coco_results)
    assert json.loads((out / "all.json").read_text())[0]["path"].endswith("000001.png")


@pytest.mark.slow
def test_predict_names_same_stems_apart_and_reports_bad_images(trained_run, synthetic, tmp_path,
                                                               capsys):
    from moat.cli import main
    from moat.train.eval_predict import predict_checkpoint

    originals = [synthetic.images("val") / f"00000{i}.png" for i in (1, 2)]
    for sub, original in zip("ab", originals):  # two different images, both named img.png
        (tmp_path / "in" / sub).mkdir(parents=True)
        (tmp_path / "in" / sub / "img.png").write_bytes(original.read_bytes())
    (tmp_path / "in" / "z").mkdir()
    (tmp_path / "in" / "z" / "img.png").write_bytes(b"not a png")
    run_dir, out = trained_run[0], tmp_path / "pred"
    results = predict_checkpoint([tmp_path / "in"], run_dir, output_dir=out)
    assert [Path(r["path"]).parent.name for r in results] == ["a", "b", "z"]
    assert set(results[2]) == {"path", "error"} and "z/img.png" in results[2]["error"]
    assert [Path(r["image"]).name for r in results[:2]] == ["img_detections.png",
                                                           "img-2_detections.png"]
    assert {Path(r["json"]).name for r in results[:2]} == {"detections.json"}  # one file
    assert {d["image_id"] for d in json.loads((out / "detections.json").read_text())} <= {1, 2}
    # each file is its own input's: what predicting that image alone gives
    for result, original in zip(results, originals):
        alone = predict_checkpoint([original], run_dir, output_dir=tmp_path / "one")[0]
        assert result["detections"] == alone["detections"]
        np.testing.assert_array_equal(np.asarray(Image.open(result["image"])),
                                      np.asarray(Image.open(alone["image"])))
    assert not np.array_equal(np.asarray(Image.open(results[0]["image"])),
                              np.asarray(Image.open(results[1]["image"])))
    # the command: the corrupt image is reported, the others written, exit code 1
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(run_dir),
                 "--output-dir", str(tmp_path / "cli")]) == 1
    assert "z/img.png: error" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.png")) == [
        "img-2_detections.png", "img_detections.png"]


def _image(path: Path) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.to_dtype(TF.pil_to_tensor(Image.open(path).convert("RGB")), torch.float32,
                       scale=True)


@pytest.mark.slow
def test_detection_through_the_cli(trained_run, synthetic, tmp_path, capsys):
    from moat.cli import main

    options = {k: v for k, v in TINY.items() if k not in ("min_size", "max_size")}
    args = ["train", "--task", "detection", "--model", "tiny_moat_0", "--data",
            str(synthetic.root), "--output", str(tmp_path / "run"), "--img-size", "64",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--set", "task_options.arch=faster_rcnn", "--set", "tensorboard=false",
            "--set", "eval_every_epochs=0"]
    for k, v in options.items():
        args += ["--set", f"task_options.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"]
    assert main(args) == 0
    assert "checkpoint:" in capsys.readouterr().out
    run_dir = str(trained_run[0])
    assert main(["eval", "--data", str(synthetic.root), "--checkpoint", run_dir,
                 "--workers", "0"]) == 0
    assert "AP50:" in capsys.readouterr().out
    assert main(["predict", str(synthetic.images("val") / "000002.png"), "--checkpoint",
                 run_dir, "--output-dir", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "000002_detections.png").is_file()
