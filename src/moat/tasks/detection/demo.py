"""`moat demo --task detection`: a generated COCO-format dataset, a light Cascade Mask R-CNN
on tiny-MOAT-0 trained on it through the shared loop, evaluated (COCO box and mask AP) and
drawn on a few validation images."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moat.data.synthetic_detection import write_synthetic_detection
from moat.tasks.detection.options import DetectionOptions
from moat.train.demo import train_evaluate_predict

# The generated dataset and the short CPU schedule of `moat demo --task detection`: Cascade
# Mask R-CNN on tiny-MOAT-0 with light heads (64-channel FPN, 256-wide box heads, 64-channel
# mask head, fewer RoIs) at 128 px, trained from scratch.
DEMO_DATA = dict(num_train=800, num_val=100, img_size=128, max_objects=3)
DEMO_SETTINGS: dict[str, Any] = dict(
    task="detection", model="tiny_moat_0", img_size=128, epochs=6, batch_size=8, lr=2e-3,
    min_lr=1e-5, warmup_epochs=0.3, weight_decay=0.05, clip_grad=10.0, ema=False, workers=0,
    bn_momentum=0.1,  # the official 0.01 leaves BN statistics stale after a short schedule
    eval_every_epochs=6, log_every_steps=20, tensorboard=False,
    task_options=dict(
        arch="cascade_mask_rcnn", fpn_channels=64, representation_size=256, mask_channels=64,
        anchor_sizes=[16, 32, 64, 128, 256], rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, scale_range=[0.8, 1.25]),
)


def run_detection_demo(output_dir: str | Path = "moat-demo-detection", *,
                       epochs: int | None = None, overrides: Sequence[str] = (),
                       progress: bool = True, **_: Any) -> dict[str, Any]:
    """Write the synthetic detection dataset, train the demo detector on it through the shared
    loop, evaluate (COCO box and mask AP) and draw the detections of a few validation images."""
    out = Path(output_dir)
    t0 = time.time()
    data = write_synthetic_detection(out / "data", **DEMO_DATA)
    samples = [str(p) for p in sorted(data.images("val").iterdir())[:6]]
    result = train_evaluate_predict(
        out, str(data.root), DEMO_SETTINGS, samples=samples, epochs=epochs,
        overrides=overrides, progress=progress, eval_options={"batch_size": 8, "workers": 0},
        predict_options={"output_dir": str(out / "predictions")})
    result["outputs"]["drawings"] = str(out / "predictions")
    metrics, config = result["metrics"], result["config"]
    arch = DetectionOptions.from_dict(config.task_options, "detection").arch
    masks = (f"  mask AP: {metrics['mask_AP']:.4f}  mask AP50: {metrics['mask_AP50']:.4f}"
             if "mask_AP" in metrics else "")
    result["summary"] = (f"box AP: {metrics['AP']:.4f}  box AP50: {metrics['AP50']:.4f}{masks}  "
                         f"({arch}, {config.model}, {config.epochs} epochs, "
                         f"{time.time() - t0:.0f} s)")
    return result
