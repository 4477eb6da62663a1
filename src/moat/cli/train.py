"""`moat train`, `eval`, `predict`, `demo`, `plot` (moat.train and the tasks)."""

from __future__ import annotations

import argparse
import json
import shlex

from moat.cli.options import add_train_options, checkpoint_options, count
from moat.errors import InvalidInputError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune (one CPU to many GPUs via torchrun)",
                       description="Train a task from a config file and flags. Distributed: "
                       "torchrun --nproc_per_node N -m moat.cli train ...")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its latest intact checkpoint")
    add_train_options(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from moat.train.loop import run_training

    flags = {k: getattr(args, k) for k in args.train_flags}
    result = run_training(args.config, args.set, resume=args.resume, **flags)
    if result["metrics"]:
        print(f"final: {result['line']}")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def interrupted_hint(args: argparse.Namespace, given: list[str]) -> str:
    """What an interrupted `moat train` tells the user, from what its run folder holds now:
    the command that resumes it, or that no checkpoint was saved yet."""
    from moat.train.checkpoint import CheckpointManager
    from moat.train.settings import read_config_file

    output = args.output
    try:
        if not output and args.config:
            output = read_config_file(args.config).get("output")
        latest = CheckpointManager(output).latest() if output else None
    except (OSError, ValueError):  # an unreadable config or folder: no checkpoint to offer
        latest = None
    if latest is None:
        return ("no checkpoint was saved yet, so there is nothing to resume: run the same "
                "command again to start over")
    command = shlex.join(["moat", *given] + ([] if args.resume else ["--resume"]))
    return (f"the last complete checkpoint ({latest.name}) is kept, continue with:\n  "
            f"{command}")


def _checkpoint(args: argparse.Namespace) -> str:
    if bool(args.checkpoint) == bool(args.model):
        raise InvalidInputError("give either --checkpoint or --model (with --pretrained for a tag)")
    if args.checkpoint:
        return args.checkpoint
    from moat.weights.loader import weights_file

    return str(weights_file(args.model, args.pretrained))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", parents=[checkpoint_options()],
                       help="evaluate a checkpoint on a dataset (prints top-1, ...)")
    p.add_argument("--data", required=True, help="split folder or .csv, or a root with val/")
    p.add_argument("--batch-size", type=count(1), default=64)
    p.add_argument("--workers", type=count(0), default=2)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32")
    p.add_argument("--report", help="folder for per-class accuracy, confusion matrix (PNG, CSV) "
                   "(default: RUN_DIR/eval, or ./eval-NAME where that is not writable)")
    p.add_argument("--strict-data", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    import math

    from moat.train.eval_predict import evaluate_checkpoint

    result = evaluate_checkpoint(_checkpoint(args), args.data, img_size=args.img_size,
                                 batch_size=args.batch_size, workers=args.workers,
                                 weights=args.weights, device=args.device,
                                 precision=args.precision, report_dir=args.report,
                                 strict_data=args.strict_data, task=args.task)
    task = result["task"]
    print(f"checkpoint: {result['checkpoint']} ({result['weights']} weights)")
    if result["bad_images"]:
        print(f"skipped {len(result['bad_images'])} unreadable file(s): "
              + ", ".join(sorted(result["bad_images"])[:10]))
    per_class = getattr(task, "per_class_accuracy", None)
    if per_class is not None and getattr(task, "classes", None) and len(task.classes) <= 50:
        for name, acc in zip(task.classes, per_class()):
            print(f"  {name}: " + ("n/a" if math.isnan(acc) else f"{acc:.2f}%"))
    for path in result["report"]:
        print(f"wrote {path}")
    print(result["line"])
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", parents=[checkpoint_options()],
                       help="top-k labels with probabilities for images")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top-k", type=count(1), default=5)
    p.add_argument("--json", help="write the results as JSON to this file ('-': stdout)")
    p.add_argument("--output-dir", help="for tasks that write files (e.g. segmentation masks; "
                   "a detector's detections.json of every image, COCO's results format)")
    p.add_argument("--annotations", help="detection: a COCO JSON whose image ids "
                   "detections.json uses (images matched by file name), e.g. to score it with "
                   "pycocotools against that file")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from moat.train.eval_predict import predict_checkpoint

    results = predict_checkpoint(args.images, _checkpoint(args), top_k=args.top_k,
                                 img_size=args.img_size, weights=args.weights,
                                 device=args.device, json_path=args.json,
                                 output_dir=args.output_dir, task=args.task,
                                 annotations=args.annotations)
    if args.json != "-":
        for r in results:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}")
            elif "top_k" in r:
                print(f"{r['path']}: " + ", ".join(f"{t['label']} {t['probability']:.3f}"
                                                    for t in r["top_k"]))
            else:
                print(json.dumps(r))
    return 1 if any("error" in r for r in results) else 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="write an image folder or CSV list as WebDataset shards",
                       description="Write SRC (a folder with train/<class>/ and val/<class>/, "
                       "train.csv and val.csv, one class folder, or one CSV list) into WebDataset "
                       "shards OUT/train-000000.tar, ... (and val-...), with OUT/_info.json "
                       "(sample counts, class names). Train with --data OUT.")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--shard-size", type=count(1), default=1000,
                   help="samples per shard (default 1000; aim for 100 MB to 1 GB shards)")
    p.add_argument("--workers", type=count(1), default=2, help="shards written in parallel")
    p.add_argument("--seed", type=int, default=0,
                   help="the samples are shuffled with this seed before sharding")
    p.set_defaults(func=_cmd_shard)


