"""`moat models`, `summary`, `convert`, `info`: the variants and official checkpoints."""

from __future__ import annotations

import argparse

from moat.cli.options import count


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list every variant with parameters and FLOPs")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from moat.models.summary import models_table

    print(models_table(with_flops=not args.no_flops))
    return 0


def window_arg(text: str):
    """'none' -> None; '7' -> (7, 7); '7x9' -> (7, 9)."""
    if text.lower() in ("none", "global", "-"):
        return None
    h, _, w = text.lower().partition("x")
    try:
        size = (int(h), int(w or h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none, N or HxW, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"window sizes must be >= 1, got {text!r}")
    return size


def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-stage shapes, parameters and FLOPs of one variant")
    p.add_argument("name")
    p.add_argument("--img-size", nargs="+", type=count(16), metavar=("H", "W"), default=None)
    p.add_argument(
        "--window-size", nargs=4, type=window_arg, default=None, metavar="W",
        help="one entry per stage: none, N or HxW, e.g. --window-size none none 14 none",
    )
    p.add_argument("--no-position-embedding", action="store_true")
    p.add_argument("--pool-size", type=count(1), default=2)
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args: argparse.Namespace) -> int:
    from moat.models.summary import model_summary

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
