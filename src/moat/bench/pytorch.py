"""Throughput, latency, memory, parameters and multiply-adds of MOAT and its peers.

`run_benchmark` measures every combination of models x image sizes x batch sizes x dtypes x
thread counts x modes ("inference", "train") and returns one row (a dict) per model and
combination, with the software and hardware versions; `moat.bench.report` prints them as a
table (`format_table`) and stores them as CSV (`write_csv`). The models and their counts are
`moat.bench.models`'.

Method (the same for every model, so that the numbers compare):

* models of one combination are built together and timed **interleaved** (one pass of
  each model per round, `repeats` rounds after `warmup` rounds), and the **median** is
  reported: on a shared machine the rounds see the same background load;
* inference runs in eval mode under `torch.inference_mode()`; `optimized=True` runs MOAT
  through `moat.optimize_for_inference` (the peers have no such step: they run as timm
  builds them, eval + inference_mode);
* a training step is forward + cross-entropy + backward (no optimizer step) in train mode,
  with the same stochastic depth for every model (`drop_path_rate`, default 0);
* bfloat16 runs under `torch.autocast` (weights stay float32), float32 runs plainly;
* `channels_last` stores weights and inputs channels-last for every plain model;
* multiply-adds are those of convolutions, linear layers and attention matmuls (the
  timm/fvcore convention; `moat.count_flops(method="macs")` for MOAT, the same counter
  for the peers), counted once per image at the benchmark's size;
* peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the growth of the
  process's peak resident set size (VmHWM in /proc/self/status) over one pass, measured in
  a fresh subprocess per model (tracemalloc does not see torch's allocations);
* latency is the median time of one image (batch 1) in inference;
* "best" is the fastest run: on a loaded machine the least disturbed one, a useful second
  opinion when the median is noisy.

On a machine shared with other jobs, start Python with `OMP_WAIT_POLICY=PASSIVE` (the
`benchmarks/` scripts set it): busy-waiting OpenMP threads otherwise slow every model down
several times, and models with many operators most. The benchmark scripts and `moat
benchmark` also make glibc keep freed memory (`moat.allocator`), for every model alike. The
policy, the allocator setting and the load average are recorded with the results.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moat.bench.models import PEERS, count_macs, count_params, create, is_moat
from moat.bench.report import environment, with_ratio_to_moat
from moat.device import pick_device
from moat.errors import InvalidInputError

__all__ = ["BenchSpec", "build_model", "interleaved", "measure_peak_memory", "run_benchmark"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("inference", "train")


@dataclass(frozen=True)
class BenchSpec:
    """One model in one configuration: everything needed to rebuild it in a subprocess."""

    model: str
    img_size: tuple[int, int]
    batch: int
    dtype: str = "float32"
    threads: int = 0
    mode: str = "inference"
    optimized: bool = False
    channels_last: bool = False
    drop_path_rate: float = 0.0
    device: str = "cpu"
    preset: str | None = None  # MOAT only: a dense-prediction attention layout (PRESETS)
    pretrained: bool = False  # released weights (the numbers do not change; the model does)

    @property
    def label(self) -> str:
        return (self.model + (f" [{self.preset}]" if self.preset else "")
                + (" (optimized)" if self.optimized else ""))


def build_model(spec: BenchSpec) -> nn.Module:
    """The model of `spec`, in the mode, memory format and device the measurement uses."""
    model = create(spec.model, spec.img_size, spec.drop_path_rate, spec.preset,
                   spec.pretrained).to(spec.device)
    if spec.mode == "train":
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    if spec.optimized and spec.mode == "inference" and is_moat(spec.model):
        from moat.export.fused import optimize_for_inference

        return optimize_for_inference(model)
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# --- timing --------------------------------------------------------------------------------

def _autocast(spec: BenchSpec):
    if spec.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(spec.device).type, dtype=DTYPES[spec.dtype])


def _input(spec: BenchSpec, batch: int | None = None) -> torch.Tensor:
    x = torch.randn(batch or spec.batch, 3, *spec.img_size, device=spec.device,
                    generator=torch.Generator(spec.device).manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if spec.channels_last else x


def make_step(spec: BenchSpec, model: nn.Module, batch: int | None = None) -> Callable[[], None]:
    """One timed unit of work: a forward pass, or forward + loss + backward."""
    x = _input(spec, batch)
    if spec.mode == "inference":
        def step() -> None:
            with torch.inference_mode(), _autocast(spec):
                model(x)
    else:
        target = torch.randint(0, 1000, (x.shape[0],), device=spec.device,
                               generator=torch.Generator(spec.device).manual_seed(0))

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with _autocast(spec):
                loss = F.cross_entropy(model(x).float(), target)
            loss.backward()
    return step


def _timed(step: Callable[[], None], device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def interleaved(steps: dict[str, Callable[[], None]], warmup: int, repeats: int,
                 device: str) -> dict[str, list[float]]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(_timed(step, device))
    return times


# --- memory --------------------------------------------------------------------------------

def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_probe(spec_json: str) -> None:
    """Subprocess entry: peak memory of one pass of one model, printed as JSON (MiB)."""
    fields = json.loads(spec_json)
    spec = BenchSpec(**{**fields, "img_size": tuple(fields["img_size"])})
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model = build_model(spec)
    step = make_step(spec, model)
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _vm_kib("VmRSS") * 1024
        step()
        peak = _vm_kib("VmHWM") * 1024 - before
    print(json.dumps({"peak_mem_mib": peak / 2**20}))


def measure_peak_memory(spec: BenchSpec, timeout: float = 1800) -> float | None:
    """Peak memory (MiB) of one pass above the built model, in a fresh process."""
    if spec.device == "cpu" and not os.path.exists("/proc/self/status"):
        return None
    fields = {**spec.__dict__, "img_size": list(spec.img_size)}
    code = ("from moat.bench.pytorch import _memory_probe; "
            f"_memory_probe({json.dumps(json.dumps(fields))})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe of {spec.label} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mem_mib"]


# --- the benchmark -------------------------------------------------------------------------

def run_benchmark(models: Sequence[str] = ("moat_0",), *, peers: bool = False,
                  img_sizes: Iterable[int | Sequence[int]] = (224,),
                  batch_sizes: Iterable[int] = (8,), dtypes: Iterable[str] = ("float32",),
                  threads: Iterable[int] = (0,), modes: Iterable[str] = ("inference",),
                  optimized: bool = False, channels_last: bool = False,
                  drop_path_rate: float = 0.0, warmup: int = 1, repeats: int = 5,
                  latency: bool = True, memory: bool = True, device: str = "cpu",
                  preset: str | None = None, pretrained: bool = False,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Measure; return one row per model and configuration (see the module docstring).

    `models`: MOAT variants (or any timm model name); `peers` adds `PEERS`. `threads` 0
    keeps torch's default. With `optimized`, MOAT's inference is measured both plainly and
    through `optimize_for_inference` (rows "moat_0" and "moat_0 (optimized)"). `preset`
    ("detection", "segmentation") builds the MOAT models with that backbone preset's
    attention layout and pooling (`moat.tasks.backbone.PRESETS`), the peers as they are.
    `pretrained` builds every model with its released weights (MOAT: tags, downloaded once).
    """
    names = list(dict.fromkeys([*models, *(PEERS if peers else ())]))
    for mode in modes:
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if repeats < 1 or warmup < 0:
        raise InvalidInputError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if device != "cpu":
        device = str(pick_device(device))  # --device cuda without CUDA: a message, not a crash
    log = log or (lambda message: None)
    env = environment(device)
    macs_cache: dict[tuple, int] = {}
    rows = []
    default_threads = torch.get_num_threads()
    for size in img_sizes:
        size = (size, size) if isinstance(size, int) else tuple(size)
        for dtype in dtypes:
            for n_threads in threads:
                torch.set_num_threads(n_threads or default_threads)
                for mode in modes:
                    for batch in batch_sizes:
                        specs = []
                        for name in names:
                            common = dict(img_size=size, batch=batch, dtype=dtype,
                                          threads=n_threads or default_threads, mode=mode,
                                          channels_last=channels_last,
                                          drop_path_rate=drop_path_rate, device=device,
                                          preset=preset if is_moat(name) else None,
                                          pretrained=pretrained)
                            specs.append(BenchSpec(name, **common))
                            if optimized and mode == "inference" and is_moat(name):
                                specs.append(BenchSpec(name, optimized=True, **common))
                        log(f"{mode}, {size[0]}x{size[1]}, batch {batch}, {dtype}, "
                            f"{specs[0].threads} threads: {', '.join(s.label for s in specs)}")
                        rows += _measure(specs, warmup, repeats, latency, memory, macs_cache,
                                         env, log)
    torch.set_num_threads(default_threads)
    return rows


