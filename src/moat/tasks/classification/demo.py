"""`moat demo --task classification`: the shapes dataset, tiny_moat_0 trained on it through
the shared loop, evaluated and asked for a few predictions."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moat.data.synthetic import write_shapes_dataset
from moat.train.demo import train_evaluate_predict


# Chosen so that tiny_moat_0 reaches >= 90% top-1 within 10 minutes on 2 CPU cores: the native
# 64 px (at 32-48 px the network needs several times more steps before it starts to learn),
# batch 32 with AdamW 1e-3 (more updates per image), a short warm-up and cosine schedule, mild
# crops (80-100% of the area: smaller crops cut shapes off), no Mixup/CutMix/RandAugment (they
# slow short runs down), BatchNorm momentum 0.1 so that evaluation statistics keep up with a
# few hundred steps (with the official 0.01 a 300-step run evaluates at chance), data loading in
# the main process (2 cores), 8 epochs (10 reached 99.6% in 221 s; 8 reach 98.8%, about
# 3 minutes). Measured with benchmarks/demo.py on the 2-core machine (README, Training).
DEMO_SETTINGS: dict[str, Any] = {
    "model": "tiny_moat_0", "img_size": 64, "crop_pct": 1.0, "epochs": 8, "batch_size": 32,
    "lr": 1e-3, "warmup_epochs": 0.5, "min_lr": 1e-5, "weight_decay": 0.05,
    "label_smoothing": 0.1, "mixup": 0.0, "cutmix": 0.0, "randaugment": None,
    "scale": (0.8, 1.0), "ema": True, "ema_decay": 0.99, "bn_momentum": 0.1, "workers": 0,
    "eval_every_epochs": 4, "log_every_steps": 10, "keep_last": 1,
}
DEMO_DATA = {"num_classes": 10, "train_per_class": 200, "val_per_class": 50, "img_size": 64}


def run_demo(output_dir: str | os.PathLike = "moat-demo", *, epochs: int | None = None,
             overrides: Sequence[str] = (), progress: bool = True, **_: Any) -> dict[str, Any]:
    """Write the shapes dataset, train tiny_moat_0 on it, evaluate, predict a few images."""
    out = Path(output_dir)
    t0 = time.time()
    data = write_shapes_dataset(out / "data", **DEMO_DATA)
    samples = [str(min((data.val_dir / c).iterdir())) for c in data.classes[:4]]
    result = train_evaluate_predict(out, str(data.root), DEMO_SETTINGS, samples=samples,
                                    epochs=epochs, overrides=overrides, progress=progress,
                                    eval_data=str(data.val_dir), predict_options={"top_k": 3})
    metrics = result["metrics"]
    result["summary"] = (f"top-1: {metrics['top-1']:.2f}%  top-5: {metrics['top-5']:.2f}%  "
                         f"(tiny_moat_0, {result['config'].epochs} epochs, "
                         f"{time.time() - t0:.0f} s)")
    return result
