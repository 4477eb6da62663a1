"""The measurement behind `moat.export.cpu_ops.cpu_choices`: each eager CPU choice turned
off in turn, timed interleaved in one process, plus a per-operator profile.

MOAT-0 through `optimize_for_inference`, float32, batch 8, 224x224, 2 threads; median and
fastest of the rounds. To see another instruction set on an AVX-512 machine, limit
PyTorch's kernels (emulation of the instruction set only, not of another CPU's caches):

    python benchmarks/cpu_choices.py [--repeats 6] [--profile]
    MOAT_BENCH_GLIBC_DEFAULTS=1 python benchmarks/cpu_choices.py   # allocator as in a plain script
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/cpu_choices.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/inference.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import moat  # noqa: E402
from moat.cpu import cpu_info  # noqa: E402
from moat.export.cpu_ops import current_cpu_choices, using_cpu_choices  # noqa: E402
from moat.export.fused import optimize_for_inference  # noqa: E402
from moat.allocator import keep_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="moat_0")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's "
                        "table of two passes with the chosen settings")
    args = parser.parse_args()
    if not os.environ.get("MOAT_BENCH_GLIBC_DEFAULTS"):
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    chosen = current_cpu_choices()
    print(f"CPU: {cpu_info().describe()}; chosen: {chosen}", flush=True)
    variants = {"chosen": chosen}
    for field in ("channels_last", "onednn_fusion", "projections_as_conv", "prepack_weights",
                  "chunk_batches", "expand_depthwise"):
        variants[f"{field}={not getattr(chosen, field)}"] = dataclasses.replace(
            chosen, **{field: not getattr(chosen, field)})
    plain = moat.create_model(args.model).eval()
    size = plain.cfg.native_resolution
    x = torch.randn(args.batch_size, 3, size, size)
    models = {name: optimize_for_inference(plain, channels_last=c.channels_last, img_size=size)
              for name, c in variants.items()}

    def run(name: str) -> float:
        c = variants[name]
        xi = x.contiguous(memory_format=torch.channels_last) if c.channels_last else x
        with using_cpu_choices(c), torch.inference_mode():
            start = time.perf_counter()
            models[name](xi)
            return time.perf_counter() - start

    for _ in range(2):
        for name in variants:
            run(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(run(name))
    macs = moat.count_flops(plain, (size, size), method="macs") * args.batch_size
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median * 1e3:8.1f} ms  {macs / median / 1e9:6.1f} GMAC/s  "
              f"fastest {min(values) * 1e3:8.1f} ms", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        xi = x.contiguous(memory_format=torch.channels_last) if chosen.channels_last else x
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                models["chosen"](xi)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                        max_name_column_width=40))


if __name__ == "__main__":
    main()
