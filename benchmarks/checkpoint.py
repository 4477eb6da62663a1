"""Time a training checkpoint of MOAT-0 (model, EMA, AdamW state) written by moat against a
plain `safetensors.torch.save_file` of exactly the same tensors, and its load with
verification. A benchmark, not a test: the numbers depend on the disk, the page cache and the
load of the machine.

    python benchmarks/checkpoint.py [--model moat_0] [--repeat 7] [--dir DIR]

moat's save writes every file into a temporary folder, hashes every tensor while writing it
(threads, one pass over memory), fsyncs the files and renames the folder into place
(moat.train.checkpoint); the plain write does none of that. Training saves with
`background=True`: the call returns once the files are written and hashed, and the fsync and
rename run in a background thread (that row is the judged one, the time training waits);
the row after it times the whole save until durable and in place. Both write the same tensors: the
model, the EMA and the tensors of the training state (what moat puts in state.safetensors;
moat also writes state.pt, the small rest of the state, and meta.json). Each repeat runs
every case once, in turn, each after `os.sync()` (no case pays for another's dirty pages);
the table shows the median and the best of --repeat, and the ratio of the medians
(target <= 1.3). Old checkpoints are deleted outside the timed part, as the plain folders
are (in training, pruning one costs about 0.09 s more). The sha256 row times hashing the
same tensors alone, one thread a core, as the save did before it used XXH3-128; the XXH3 row
times the checksum moat computes now (moat.integrity). With the fsync'ed write, the costs the
plain write does not pay.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file

import moat
from moat.cpu import cpu_info
from moat.train.checkpoint import Checkpoint, CheckpointManager, split_tensors
from moat.train.optim import ModelEma
from moat.train.rng import rng_state


def _training_state(name: str):
    model = moat.create_model(name)
    ema = ModelEma(model, 0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # one step so that AdamW holds its two moments per tensor
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": [rng_state()]}
    return model.state_dict(), ema.state_dict(), state


def _plain(folder: Path, groups: dict, sync: bool = False) -> None:
    folder.mkdir()
    for name, tensors in groups.items():
        path = folder / f"{name}.safetensors"
        save_file(dict(tensors), str(path))
        if sync:  # what durability alone costs: the data on the disk, not in the page cache
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def _hash_all(groups: dict, hash_fn) -> None:
    """hash_fn of every tensor, spread over one thread a core (both release the GIL)."""
    tensors = sorted((t for g in groups.values() for t in g.values()), key=lambda t: -t.numel())
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(lambda t: hash_fn(t.reshape(-1).view(torch.uint8).numpy()).digest(),
                      tensors))


SAVE = "moat checkpoint save, as training calls it"


def _size(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moat_0")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dir", help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    model, ema, state = _training_state(args.model)
    groups = {"model": model, "ema": ema, "state": split_tensors(state)[1]}
    root = Path(tempfile.mkdtemp(prefix="moat-ckpt-bench-", dir=args.dir))
    manager = CheckpointManager(root / "run", keep_last=10**6)
    step = iter(range(1, 10**6))
    cases = {
        "plain safetensors.torch.save_file (3 files)":
            lambda i: _plain(root / f"plain-{i}", groups),
        "the same, each file fsync-ed": lambda i: _plain(root / f"synced-{i}", groups, True),
        "sha256 of the same tensors alone (a thread a core)":
            lambda i: _hash_all(groups, hashlib.sha256),
        "XXH3-128 of the same tensors alone (a thread a core)":
            lambda i: _hash_all(groups, xxhash.xxh3_128),
        SAVE: lambda i: manager.save(next(step), model=model, ema=ema, state=state, meta={},
                                     weights_metadata={}, background=True),
        "moat checkpoint save until durable and in place":
            lambda i: manager.save(next(step), model=model, ema=ema, state=state, meta={},
                                   weights_metadata={}),
    }
    times: dict[str, list[float]] = {what: [] for what in cases}
    try:
        for i in range(args.repeat):
            for what, fn in cases.items():
                os.sync()
                t0 = time.perf_counter()
                fn(i)
                times[what].append(time.perf_counter() - t0)
                manager.wait()  # outside the timing: the background commit of SAVE
                for old in [*root.glob("*-*"), *manager.complete()[:-1]]:
                    shutil.rmtree(old)
        last = manager.latest()
        written = sum(p.stat().st_size for p in last.iterdir())
        for what in ("moat verify (every file read once)",
                     "moat resume read: verify + model + EMA + state"):
            times[what] = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                checkpoint = Checkpoint(last).verify()
                if what.startswith("moat resume"):
                    checkpoint.weights("model"), checkpoint.weights("ema"), checkpoint.state()
                times[what].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    sizes = ", ".join(f"{k} {_size(v) / 2**20:.0f}" for k, v in groups.items())
    print(f"{args.model}: model + EMA + AdamW state, {sum(map(_size, groups.values())) / 2**20:.0f}"
          f" MiB of tensors ({sizes} MiB; moat's checkpoint folder {written / 2**20:.1f} MiB); "
          f"{os.cpu_count()} CPU cores ({cpu_info().describe()}), torch {torch.__version__}; "
          f"{args.repeat} repeats")
    plain = statistics.median(times[next(iter(cases))])
    print(f"{'what':<56}{'median s':>10}{'best s':>8}{'ratio':>7}")
    for what, values in times.items():
        ratio = f"{statistics.median(values) / plain:>7.2f}" if what in cases else ""
        print(f"{what:<56}{statistics.median(values):>10.3f}{min(values):>8.3f}{ratio}")
    ours = statistics.median(times[SAVE])
    print(f"moat save / plain write: {ours / plain:.2f}x (target <= 1.3)")


if __name__ == "__main__":
    main()
