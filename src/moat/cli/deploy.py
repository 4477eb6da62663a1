"""`moat export`, `benchmark`, `quantize`: deployment and speed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moat.cli.model import window_arg
from moat.cli.options import count, number
from moat.errors import InvalidInputError


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
        f.add_argument("--img-size", nargs="+", type=count(16), metavar=("H", "W"), default=None,
                       help="input size (default: the variant's native resolution)")
        f.add_argument("--weights", help="weights file for a MODEL given by name")
        f.add_argument("--pretrained", action="store_true",
                       help="the released weights of MODEL (a tag; downloaded and cached once)")
        f.add_argument("--window-size", nargs=4, type=window_arg, default=None, metavar="W",
                       help="one entry per stage: none, N or HxW (default: global attention)")
        f.add_argument("--global-attention-at-end", action="store_true")
        f.add_argument("--pool-size", type=count(1), default=None,
                       help="shortcut pool size (default: the model's, 2)")
        f.add_argument("--num-classes", type=count(1), default=None)
        f.add_argument("--batch", type=count(1), default=1, help="batch of the example input "
                       "(the exported batch dimension is dynamic)")
        if name in ("onnx", "executorch"):
            f.add_argument("--no-check", dest="check", action="store_false",
                           help="skip the comparison with PyTorch in the target runtime")
        if name == "onnx":
            f.add_argument("--opset", type=count(1), help="ONNX opset (default 17; at least 20 "
                           "with --gelu tanh, whose Gelu operator is opset 20; from 23 each "
                           "attention is one ONNX Attention operator, faster in ONNX Runtime)")
            f.add_argument("--dynamic-size", action="store_true",
                           help="dynamic height/width (global attention only; position "
                           "biases computed in the graph: slower than the default fixed size)")
            f.add_argument("--layout", choices=["onnxruntime", "pytorch"],
                           default="onnxruntime", help="module path to export: the one ONNX "
                           "Runtime runs fastest (default) or optimize_for_inference's")
            f.add_argument("--gelu", choices=["exact", "tanh"], default="exact",
                           help="tanh: GELU's tanh approximation (ONNX Gelu with approximate=tanh, opset 20; "
                           "faster on CPU); its cost is measured and printed first (largest "
                           "logit deviation, top-1) and the export refused if top-1 moves by "
                           "more than 0.1 points. Measured on a training run's validation "
                           "set, or on --gelu-check DIR")
            f.add_argument("--gelu-check", metavar="DIR", help="--gelu tanh: images to "
                           "measure its cost on (any folder of images; labels are not read)")
        elif name == "torch-export":
            f.add_argument("--static-size", action="store_true",
                           help="fixed height/width even with global attention")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from moat.export import DEFAULT_OPSET, load_model, run_export

    metadata = preprocessing = task = None
    if Path(args.model).is_dir():  # a training run or checkpoint: its model and its data
        from moat.train.eval_predict import load_task_and_model, onnx_metadata

        ignored = [flag for flag, value in (
            ("--weights", args.weights), ("--pretrained", args.pretrained),
            ("--window-size", args.window_size), ("--pool-size", args.pool_size),
            ("--global-attention-at-end", args.global_attention_at_end),
            ("--num-classes", args.num_classes)) if value not in (None, False)]
        if ignored:
            raise InvalidInputError(f"{args.model} is a training run: its model, weights and "
                                    f"classes come from the run, so {', '.join(ignored)} cannot be "
                                    f"used with it")

        task, model, _ = load_task_and_model(args.model)
        metadata, preprocessing = onnx_metadata(task)
        args.img_size = args.img_size or task.config.eval_img_size or task.config.img_size
    else:
        model = load_model(args.model, weights=args.weights, pretrained=args.pretrained,
                           window_size=args.window_size,
                           global_attention_at_end=args.global_attention_at_end,
                           pool_size=args.pool_size, num_classes=args.num_classes)
    gelu = getattr(args, "gelu", "exact")
    if gelu != "exact":
        metadata = {**(metadata or {}), **_gelu_cost(args, model, task, preprocessing)}
    print(run_export(model, args.format, args.out, img_size=args.img_size, batch=args.batch,
                     metadata=metadata, preprocessing=preprocessing,
                     opset=getattr(args, "opset", None) or DEFAULT_OPSET,
                     check=getattr(args, "check", False),
                     static_size=getattr(args, "static_size", True),
                     dynamic_size=getattr(args, "dynamic_size", False),
                     layout=getattr(args, "layout", "onnxruntime"), gelu=gelu))
    return 0


def _gelu_cost(args: argparse.Namespace, model, task, preprocessing: dict | None) -> dict:
    """Measure, print and check what --gelu tanh costs; the metadata entry recording it."""
    from moat.data.preprocessing import size_pair
    from moat.errors import MoatError
    from moat.export.gelu import check_gelu_cost, format_gelu_cost, gelu_cost
    from moat.export.onnx_metadata import OnnxMetadata
    from moat.export.pipeline import _release_preprocessing
    from moat.export.quantize import calibration_batches

    if args.gelu_check:
        prep = {**(preprocessing or _release_preprocessing(model)),
                "input_size": (3, *size_pair(args.img_size or model.cfg.native_resolution))}
        batches = calibration_batches(args.gelu_check, prep, max_images=10_000, batch=16)
        where = args.gelu_check
    elif task is not None and task.name == "classification":
        from moat.train.loaders import eval_loader

        dataset = task.build_eval_dataset()
        loader = eval_loader(dataset, 32, collate_fn=task.collate_fn(False), workers=0,
                             pin_memory=False)
        batches = ((batch[0], batch[1]) for batch in loader)
        where = f"the validation set of {args.model}"
    else:
        raise MoatError("--gelu tanh needs images to measure its cost on: pass --gelu-check "
                        "DIR (a folder of images like those the model will see), or export a "
                        "classification training run (its validation set is used)")
    cost = gelu_cost(model, batches)
    print(f"{format_gelu_cost(cost)} ({where})")
    check_gelu_cost(cost)
    return OnnxMetadata(gelu_cost=cost).props()


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="throughput, latency, memory and multiply-adds, "
                       "optionally against timm peers")
    p.add_argument("models", nargs="*", default=["moat_0"], help="MOAT variants (default "
                   "moat_0) or timm model names")
    p.add_argument("--pretrained", action="store_true",
                   help="MOAT models with their released weights (tags; downloaded once)")
    p.add_argument("--peers", action="store_true", help="also coatnet_0_rw_224, "
                   "maxvit_tiny_tf_224 and convnext_tiny (timm), in the same run")
    p.add_argument("--img-size", nargs="+", type=count(16), default=[224])
    p.add_argument("--batch-size", nargs="+", type=count(1), default=[8])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--threads", nargs="+", type=count(0), default=[0],
                   help="0: torch's default")
    p.add_argument("--mode", nargs="+", default=["inference"], choices=["inference", "train"])
    p.add_argument("--optimized", action="store_true",
                   help="also MOAT through moat.optimize_for_inference (inference)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last weights and inputs for every plain model")
    p.add_argument("--drop-path-rate", type=number(0, 0.999), default=0.0,
                   help="stochastic depth of every model in training (default 0)")
    p.add_argument("--warmup", type=count(0), default=1)
    p.add_argument("--repeats", type=count(1), default=5)
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
                   "versions of every model (peers too), calibrated on the images in DIR")
    p.add_argument("--export-dir", help="onnxruntime: keep the exported files here and reuse "
                   "those already there (default: a temporary folder)")
    p.add_argument("--csv", help="write every row, with versions, to this CSV file")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from moat.bench.pytorch import run_benchmark
    from moat.bench.report import format_table, write_csv

    if args.runtime == "onnxruntime":
        from moat.bench.onnx_runtime import run_onnx_benchmark

        if (args.device != "cpu" or args.mode != ["inference"] or args.dtype != ["float32"]
                or args.pretrained):
            raise InvalidInputError("--runtime onnxruntime measures CPU float32 inference of "
                                    "randomly initialised models (int8 with --int8-calibration); "
                                    "drop --device/--mode/--dtype/--pretrained")
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
    p.add_argument("--max-images", type=count(1), default=256,
                   help="calibrate on at most this many images (default 256)")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from moat.export.quantize import quantize_onnx

    result = quantize_onnx(args.model, args.out, args.calibration, max_images=args.max_images)
    for path, reason in sorted(result["skipped"].items()):
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {result['path']}: int8 QDQ, per-channel weights, calibrated on "
          f"{result['calibration_images']} images")
    return 0


COMMANDS = [_add_export, _add_benchmark, _add_quantize]
