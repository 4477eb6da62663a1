"""The `moat` command. Each subcommand parses its arguments and calls one library function.

To add a subcommand: write `_add_<name>(subparsers)` that creates the parser and sets
`func`, then append it to COMMANDS. Import heavy modules inside the command function so that
`moat --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from moat.cli_options import add_train_options, checkpoint_options, count
from moat.errors import run_command


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list every variant with parameters and FLOPs")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from moat.summary import models_table

    print(models_table(with_flops=not args.no_flops))
    return 0


def _window_arg(text: str):
    """'none' -> None; '7' -> (7, 7); '7x9' -> (7, 9)."""
    if text.lower() in ("none", "global", "-"):
        return None
    h, _, w = text.lower().partition("x")
    return (int(h), int(w or h))


def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-stage shapes, parameters and FLOPs of one variant")
    p.add_argument("name")
    p.add_argument("--img-size", nargs="+", type=int, metavar=("H", "W"), default=None)
    p.add_argument(
        "--window-size", nargs=4, type=_window_arg, default=None, metavar="W",
        help="one entry per stage: none, N or HxW, e.g. --window-size none none 14 none",
    )
    p.add_argument("--no-position-embedding", action="store_true")
    p.add_argument("--pool-size", type=int, default=2)
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args: argparse.Namespace) -> int:
    from moat.summary import model_summary

    print(model_summary(args.name, img_size=args.img_size, window_size=args.window_size,
                        position_embedding=not args.no_position_embedding,
                        pool_size=args.pool_size))
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official TensorFlow checkpoint to .safetensors",
                       description="SRC: the released .tar.gz, a checkpoint prefix, its .index "
                       "file or a directory holding one checkpoint.")
    p.add_argument("src")
    p.add_argument("out", help="output file, *.safetensors")
    p.add_argument("--model", help="required variant or tag, e.g. moat_0, moat_0_no_pe, "
                   "moat_0.in1k_224 (default: whatever the checkpoint holds)")
    p.add_argument("--ema", action="store_true",
                   help="take the ExponentialMovingAverage copies (default: raw weights, "
                   "as the official loader)")
    p.add_argument("--allow-missing-bn-stats", action="store_true",
                   help="convert a checkpoint without BatchNorm moving statistics (its "
                   "predictions are wrong until they are re-estimated)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from moat.weights.convert import convert_checkpoint

    meta = convert_checkpoint(args.src, args.out, model=args.model, ema=args.ema,
                              allow_missing_bn_stats=args.allow_missing_bn_stats)
    print(f"wrote {args.out}: {meta.variant} (position embedding "
          f"{str(meta.position_embedding).lower()}, {meta.source_weights} weights, BN statistics "
          f"{meta.bn_statistics}); use moat.create_model({meta.pretrained_tag!r}, "
          f"weights={args.out!r})")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a checkpoint or weights file holds: variant, dtypes, "
                       "EMA, BatchNorm statistics, optimizer slots")
    p.add_argument("checkpoint", help="TensorFlow checkpoint (.tar.gz, prefix, .index, "
                   "directory) or a .safetensors file")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from moat.weights.info import describe

    print(describe(args.checkpoint))
    return 0


COMMANDS = [_add_models, _add_summary, _add_convert, _add_info]


# --- training, evaluation, prediction (moat.train) -------------------------------------------

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


def _checkpoint(args: argparse.Namespace) -> str:
    if bool(args.checkpoint) == bool(args.model):
        raise ValueError("give either --checkpoint or --model (with --pretrained for a tag)")
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

    from moat.train.inference import evaluate_checkpoint

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
    p.add_argument("--output-dir", help="for tasks that write files (e.g. segmentation masks)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from moat.train.inference import predict_checkpoint

    results = predict_checkpoint(args.images, _checkpoint(args), top_k=args.top_k,
                                 img_size=args.img_size, weights=args.weights,
                                 device=args.device, json_path=args.json,
                                 output_dir=args.output_dir, task=args.task)
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a small dataset, train on it, evaluate, predict")
    p.add_argument("--output", default="moat-demo", help="folder for everything (default: "
                   "./moat-demo)")
    p.add_argument("--task", default="classification")
    p.add_argument("--epochs", type=int, help="override the demo's epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from moat.train.task import get_task

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


COMMANDS += [_add_train, _add_eval, _add_predict, _add_demo, _add_plot]


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model: ONNX, TorchScript, torch.export or "
                       "ExecuTorch")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, help_text in (("onnx", "ONNX file (checked against onnxruntime)"),
                            ("torchscript", "TorchScript trace (.pt)"),
                            ("torch-export", "torch.export program (.pt2)"),
                            ("executorch", "ExecuTorch program (.pte) with the XNNPACK "
                             "delegate, checked in ExecuTorch's runtime")):
        f = formats.add_parser(name, help=help_text)
        f.add_argument("model", help="variant or pretrained tag (e.g. moat_0, moat_0.in1k_224), "
                       "hf-hub:ORG/NAME, local-dir:PATH, a weights file holding its variant "
                       "(.safetensors from `moat convert`, or a TensorFlow checkpoint), or a "
                       "training RUN_DIR / checkpoint folder (its classes and preprocessing go "
                       "into an ONNX file, for `moat eval`)")
        f.add_argument("out", help="output file")
        f.add_argument("--img-size", nargs="+", type=int, metavar=("H", "W"), default=None,
                       help="input size (default: the variant's native resolution)")
        f.add_argument("--weights", help="weights file for a MODEL given by name")
        f.add_argument("--pretrained", action="store_true",
                       help="the released weights of MODEL (a tag; downloaded and cached once)")
        f.add_argument("--window-size", nargs=4, type=_window_arg, default=None, metavar="W",
                       help="one entry per stage: none, N or HxW (default: global attention)")
        f.add_argument("--global-attention-at-end", action="store_true")
        f.add_argument("--pool-size", type=int, default=None,
                       help="shortcut pool size (default: the model's, 2)")
        f.add_argument("--num-classes", type=int, default=None)
        f.add_argument("--batch", type=int, default=1, help="batch of the example input "
                       "(the exported batch dimension is dynamic)")
        if name in ("onnx", "executorch"):
            f.add_argument("--no-check", dest="check", action="store_false",
                           help="skip the comparison with PyTorch in the target runtime")
        if name == "onnx":
            f.add_argument("--opset", type=int, default=17)
            f.add_argument("--dynamic-size", action="store_true",
                           help="dynamic height/width (global attention only; position "
                           "biases computed in the graph: slower than the default fixed size)")
            f.add_argument("--layout", choices=["onnxruntime", "pytorch"],
                           default="onnxruntime", help="module path to export: the one ONNX "
                           "Runtime runs fastest (default) or optimize_for_inference's")
        elif name == "torch-export":
            f.add_argument("--static-size", action="store_true",
                           help="fixed height/width even with global attention")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from moat.export import load_model, run_export

    metadata = preprocessing = None
    if Path(args.model).is_dir():  # a training run or checkpoint: its model and its data
        from moat.train.inference import load_task_and_model, onnx_metadata

        task, model, _ = load_task_and_model(args.model)
        metadata, preprocessing = onnx_metadata(task)
        args.img_size = args.img_size or task.config.eval_img_size or task.config.img_size
    else:
        model = load_model(args.model, weights=args.weights, pretrained=args.pretrained,
                           window_size=args.window_size,
                           global_attention_at_end=args.global_attention_at_end,
                           pool_size=args.pool_size, num_classes=args.num_classes)
    print(run_export(model, args.format, args.out, img_size=args.img_size, batch=args.batch,
                     metadata=metadata, preprocessing=preprocessing,
                     opset=getattr(args, "opset", 17), check=getattr(args, "check", False),
                     static_size=getattr(args, "static_size", True),
                     dynamic_size=getattr(args, "dynamic_size", False),
                     layout=getattr(args, "layout", "onnxruntime")))
    return 0


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="throughput, latency, memory and multiply-adds, "
                       "optionally against timm peers")
    p.add_argument("models", nargs="*", default=["moat_0"], help="MOAT variants (default "
                   "moat_0) or timm model names")
    p.add_argument("--pretrained", action="store_true",
                   help="MOAT models with their released weights (tags; downloaded once)")
    p.add_argument("--peers", action="store_true", help="also coatnet_0_rw_224, "
                   "maxvit_tiny_tf_224 and convnext_tiny (timm), in the same run")
    p.add_argument("--img-size", nargs="+", type=int, default=[224])
    p.add_argument("--batch-size", nargs="+", type=int, default=[8])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--threads", nargs="+", type=int, default=[0], help="0: torch's default")
    p.add_argument("--mode", nargs="+", default=["inference"], choices=["inference", "train"])
    p.add_argument("--optimized", action="store_true",
                   help="also MOAT through moat.optimize_for_inference (inference)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last weights and inputs for every plain model")
    p.add_argument("--drop-path-rate", type=float, default=0.0,
                   help="stochastic depth of every model in training (default 0)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-latency", dest="latency", action="store_false")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=["detection", "segmentation"],
                   help="MOAT models with this dense-prediction attention layout, e.g. "
                   "detection: 14x14 windows in the third stage (see moat.tasks.backbone)")
    p.add_argument("--runtime", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: every model exported to ONNX the same way and timed in "
                   "ONNX Runtime (CPU, inference; --peers then picks mobile peers for "
                   "tiny-MOAT)")
    p.add_argument("--int8-calibration", metavar="DIR", help="onnxruntime: also static int8 "
                   "versions of the MOAT models, calibrated on the images in DIR")
    p.add_argument("--export-dir", help="onnxruntime: keep the exported files here and reuse "
                   "those already there (default: a temporary folder)")
    p.add_argument("--csv", help="write every row, with versions, to this CSV file")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from moat.benchmark import format_table, run_benchmark, write_csv

    if args.runtime == "onnxruntime":
        from moat.benchmark_onnx import run_onnx_benchmark

        if (args.device != "cpu" or args.mode != ["inference"] or args.dtype != ["float32"]
                or args.pretrained):
            raise ValueError("--runtime onnxruntime measures CPU float32 inference of randomly "
                             "initialised models (int8 with --int8-calibration); drop "
                             "--device/--mode/--dtype/--pretrained")
        rows = run_onnx_benchmark(
            args.models, peers=args.peers, img_sizes=args.img_size, batch_sizes=args.batch_size,
            threads=args.threads, warmup=args.warmup, repeats=args.repeats,
            latency=args.latency, int8_calibration=args.int8_calibration,
            export_dir=args.export_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    else:
        rows = run_benchmark(
            args.models, peers=args.peers, pretrained=args.pretrained,
            img_sizes=args.img_size, batch_sizes=args.batch_size, dtypes=args.dtype, threads=args.threads,
            modes=args.mode, optimized=args.optimized, channels_last=args.channels_last,
            drop_path_rate=args.drop_path_rate, warmup=args.warmup, repeats=args.repeats,
            latency=args.latency, memory=args.memory, device=args.device, preset=args.preset,
            log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="static int8 ONNX (ONNX Runtime, calibrated on images)")
    p.add_argument("model", help="an .onnx file from `moat export onnx` (fixed size)")
    p.add_argument("out", help="the int8 .onnx file to write")
    p.add_argument("--calibration", required=True, metavar="DIR",
                   help="folder of images like those the model will see (a few hundred)")
    p.add_argument("--max-images", type=int, default=256,
                   help="calibrate on at most this many images (default 256)")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from moat.export.quantize import quantize_onnx

    result = quantize_onnx(args.model, args.out, args.calibration, max_images=args.max_images)
    print(f"wrote {result['path']}: int8 QDQ, per-channel weights, calibrated on "
          f"{result['calibration_images']} images")
    return 0


COMMANDS += [_add_export, _add_benchmark, _add_quantize]


# --- explanations and the local web page (moat.explain, moat.app) ------------------------------

def _add_model_source(p: argparse.ArgumentParser, exported: bool = False) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    exported_help = ", or an exported classifier (.onnx, .pt2, .pt: top-5 only)"
    source.add_argument("--model", help="variant or pretrained tag, e.g. tiny_moat_0, "
                        "moat_0.in1k_224" + (exported_help if exported else ""))
    source.add_argument("--checkpoint", help="training checkpoint: RUN_DIR, checkpoint folder "
                        "or weights file (classification, segmentation or detection)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--device", default="cpu")


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="class-activation maps per stage and attention maps "
                       "per MOAT block, as PNG overlays and arrays")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    _add_model_source(p)
    p.add_argument("--class", dest="target", help="class to explain, name or index (default: "
                   "the predicted one; segmentation: the largest predicted class)")
    p.add_argument("--box", type=int, help="detection: explain the K-th detection, best first "
                   "(default 0; with --class, among that class's)")
    p.add_argument("--method", choices=["hirescam", "gradcam"], default="hirescam",
                   help="class-activation method (default hirescam, see the README)")
    p.add_argument("--output-dir", required=True, help="folder for the PNGs, .npz and .json")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from moat.explain.files import explain_files

    results = explain_files(args.images, args.output_dir, model=args.model,
                            checkpoint=args.checkpoint, target=args.target, box=args.box,
                            method=args.method, img_size=args.img_size, device=args.device)
    for r in results:
        if "error" in r:
            print(f"{r['path']}: error: {r['error']}")
            continue
        print(f"{r['path']}: {r['target']}; wrote {len(r['files'])} files, e.g. {r['files'][0]}")
    return 1 if any("error" in r for r in results) else 0


def _add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="a local web page (Gradio) to try a model on your images")
    _add_model_source(p, exported=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1: this machine only; 0.0.0.0 exposes the page to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    p.set_defaults(func=_cmd_app)


def _cmd_app(args: argparse.Namespace) -> int:
    from moat.app import serve

    serve(model=args.model, checkpoint=args.checkpoint, img_size=args.img_size,
          device=args.device, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    return 0


COMMANDS += [_add_explain, _add_app]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    from moat.runtime import keep_freed_memory

    keep_freed_memory()  # this process is ours: see moat/runtime.py
    resume = None
    if args.command == "train":  # the same command with --resume continues the run
        given = list(sys.argv[1:] if argv is None else argv)
        resume = shlex.join(["moat", *given] + ([] if args.resume else ["--resume"]))
    # Expected failures: one or two lines and exit 2; bugs: a traceback (moat/errors.py).
    return run_command(lambda: args.func(args), args.command, resume_hint=resume)


if __name__ == "__main__":
    sys.exit(main())