def _cmd_shard(args: argparse.Namespace) -> int:
    from moat.data.classification import classification_datasets
    from moat.data.shards import write_shards

    train, val = classification_datasets(args.src)
    splits = {"train": train} if val is None else {"train": train, "val": val}
    info = write_shards(splits, args.out, args.shard_size, workers=args.workers, seed=args.seed)
    for name, split in info["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['filenames'])} shards")
    print(f"{info['num_classes']} classes; train with: moat train --data {args.out} ...")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a small dataset, train on it, evaluate, predict")
    p.add_argument("--output", default="moat-demo", help="folder for everything (default: "
                   "./moat-demo)")
    p.add_argument("--task", default="classification")
    p.add_argument("--epochs", type=count(1), help="override the demo's epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from moat.tasks.base import get_task

    result = get_task(args.task).demo(args.output, epochs=args.epochs, overrides=args.set,
                                      progress=args.progress)
    for label, path in result.get("outputs", {}).items():
        print(f"{label}: {path}")
    for r in result.get("predictions", [])[:8]:
        if "top_k" in r:
            best = r["top_k"][0]
            print(f"predicted {r['path']}: {best['label']} ({best['probability']:.3f})")
    print(result.get("summary", result.get("metrics")))
    if "app_command" in result:
        print(f"try it on your own images in a local web page: {result['app_command']}")
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG of a run's loss, lr and validation curves")
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    from moat.train.logger import plot_run

    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a dataset before training (moat data check)")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="what a dataset holds and what is wrong with it, without training",
        description="The pre-flight check `moat train` and `moat eval` run: images, classes, "
        "instances or pixels per class, label values found against those expected, sizes; "
        "problems name the files and the fix. Exit status 2 when the data would be refused.")
    check.add_argument("--task", default="classification",
                       help="classification, segmentation or detection")
    check.add_argument("--data", required=True, help="the dataset folder, as for moat train")
    check.add_argument("--config", help="YAML or JSON file of settings, as for moat train")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="settings as for moat train, e.g. --set task_options.binary=true")
    check.set_defaults(func=_cmd_data_check)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from moat.data.checks import DataError
    from moat.train.config import load_config
    from moat.tasks.base import get_task

    config = load_config(args.config, args.set, task=args.task, data=args.data)
    reports = get_task(config.task)(config).check_data()
    for report in reports:
        print(report.text())
    errors = [e for r in reports for e in r.errors]
    if errors:
        raise DataError(f"{len(errors)} problem(s) to fix before training (listed above as "
                        "ERROR)")
    print("ok: the data can be trained on" + (" (see the warnings)" if any(
        r.warnings for r in reports) else ""))
    return 0


COMMANDS = [_add_train, _add_eval, _add_predict, _add_shard, _add_demo, _add_plot, _add_data]