def _measure(specs: list[BenchSpec], warmup: int, repeats: int, latency: bool, memory: bool,
             macs_cache: dict, env: dict, log: Callable[[str], None]) -> list[dict]:
    built = {spec: build_model(spec) for spec in specs}
    steps = {spec: make_step(spec, model) for spec, model in built.items()}
    times = interleaved(steps, warmup, repeats, specs[0].device)
    latencies = {}
    if latency and specs[0].mode == "inference":
        ones = {spec: make_step(spec, model, batch=1) for spec, model in built.items()}
        latencies = interleaved(ones, warmup, max(repeats, 5), specs[0].device)
    del built, steps
    rows = []
    for spec in specs:
        key = (spec.model, spec.img_size, spec.preset)
        if key not in macs_cache:
            macs_cache[key] = count_macs(spec.model, spec.img_size, spec.preset)
        macs = macs_cache[key]
        seconds = statistics.median(times[spec])
        row = {
            "model": spec.label, "mode": spec.mode, "img_size": f"{spec.img_size[0]}x"
            f"{spec.img_size[1]}", "batch": spec.batch, "dtype": spec.dtype,
            "threads": spec.threads, "channels_last": spec.channels_last or spec.optimized,
            "params_m": count_params(spec.model) / 1e6, "gmacs": macs / 1e9,
            "time_ms": seconds * 1e3, "time_min_ms": min(times[spec]) * 1e3,
            "img_per_s": spec.batch / seconds, "gmacs_per_s": macs * spec.batch / seconds / 1e9,
            "best_gmacs_per_s": macs * spec.batch / min(times[spec]) / 1e9,
            "latency_ms": (statistics.median(latencies[spec]) * 1e3 if spec in latencies
                           else None),
            "peak_mem_mib": measure_peak_memory(spec) if memory else None,
            "repeats": len(times[spec]), "warmup": warmup,
        }
        rows.append({**row, **env})
        log(f"  {spec.label:28s} {row['time_ms']:9.1f} ms  {row['gmacs_per_s']:6.2f} GMAC/s")
    # The ratio is to the MOAT row being compared: the optimized one when there is one.
    moat_rows = [r for r in rows if is_moat(r["model"].split(" ")[0])]
    reference = next((r for r in moat_rows if r["model"].endswith("(optimized)")),
                     moat_rows[0] if moat_rows else None)
    return with_ratio_to_moat(rows, reference)


