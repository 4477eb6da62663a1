"""Time a training checkpoint of MOAT-0 (model, EMA, AdamW state) written by moat against a
plain `safetensors.torch.save_file` of the same tensors, and its load with verification.
A benchmark, not a test: the numbers depend on the disk, the page cache and the load.

    python benchmarks/checkpoint.py [--model moat_0] [--repeat 3] [--dir DIR]

moat's save writes every file to a temporary folder, hashes it while writing (one stream),
fsyncs it and renames the folder into place (moat.train.checkpoint); the plain write does
none of that. The table shows the best of --repeat runs of each, and the ratio (target <= 1.3x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import moat
from moat.train.checkpoint import CheckpointManager, read_state, read_weights, verify_checkpoint
from moat.train.optim import ModelEma


def _training_state(name: str):
    model = moat.create_model(name)
    ema = ModelEma(model, 0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # one step so that AdamW holds its two moments per tensor
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model.state_dict(), ema.state_dict(), {"optimizer": optimizer.state_dict()}


def _plain(folder: Path, model, ema, state, sync: bool = False) -> None:
    folder.mkdir()
    moments = {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items()
               for k, v in s.items() if v.ndim}
    for name, tensors in (("model", model), ("ema", ema), ("state", moments)):
        path = folder / f"{name}.safetensors"
        save_file(dict(tensors), str(path))
        if sync:  # what durability alone costs: the data on the disk, not in the page cache
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def _best(fn, repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moat_0")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    model, ema, state = _training_state(args.model)
    size = sum(t.numel() * t.element_size() for d in (model, ema) for t in d.values())
    size += sum(t.numel() * t.element_size() for s in state["optimizer"]["state"].values()
                for t in s.values())
    root = Path(tempfile.mkdtemp(prefix="moat-ckpt-bench-", dir=args.dir))
    try:
        manager = CheckpointManager(root / "run", keep_last=args.repeat + 1)
        plain = _best(lambda i: _plain(root / f"plain-{i}", model, ema, state), args.repeat)
        synced = _best(lambda i: _plain(root / f"synced-{i}", model, ema, state, sync=True),
                       args.repeat)
        ours = _best(lambda i: manager.save(i + 1, model=model, ema=ema, state=state,
                                            meta={}, weights_metadata={}), args.repeat)
        last = manager.latest()
        verify = _best(lambda i: verify_checkpoint(last), args.repeat)

        def load(_):
            read_weights(last, "model"), read_weights(last, "ema"), read_state(last)

        load_s = _best(load, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.model}: model + EMA + AdamW moments, {size / 2**20:.0f} MiB; "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, best of {args.repeat}")
    print(f"{'what':<52}{'seconds':>9}{'ratio':>8}")
    print(f"{'plain safetensors.torch.save_file (3 files)':<52}{plain:>9.2f}{1.0:>8.2f}")
    print(f"{'the same, each file fsync-ed':<52}{synced:>9.2f}{synced / plain:>8.2f}")
    print(f"{'moat checkpoint save (hashed, fsynced, atomic)':<52}{ours:>9.2f}"
          f"{ours / plain:>8.2f}  (target <= 1.3)")
    print(f"{'moat verify_checkpoint (every file read once)':<52}{verify:>9.2f}")
    print(f"{'moat load model + EMA + state (verified)':<52}{load_s:>9.2f}")


if __name__ == "__main__":
    main()
