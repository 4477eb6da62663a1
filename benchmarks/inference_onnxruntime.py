"""The issue's judged ONNX Runtime configuration: MOAT against its peers, side by side.

CPU, float32, ONNX Runtime with intra_op_num_threads=2, every model exported the same way
(`moat.bench.onnx_runtime`: MOAT by `moat export onnx` at a fixed size and `--opset`,
timm's peers by `torch.onnx.export` at opset 18 and at `--opset`, each verdict against a
peer's faster file) and timed interleaved in one process, median of the repeats:

* MOAT-0 at 224x224 against CoAtNet-0, ConvNeXt-T and MaxViT-T: batch-8 throughput
  (multiply-adds per second) and batch-1 latency;
* tiny-MOAT-0 and tiny-MOAT-1 at 256x256 against MobileViTv2-0.75/1.0/1.5, FastViT-T8 and
  MobileNetV4-conv-medium: batch-1 latency (and batch-8 throughput).

With `--int8-calibration DIR` every model is also quantized (static int8, calibrated on
the images in DIR) and timed in the same rounds. Prints the tables and the verdicts:

* MOAT-0's batch-8 GMAC/s >= CoAtNet-0's and ConvNeXt-T's;
* tiny-MOAT-0's batch-1 latency <= MobileViTv2-0.75's, tiny-MOAT-1's <= MobileViTv2-1.0's;
* with int8: int8 >= 1.5x faster than fp32 (batch 8 and batch 1) for MOAT-0, tiny-MOAT-1
  (every peer is quantized the same way and its int8 speed-up printed beside them).

    python benchmarks/inference_onnxruntime.py [--repeats 15] [--opset 23] [--gelu exact tanh]
        [--csv ort.csv] [--export-dir DIR]

(Not named onnxruntime.py: a script's folder comes first on sys.path, and the script would
shadow the onnxruntime package.)
"""

from __future__ import annotations

import os

# As in benchmarks/inference.py: PyTorch (used for exporting) must not busy-wait either.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402

from moat.bench.onnx_runtime import JUDGED_MOBILE_PAIRS, OPSET, run_onnx_benchmark  # noqa: E402
from moat.export.formats import EXPORTER_OPSET  # noqa: E402
from moat.bench.report import format_table, write_csv  # noqa: E402

GROUPS = (("moat_0", ["moat_0"], 224), ("tiny_moat", ["tiny_moat_0", "tiny_moat_1"], 256))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--groups", nargs="+", default=[g[0] for g in GROUPS],
                        choices=[g[0] for g in GROUPS])
    parser.add_argument("--int8-calibration", metavar="DIR")
    parser.add_argument("--gelu", nargs="+", default=["exact"], choices=["exact", "tanh"],
                        help="GELU forms to export MOAT with (tanh: rows 'NAME [tanh GELU]'; "
                        "the tiny-MOAT verdicts then use the tanh rows)")
    parser.add_argument("--opset", type=int, default=OPSET,
                        help="ONNX opset of every export, MOAT and peers alike (23: attention "
                        "as ONNX's Attention operator, which ONNX Runtime runs faster)")
    parser.add_argument("--peer-opsets", type=int, nargs="+",
                        help="opsets to export the peers at (default: 18 and --opset; each "
                        "verdict takes a peer's faster file: from opset 21 the exporter writes "
                        "GroupNorm as GroupNormalization, which ONNX Runtime runs slower than "
                        "opset 18's InstanceNormalization spelling)")
    parser.add_argument("--export-dir", help="keep (and reuse) the exported files here")
    parser.add_argument("--csv", help="also write the rows (with versions) to this CSV file")
    args = parser.parse_args(argv)

    rows = []
    for group, models, size in GROUPS:
        if group in args.groups:
            rows += run_onnx_benchmark(
                models, peers=True, img_sizes=[size], batch_sizes=[args.batch_size],
                threads=[args.threads], warmup=args.warmup, repeats=args.repeats,
                int8_calibration=args.int8_calibration, export_dir=args.export_dir,
                gelu=args.gelu, opset=args.opset,
                peer_opsets=args.peer_opsets or sorted({EXPORTER_OPSET, args.opset}),
                log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(rows))
    print(f"\nonnxruntime {rows[0]['onnxruntime']}; b1 latency: median of "
          f"{max(args.repeats, 5)} interleaved batch-1 runs; opset {args.opset}; "
          f"CPU: {rows[0]['cpu_description']} "
          "(ONNX Runtime's MLAS picks its kernels from the processor itself: no ISA limit)")
    if args.csv:
        write_csv(rows, args.csv)

    def get(model: str, key: str) -> float | None:
        return next((r[key] for r in rows if r["model"] == model), None)

    def fastest(peer: str, key: str) -> tuple[str, float] | tuple[None, None]:
        """The peer's fastest file (of its opsets) by `key`: its label and value."""
        found = [(r["model"], r[key]) for r in rows if r[key] is not None and (
            r["model"] == peer or r["model"].startswith(f"{peer} [opset"))]
        if not found:
            return None, None
        return (max if key == "gmacs_per_s" else min)(found, key=lambda item: item[1])

    def verdict(text: str, ok: bool) -> None:
        print(f"{text}: {'PASS' if ok else 'FAIL'}")

    print()
    mine = get("moat_0", "gmacs_per_s")
    for peer in ("coatnet_0_rw_224", "convnext_tiny"):
        label, theirs = fastest(peer, "gmacs_per_s")
        if mine is not None and theirs is not None:
            verdict(f"batch {args.batch_size}: moat_0 {mine:.1f} GMAC/s vs {label} "
                    f"{theirs:.1f} GMAC/s (x{mine / theirs:.2f})", mine >= theirs)
    tanh = " [tanh GELU]" if "tanh" in args.gelu else ""
    for ours, peer in JUDGED_MOBILE_PAIRS:
        ours += tanh
        a, (label, b) = get(ours, "latency_ms"), fastest(peer, "latency_ms")
        if a is not None and b is not None:
            verdict(f"batch 1: {ours} {a:.1f} ms vs {label} {b:.1f} ms (x{b / a:.2f} speed)",
                    a <= b)
    for model in dict.fromkeys(r["model"].removesuffix(" (int8)") for r in rows):
        for key, what in (("time_ms", f"batch {args.batch_size}"), ("latency_ms", "batch 1")):
            a, b = get(model, key), get(f"{model} (int8)", key)
            if a is not None and b is not None:
                line = f"{what}: {model} int8 {b:.1f} ms vs fp32 {a:.1f} ms (x{a / b:.2f})"
                if model in ("moat_0", "tiny_moat_1"):  # judged; the peers' for comparison
                    verdict(line, a / b >= 1.5)
                else:
                    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
