"""Time `moat demo --task detection` end to end and print its final box AP and AP50.

    python benchmarks/detection_demo.py [--output DIR] [--threads N] [--epochs N] [--set KEY=VALUE ...]

The target: box AP50 >= 0.8 within 20 minutes on a 2-core CPU machine (Cascade Mask R-CNN,
tiny-MOAT-0 backbone trained from scratch on the generated shapes dataset). The script writes
a fresh run (the output folder is emptied first), then prints wall time, the process CPU time
(what an otherwise idle machine would need, roughly, divided by the cores) and the machine
load, since shared machines make wall times noisy. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="/tmp/moat-detection-demo")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from moat.tasks.detection import run_detection_demo

    shutil.rmtree(args.output, ignore_errors=True)
    load_before = os.getloadavg()
    t0, cpu0 = time.time(), time.process_time()
    result = run_detection_demo(args.output, epochs=args.epochs, overrides=args.set,
                                progress=False)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = result["metrics"]
    print(result["summary"])
    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, load average "
          f"before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"time: {wall:.1f} s wall ({result['train_seconds']:.1f} s data + training), "
          f"{cpu:.1f} s CPU in the main process, "
          f"{children.ru_utime + children.ru_stime:.1f} s in child processes")
    print(f"box AP: {metrics['AP']:.4f}  box AP50: {metrics['AP50']:.4f}  "
          f"({'meets' if metrics['AP50'] >= 0.8 else 'misses'} the AP50 0.8 target; "
          f"{'within' if wall <= 1200 else 'over'} 20 minutes)")


if __name__ == "__main__":
    main()
