"""Detection on real photographs, labelled as a user would, trained with the documented
command and default settings; prints a table. A benchmark, not a test (the slow test
`tests/test_user_data.py::test_detector_learns_real_coins_with_default_settings` runs the
same data and command).

    python benchmarks/real_photo_dense.py [--work DIR] [--train-tiles N] [--set KEY=VALUE ...]

The data (`tests/real_photos.py`): 96 px tiles of scikit-image's `coins` photograph, each
coin's box from classical segmentation, as COCO JSON with category id 7 (training tiles from
the top three rows of coins, validation tiles from the bottom row).

Rows: the default run (`moat train --task detection --model tiny_moat_0 --data DIR --output
RUN`, then `moat eval --checkpoint RUN --data DIR`), and the validation set scored with its
true boxes moved to other tiles (what a pipeline that lost the pairing of images and labels
would reach at best); then the box AP of each evaluated epoch, 10 epochs a line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_photos import shuffled_baseline, write_coins  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/moat-real-photo-dense")
    parser.add_argument("--train-tiles", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    from moat.cpu import cpu_info

    work = Path(args.work)
    data = write_coins(work / "coins", args.train_tiles)
    run = work / f"run-{args.train_tiles}"
    cmd = [sys.executable, "-m", "moat.cli", "train", "--task", "detection", "--model",
           "tiny_moat_0", "--data", str(data), "--output", str(run), "--no-progress",
           *[f"--set={o}" for o in args.overrides]]
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    out = subprocess.run([sys.executable, "-m", "moat.cli", "eval", "--checkpoint", str(run),
                          "--data", str(data)], check=True, capture_output=True, text=True).stdout
    print(out)
    metric = {k: float(out.split(f"{k}: ")[1].split()[0]) for k in ("AP", "AP50")}
    print("| run | AP | AP50 | training time |")
    print("|---|---|---|---|")
    print(f"| defaults, {args.train_tiles} training tiles | {metric['AP']:.3f} | "
          f"{metric['AP50']:.3f} | {seconds:.0f} s |")
    print(f"| true boxes on shuffled tiles | | {shuffled_baseline(data):.3f} | |")
    print("\nbox AP per evaluated epoch (metrics.jsonl), mean [min, max] over 10 epochs:")
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("event") == "eval"]
    for i in range(0, len(evals), 10):
        ap = [r["AP"] for r in evals[i:i + 10]]
        print(f"  epochs {evals[i]['epoch']}-{evals[i + len(ap) - 1]['epoch']}: AP "
              f"{sum(ap) / len(ap):.3f} [{min(ap):.3f}, {max(ap):.3f}], AP50 min "
              f"{min(r['AP50'] for r in evals[i:i + 10]):.3f}")
    print(f"\nCPU {cpu_info().describe()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
