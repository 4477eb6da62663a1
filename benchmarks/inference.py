"""The issue's judged configuration: MOAT-0 against timm's CoAtNet-0, MaxViT-T and ConvNeXt-T.

CPU, float32, batch 8, 224x224, two threads; inference (MOAT plain and through
`moat.optimize_for_inference`, the peers in eval + inference_mode) and a training step
(forward + cross-entropy + backward, every model with stochastic depth 0), all models
channels-last, timed interleaved, median of the repeats. Prints the table and two verdicts:

* inference: MOAT-0's multiply-adds per second >= CoAtNet-0's and ConvNeXt-T's;
* training: MOAT-0's multiply-adds per second >= CoAtNet-0's (i.e. as fast per multiply-add).

    python benchmarks/inference.py [--repeats 5] [--csv results.csv] [--threads 2]

Extra arguments go to `moat benchmark` (see `moat benchmark --help`).
"""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads (the default) spin on cores that other processes need; on a
# shared machine that makes every model many times slower and the comparison a lottery.
# Passive waiting applies to every model alike. Set OMP_WAIT_POLICY yourself to override;
# it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402

from moat.allocator import keep_freed_memory  # noqa: E402
from moat.bench.pytorch import run_benchmark  # noqa: E402
from moat.bench.report import format_table, write_csv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    # 5: with four models sharing one process, MOAT-0's heap keeps growing (page faults,
    # +0.4 s a step) for about four rounds before it settles; every model gets the same.
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mode", nargs="+", default=["inference", "train"])
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--csv", help="also write the rows (with versions) to this CSV file")
    args = parser.parse_args(argv)

    keep_freed_memory()  # for every model alike; see moat/allocator.py
    rows = run_benchmark(
        ["moat_0"], peers=True, img_sizes=[args.img_size], batch_sizes=[args.batch_size],
        dtypes=["float32"], threads=[args.threads], modes=args.mode, optimized=True,
        channels_last=True, drop_path_rate=0.0, warmup=args.warmup, repeats=args.repeats,
        memory=args.memory, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)

    def rate(model: str, mode: str, key: str = "gmacs_per_s") -> float | None:
        return next((r[key] for r in rows if r["model"] == model and r["mode"] == mode), None)

    print()
    checks = [("inference", "moat_0 (optimized)", ("coatnet_0_rw_224", "convnext_tiny")),
              ("train", "moat_0", ("coatnet_0_rw_224",))]
    for mode, ours, peers in checks:
        mine = rate(ours, mode)
        if mine is None:
            continue
        for peer in peers:
            theirs = rate(peer, mode)
            verdict = "PASS" if mine >= theirs else "FAIL"
            best = rate(ours, mode, "best_gmacs_per_s") / rate(peer, mode, "best_gmacs_per_s")
            print(f"{mode:9s} {ours} {mine:.2f} GMAC/s vs {peer} {theirs:.2f} GMAC/s "
                  f"(x{mine / theirs:.2f} median, x{best:.2f} best run): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
