"""What every `moat demo --task ...` does once its dataset is written: train through the
shared loop (continuing an interrupted demo), evaluate the final checkpoint, predict a few
images. The tasks supply the data, the settings and the summary line."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def train_evaluate_predict(out: Path, data_root: str, settings: Mapping[str, Any], *,
                           samples: Sequence[str], epochs: int | None = None,
                           overrides: Sequence[str] = (), progress: bool = True,
                           eval_data: str | None = None,
                           eval_options: Mapping[str, Any] | None = None,
                           predict_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train `settings` (a TrainConfig's fields) on `data_root` into out/run, evaluate it on
    `eval_data` (default: `data_root`) with a report in out/eval, predict `samples` into
    out/predictions.json (+ out/predictions/ for tasks that draw). `app_command` is the
    `moat app` command that opens the trained model in a local web page. `epochs` replaces the
    demo's schedule length, evaluation included; `overrides` are `--set KEY=VALUE` strings."""
    from moat.train.config import load_config
    from moat.train.eval_predict import evaluate_checkpoint, predict_checkpoint
    from moat.train.loop import train

    t0 = time.time()
    run_dir = out / "run"
    settings = dict(settings, data=data_root, output=str(run_dir), progress=progress)
    if epochs is not None:
        settings["epochs"] = settings["eval_every_epochs"] = epochs
    config = load_config(None, overrides, **settings)
    result = train(config, resume=(run_dir / "checkpoints").is_dir())
    train_seconds = time.time() - t0
    metrics = evaluate_checkpoint(str(run_dir), data=eval_data or data_root,
                                  report_dir=str(out / "eval"), **(eval_options or {}))["metrics"]
    predictions = predict_checkpoint(list(samples), str(run_dir),
                                     json_path=str(out / "predictions.json"),
                                     **(predict_options or {}))
    return {
        "config": config, "metrics": metrics, "predictions": predictions,
        "app_command": f"moat app --checkpoint {run_dir}",
        "train_seconds": round(train_seconds, 1),
        "outputs": {"dataset": data_root, "run": str(run_dir),
                    "metrics": str(run_dir / "metrics.jsonl"),
                    "checkpoint": str(result["checkpoint"]), "evaluation": str(out / "eval"),
                    "predictions": str(out / "predictions.json")},
    }
