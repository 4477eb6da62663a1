"""`moat explain` and `moat app`: maps of what the model looks at, and a local web page."""

from __future__ import annotations

import argparse

from moat.cli.options import count, number


def _add_model_source(p: argparse.ArgumentParser, exported: bool = False) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    exported_help = ", or an exported classifier (.onnx, .pt2, .pt: top-5 only)"
    source.add_argument("--model", help="variant or pretrained tag, e.g. tiny_moat_0, "
                        "moat_0.in1k_224" + (exported_help if exported else ""))
    source.add_argument("--checkpoint", help="training checkpoint: RUN_DIR, checkpoint folder "
                        "or weights file (classification, segmentation or detection)")
    p.add_argument("--img-size", type=count(16), help="input size (default: the model's)")
    p.add_argument("--device", default="cpu")


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="class-activation maps per stage and attention maps "
                       "per MOAT block, as PNG overlays and arrays")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    _add_model_source(p)
    p.add_argument("--class", dest="target", help="class to explain, name or index (default: "
                   "the predicted one; segmentation: the largest predicted class)")
    p.add_argument("--box", type=count(0), help="detection: explain the K-th detection, best first "
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
    p.add_argument("--port", type=count(1, 65535), default=7860)
    p.add_argument("--max-upload-mb", type=number(0, above=True), default=10.0,
                   help="largest accepted upload")
    p.set_defaults(func=_cmd_app)


def _cmd_app(args: argparse.Namespace) -> int:
    from moat.app import serve

    serve(model=args.model, checkpoint=args.checkpoint, img_size=args.img_size,
          device=args.device, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    return 0


COMMANDS = [_add_explain, _add_app]
