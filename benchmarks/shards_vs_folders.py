"""The same images trained from class folders and from WebDataset shards, and the top-1 of
each: reading shards must not change what a run learns (issue 21). A benchmark, not a test.

    python benchmarks/shards_vs_folders.py [--work DIR] [--sets photos textures] [--seeds 0 1]

Each set is one of benchmarks/own_images.py's real image sets (scikit-image and scikit-learn
photos, nothing downloaded), written once as class folders, then as shards by `moat shard`
(the webdataset package's TarWriter). Both runs use the documented command with the same
settings and seed (`moat train --data DIR --model tiny_moat_0 --img-size 64 --epochs E
--batch-size B`). The orders differ by design (a shard epoch shuffles shards, then samples
within a window of shards), so the two top-1 figures agree within run-to-run noise, not
to the bit: the seed-to-seed spread of the folder runs is printed beside them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from own_images import SCHEDULES, train_run, write_set  # noqa: E402

from moat.cpu import cpu_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/shards-vs-folders"))
    parser.add_argument("--sets", nargs="+", default=["photos"], choices=sorted(SCHEDULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()

    rows = []
    for name in args.sets:
        folder = write_set(name, args.work / "data")
        shards = args.work / "shards" / name
        if not (shards / "_info.json").exists():
            subprocess.run([sys.executable, "-m", "moat.cli", "shard", str(folder), str(shards),
                            "--shard-size", "100"], check=True)
        epochs, batch = SCHEDULES[name]
        for seed in args.seeds:
            extra = ["--seed", str(seed)]
            f_top1, f_s = train_run(folder, args.work / f"{name}-folders-{seed}", extra,
                                    epochs, batch)
            s_top1, s_s = train_run(shards, args.work / f"{name}-shards-{seed}", extra,
                                    epochs, batch)
            rows.append((name, seed, f_top1, s_top1, f_s, s_s))

    print(f"\nCPU: {cpu_info().describe()}")
    print("| set | seed | folders top-1 | shards top-1 | folders s | shards s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seed, f1, s1, fs, ss in rows:
        print(f"| {name} | {seed} | {f1:.1f} | {s1:.1f} | {fs:.0f} | {ss:.0f} |")


if __name__ == "__main__":
    main()
