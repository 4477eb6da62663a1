"""Time `moat demo --task TASK` end to end (dataset, training, evaluation, prediction) and
check its target. A benchmark, not a test: the numbers depend on the machine and its load.

    python benchmarks/demo.py [--task classification|segmentation|detection] [--output DIR]
                              [--epochs N] [--threads N] [--set KEY=VALUE ...]

Targets on a 2-core CPU machine: classification top-1 >= 90% within 10 minutes,
segmentation mIoU >= 0.8 within 15 minutes, detection box AP50 >= 0.8 within 20 minutes.
Prints wall time, CPU time (main process and data workers) and the load average before and
after: above the number of cores, other work shared the CPU and the wall time is inflated.

Then, from the same run, the cost of an epoch around its training: the time of each epoch's
training steps alone (a pure training epoch of the same data) against the whole epoch with
its evaluation (model and EMA in one pass) and checkpoint. Target: evaluation and checkpoint
overhead under 15% of a training epoch, averaged over the run.
"""

from __future__ import annotations

import os

# On a shared machine, OpenMP threads that spin while waiting for each other burn the CPU the
# other processes need; with more runnable threads than cores a training step then takes 10-50x
# longer (measured here: 7.6-17.5 s vs 0.33-1.0 s per step). Passive waiting avoids that; set
# OMP_WAIT_POLICY yourself to override. Must happen before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from moat.cpu import cpu_info  # noqa: E402

# task -> (metric key, its target, seconds allowed)
TARGETS = {"classification": ("top-1", 90.0, 600), "segmentation": ("mIoU", 0.8, 900),
           "detection": ("AP50", 0.8, 1200)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TARGETS), default="classification")
    parser.add_argument("--output", help="demo folder, emptied first (default: "
                                         "/tmp/moat-demo-TASK)")
    parser.add_argument("--epochs", type=int, help="override the demo's epochs")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any training setting, e.g. --set lr=0.001")
    args = parser.parse_args()

    from moat.allocator import keep_freed_memory
    from moat.tasks.base import get_task

    keep_freed_memory()  # as the `moat` command does
    phases = _time_phases()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.output or f"/tmp/moat-demo-{args.task}"
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    result = get_task(args.task).demo(out, epochs=args.epochs, overrides=args.set,
                                      progress=False)
    wall = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    key, target, seconds = TARGETS[args.task]
    value = result["metrics"][key]
    print(result["summary"])
    print(f"machine: {cpu_info().describe()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__} with "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"time: {wall:.0f} s wall ({result['train_seconds']:.0f} s training), "
          f"{usage.ru_utime + usage.ru_stime:.0f} s CPU in the main process, "
          f"{children.ru_utime + children.ru_stime:.0f} s in data workers")
    met = value >= target and wall <= seconds
    print(f"{key}: {value:.4g}  target: >= {target:g} within {seconds} s: "
          f"{'met' if met else 'NOT met'}")
    print(f"outputs in {out}")
    _print_phases(phases)


def _time_phases() -> dict[str, list[float]]:
    """Wrap the loop's phases to time them: per epoch, its training steps, its evaluation and
    its checkpoint (the end-of-epoch bookkeeping with it)."""
    import moat.train.loop as loop

    phases: dict[str, list[float]] = {"train": [], "evaluate": [], "checkpoint": []}

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name].append(time.perf_counter() - t0)
        return wrapper

    loop.Trainer._train_epoch = timed(loop.Trainer._train_epoch, "train")
    loop.Trainer._evaluate = timed(loop.Trainer._evaluate, "evaluate")
    loop.save_checkpoint = timed(loop.save_checkpoint, "checkpoint")
    return phases


def _print_phases(phases: dict[str, list[float]]) -> None:
    epochs = len(phases["train"])
    if not epochs:
        return
    train = sum(phases["train"]) / epochs
    evaluate, checkpoint = sum(phases["evaluate"]), sum(phases["checkpoint"])
    overhead = (evaluate + checkpoint) / epochs
    print(f"\nper epoch, {epochs} epochs ({len(phases['evaluate'])} evaluated):")
    print(f"  {'pure training epoch (steps only)':<44}{train:8.2f} s")
    print(f"  {'evaluation, averaged over the epochs':<44}{evaluate / epochs:8.2f} s"
          + (f"  ({max(phases['evaluate']):.2f} s when it runs)" if phases["evaluate"] else ""))
    print(f"  {'checkpoint, averaged over the epochs':<44}{checkpoint / epochs:8.2f} s"
          + f"  ({max(phases['checkpoint']):.2f} s at most)")
    print(f"  {'demo epoch (training + evaluation + checkpoint)':<44}{train + overhead:8.2f} s")
    print(f"  overhead: {overhead / train * 100:.1f}% of a training epoch (target < 15%)")


if __name__ == "__main__":
    main()
