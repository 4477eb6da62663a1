"""MOAT on one GPU: verified, then measured against the models people would pick instead.

    python benchmarks/gpu.py [--output DIR]      # one CUDA GPU, under 8 minutes
    python benchmarks/gpu.py --dry-run           # every step on the CPU at tiny sizes (CI)

Writes DIR/report.json (every number, every failure with its traceback) and DIR/report.md (the
tables); DIR defaults to $OUT when set, else ./gpu-report. Sections, each time-boxed, a failure
recorded and the next section run:

  parity      tiny-MOAT-0 with the reference weights against the official outputs in
              ../shared/reference (window and global attention): fp32 within 1e-4 (TF32 off),
              bf16 and fp16 deviations reported; the sdpa and FlexAttention kernels
  training    a fixed batch, bf16 and fp16 (gradient scaler), channels-last, eager and
              compiled: the losses must be finite and fall
  torchrun    `moat train` on generated data under `torchrun --nproc-per-node 1`, killed
              after its first checkpoint and resumed to the end
  attention   sdpa against FlexAttention: outputs and position-table gradients, and the
              training step time of MOAT-0 with each
  throughput  training and inference images/s and peak memory, bf16 channels-last, eager and
              compiled, batch 128 at 224 px (tiny-MOAT and MobileViTv2 at 256): MOAT-0/1,
              tiny-MOAT-0/1/2 and timm's CoAtNet-0, MaxViT-T, ConvNeXt-T, MobileViTv2-1.0/1.5;
              GMAC/s (images/s x multiply-adds per image) decides the comparisons

Never asserted on time: the verdicts are recorded, the script exits 0 unless a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see moat.bench.pytorch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moat  # noqa: E402
from moat.weights import parity  # noqa: E402
from moat.bench.models import count_macs  # noqa: E402
from moat.bench.pytorch import BenchSpec, build_model  # noqa: E402
from moat.bench.report import environment  # noqa: E402
from moat.data.synthetic import write_shapes_dataset  # noqa: E402
from moat.device import configure_device, tf32_enabled  # noqa: E402
from moat.integrity import atomic_write_text  # noqa: E402
from moat.models.layers import Attention, set_attention_kernel  # noqa: E402
from moat.train.precision import autocast, grad_scaler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Sizes:
    """How big each section runs: the GPU run, or the CPU dry run (every step, tiny)."""

    device: str
    batch: int = 128
    img_size: int = 224
    tiny_img_size: int = 256           # tiny-MOAT and MobileViTv2
    models: tuple[str, ...] = ("moat_0", "coatnet_0_224", "maxvit_tiny_tf_224",
                               "convnext_tiny", "moat_1", "tiny_moat_0", "tiny_moat_1",
                               "tiny_moat_2", "mobilevitv2_100", "mobilevitv2_150")
    # compiled: what the comparisons need (a compilation costs ~30-60 s)
    compiled_items: tuple[tuple[str, str], ...] = (
        ("moat_0", "train"), ("coatnet_0_224", "train"), ("maxvit_tiny_tf_224", "train"),
        ("moat_0", "inference"), ("convnext_tiny", "inference"))
    warmup: int = 3
    repeats: int = 10
    train_batch: int = 32              # the fixed-batch training check
    train_img_size: int = 224
    train_steps: int = 8
    compile_backend: str = "inductor"
    torchrun_img_size: int = 64
    torchrun_epochs: int = 10          # 4 steps each: the kill lands mid-run
    torchrun_workers: int = 2          # pinned-memory loading from worker processes
    # seconds per section, checked between items (one item can run over)
    budgets: dict = field(default_factory=lambda: {
        "parity": 30, "training": 120, "torchrun": 60, "attention": 45, "throughput": 180})


GPU = Sizes(device="cuda")
# The dry run compiles with aot_eager: the same graph capture and autograd tracing as
# inductor, without its code generation (minutes on a small CPU).
DRY = Sizes(device="cpu", batch=2, img_size=64, tiny_img_size=64,
            models=("tiny_moat_0", "convnext_tiny"),
            compiled_items=(("tiny_moat_0", "train"), ("tiny_moat_0", "inference")),
            warmup=1, repeats=2, train_batch=4, train_img_size=64, train_steps=6,
            compile_backend="aot_eager", torchrun_img_size=32, torchrun_epochs=2,
            torchrun_workers=0,
            budgets={"parity": 60, "training": 120, "torchrun": 120, "attention": 60,
                     "throughput": 120})
TINY_FAMILY = ("tiny_moat", "mobilevit")


class OverBudget(Exception):
    """A section's time box ran out; what it measured so far is kept."""


class Section:
    """One section's record: status, seconds, results, failures (each with its traceback)."""

    def __init__(self, name: str, budget: float) -> None:
        self.name, self.budget, self.start = name, budget, time.perf_counter()
        self.record: dict = {"status": "ok", "results": [], "failures": []}

    def check_time(self) -> None:
        if time.perf_counter() - self.start > self.budget:
            raise OverBudget(f"over its {self.budget:.0f} s budget")

    def attempt(self, what: str, fn: Callable[[], dict]) -> dict | None:
        """Run one item; a failure is recorded with its traceback and the section goes on."""
        self.check_time()
        try:
            row = {"item": what, **fn()}
            self.record["results"].append(row)
            if row.get("ok") is False:
                self.record["status"] = "failed"
            return row
        except OverBudget:
            raise
        except Exception as error:  # recorded, never aborting the rest
            self.record["failures"].append({"item": what, "error": f"{type(error).__name__}: "
                                            f"{error}"[:2000],
                                            "traceback": traceback.format_exc()[-4000:]})
            self.record["status"] = "failed"
            return None
        finally:
            torch._dynamo.reset()  # compiled graphs hold their models: free them
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _compile(model, sizes: Sizes):
    return torch.compile(model, backend=sizes.compile_backend)


# --- parity ----------------------------------------------------------------------------------

def run_parity(section: Section, sizes: Sizes, reference: Path) -> None:
    configure_device(torch.device(sizes.device), tf32=False)  # fp32 means float32
    weights = dict(np.load(reference / "tiny_moat0_weights.npz"))
    for path in parity.reference_cases(reference):
        case, config = parity.load_reference_case(path)
        model = parity.reference_model(weights, config)
        for kernel in ("sdpa", "flex"):
            for name, dtype in PRECISIONS.items():
                if kernel == "flex" and name != "fp32":
                    continue

                def one(model=model, case=case, kernel=kernel, dtype=dtype, name=name):
                    previous = set_attention_kernel(kernel)
                    try:
                        result = parity.deviations(model, case, sizes.device, dtype)
                    finally:
                        set_attention_kernel(previous)
                    result["ok"] = result["within_fp32_tolerance"] if name == "fp32" else \
                        all(v == v and v < float("inf") for k, v in result.items()
                            if k != "within_fp32_tolerance")  # reduced precision: finite
                    return {"case": path.stem, "kernel": kernel, "precision": name, **result}

                section.attempt(f"{path.stem} {kernel} {name}", one)


# --- training modes --------------------------------------------------------------------------

def train_fixed_batch(sizes: Sizes, precision: str, compiled: bool, steps: int) -> dict:
    """`steps` AdamW steps of tiny-MOAT-0 on one fixed batch, channels-last, through the
    training code's autocast and gradient scaler; the losses must be finite and fall."""
    device = torch.device(sizes.device)
    configure_device(device, tf32=True)
    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0", num_classes=10, drop_path_rate=0.0)
    model = model.to(device, memory_format=torch.channels_last).train()
    step_model = _compile(model, sizes) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    dtype = PRECISIONS[precision]
    scaler = grad_scaler(dtype, device)
    g = torch.Generator().manual_seed(0)
    size = sizes.train_img_size
    x = torch.randn(sizes.train_batch, 3, size, size, generator=g).to(
        device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (sizes.train_batch,), generator=g).to(device)
    losses, skipped = [], 0
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(step_model(x).float(), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale
        losses.append(loss.item())
    sync(sizes.device)
    finite = all(v == v and abs(v) < float("inf") for v in losses)
    falling = finite and min(losses[-2:]) < losses[0]
    return {"precision": precision, "compiled": compiled, "channels_last": True,
            "losses": [round(v, 4) for v in losses], "scaler_skipped_steps": skipped,
            "seconds": round(time.perf_counter() - start, 2), "ok": finite and falling}


def run_training(section: Section, sizes: Sizes) -> None:
    for compiled in (False, True):
        for precision in ("bf16", "fp16"):
            section.attempt(f"{precision} {'compiled' if compiled else 'eager'}",
                            lambda p=precision, c=compiled: train_fixed_batch(
                                sizes, p, c, sizes.train_steps))


# --- moat train under torchrun, killed and resumed -------------------------------------------

def run_torchrun(section: Section, sizes: Sizes, workdir: Path) -> None:
    data, run = workdir / "shapes", workdir / "run"
    size = sizes.torchrun_img_size
    write_shapes_dataset(data, num_classes=4, train_per_class=8, val_per_class=2, img_size=size)
    precision = "bf16" if sizes.device == "cuda" else "fp32"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "1", "-m", "moat.cli", "train", "--data", str(data),
            "--output", str(run), "--model", "tiny_moat_0", "--img-size", str(size),
            "--batch-size", "8", "--epochs", str(sizes.torchrun_epochs),
            "--workers", str(sizes.torchrun_workers), "--no-progress",
            "--no-tensorboard", "--save-every-steps", "1", "--device", sizes.device,
            "--precision", precision, "--lr", "2e-3", "--warmup-epochs", "0.5"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    latest = run / "checkpoints" / "latest"
    steps = 4 * sizes.torchrun_epochs  # 32 images, batch 8
    killed_at = [""]
    budget = max(section.budget - (time.perf_counter() - section.start), 10)

    def killed() -> dict:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + budget / 2
        while not latest.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        was_running = child.poll() is None
        # as a lost machine: torchrun and its worker (which runs in a session of its own)
        for pid in [*_descendants(child.pid), child.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = child.communicate()[0]
        if not latest.exists():
            raise RuntimeError(f"no checkpoint before the kill (exit {child.returncode}):\n"
                               f"{output[-3000:]}")
        killed_at[0] = latest.read_text().strip()
        mid_run = not killed_at[0].endswith(f"{steps:09d}")  # not after the last step
        return {"killed_at": killed_at[0], "killed_while_running": was_running,
                "ok": was_running and mid_run}

    def resumed() -> dict:
        result = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True,
                                timeout=budget / 2)
        if result.returncode != 0:
            raise RuntimeError(f"--resume exited {result.returncode}:\n"
                               f"{(result.stdout + result.stderr)[-3000:]}")
        log = (run / "train.log").read_text()
        final = latest.read_text().strip()
        return {"resumed": "resumed from" in log, "final_checkpoint": final,
                "ok": "resumed from" in log and final.endswith(f"{steps:09d}")
                and killed_at[0] < final}

    if section.attempt("moat train under torchrun, killed", killed) is not None:
        section.attempt("moat train --resume under torchrun", resumed)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, children first (from /proc: Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


# --- attention kernels -----------------------------------------------------------------------

def compare_kernels(sizes: Sizes) -> dict:
    """tiny-MOAT-0 forward (and, on CUDA, the position-table gradients) with sdpa and with
    FlexAttention: the largest differences."""
    device = torch.device(sizes.device)
    configure_device(device, tf32=False)
    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0", window_size=[None, None, (2, 2), None])
    for module in model.modules():
        if isinstance(module, Attention):
            torch.nn.init.normal_(module.relative_position_embedding, std=1.0)
    model = model.to(device).eval()
    x = torch.randn(2, 3, 64, 64, device=device)
    tables = [m.relative_position_embedding for m in model.modules() if isinstance(m, Attention)]
    out, grads = {}, {}
    for kernel in ("sdpa", "flex"):
        previous = set_attention_kernel(kernel)
        try:
            if device.type == "cuda":  # FlexAttention has no CPU backward
                y = model(x)
                grads[kernel] = torch.autograd.grad(y.square().mean(), tables)
                out[kernel] = y.detach()
            else:
                with torch.no_grad():
                    out[kernel] = model(x)
        finally:
            set_attention_kernel(previous)
    result = {"max_output_difference": (out["sdpa"] - out["flex"]).abs().max().item()}
    ok = result["max_output_difference"] < 1e-4
    if grads:
        result["max_table_grad_difference"] = max(
            (a - b).abs().max().item() for a, b in zip(grads["sdpa"], grads["flex"]))
        ok &= result["max_table_grad_difference"] < 1e-4
    return {**result, "ok": ok}


def time_kernels(sizes: Sizes) -> dict:
    """MOAT-0's training step (bf16, channels-last, eager) with each attention kernel."""
    name = sizes.models[0]
    spec = BenchSpec(name, (sizes.img_size,) * 2, sizes.batch, dtype="bfloat16", mode="train",
                     channels_last=True, device=sizes.device)
    configure_device(torch.device(sizes.device), tf32=True)
    model = build_model(spec)
    times = {}
    for kernel in ("sdpa", "flex"):
        previous = set_attention_kernel(kernel)
        try:
            times[kernel] = _time_step(_train_step(model, spec), sizes)
        finally:
            set_attention_kernel(previous)
    return {"model": name, "batch": sizes.batch, "img_size": sizes.img_size,
            "sdpa_ms": times["sdpa"] * 1e3, "flex_ms": times["flex"] * 1e3,
            "flex_speedup": times["sdpa"] / times["flex"]}


def run_attention(section: Section, sizes: Sizes) -> None:
    section.attempt("sdpa vs flex: numbers", lambda: compare_kernels(sizes))
    if sizes.device == "cuda":
        section.attempt("sdpa vs flex: MOAT-0 training step", lambda: time_kernels(sizes))


# --- throughput ------------------------------------------------------------------------------

def _train_step(model, spec: BenchSpec) -> Callable[[], None]:
    x = _input(spec)
    target = torch.randint(0, 1000, (spec.batch,), device=spec.device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(spec.device).type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
    return step


def _infer_step(model, spec: BenchSpec) -> Callable[[], None]:
    x = _input(spec)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(torch.device(spec.device).type,
                                                    dtype=torch.bfloat16):
            model(x)
    return step


def _input(spec: BenchSpec) -> torch.Tensor:
    x = torch.randn(spec.batch, 3, *spec.img_size, device=spec.device)
    return x.contiguous(memory_format=torch.channels_last)


def _time_step(step: Callable[[], None], sizes: Sizes) -> float:
    """Median seconds of one step after `warmup` steps (the compilation happens there)."""
    for _ in range(sizes.warmup):
        step()
    times = []
    for _ in range(sizes.repeats):
        sync(sizes.device)
        start = time.perf_counter()
        step()
        sync(sizes.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, mode: str, compiled: bool, sizes: Sizes) -> dict:
    size = sizes.tiny_img_size if name.startswith(TINY_FAMILY) else sizes.img_size
    spec = BenchSpec(name, (size, size), sizes.batch, dtype="bfloat16", mode=mode,
                     channels_last=True, device=sizes.device)
    configure_device(torch.device(sizes.device), tf32=True)
    model = build_model(spec)
    if compiled:
        model = _compile(model, sizes)
    step = (_train_step if mode == "train" else _infer_step)(model, spec)
    cuda = sizes.device.startswith("cuda")
    if cuda:
        sync(sizes.device)
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    seconds = _time_step(step, sizes)
    total = time.perf_counter() - start
    macs = count_macs(name, (size, size))
    return {"model": name, "mode": mode, "compiled": compiled, "img_size": size,
            "batch": sizes.batch, "gmacs": macs / 1e9, "ms": seconds * 1e3,
            "img_per_s": sizes.batch / seconds, "gmacs_per_s": macs * sizes.batch / seconds / 1e9,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "warmup_s": round(total - seconds * sizes.repeats, 1)}


def run_throughput(section: Section, sizes: Sizes) -> None:
    items = [(name, mode, False) for name in sizes.models for mode in ("train", "inference")]
    items += [(name, mode, True) for name, mode in sizes.compiled_items]
    for name, mode, compiled in items:
        section.attempt(f"{name} {mode} {'compiled' if compiled else 'eager'}",
                        lambda n=name, m=mode, c=compiled: measure(n, m, c, sizes))


def verdicts(throughput: list[dict]) -> list[dict]:
    """The issue's comparisons, per multiply-add (GMAC/s), eager and compiled alike:
    MOAT-0 training >= CoAtNet-0 and MaxViT-T, MOAT-0 inference >= ConvNeXt-T."""
    rate = {(r["model"], r["mode"], r["compiled"]): r["gmacs_per_s"] for r in throughput}
    out = []
    for compiled in (False, True):
        for mode, peer in (("train", "coatnet_0_224"), ("train", "maxvit_tiny_tf_224"),
                           ("inference", "convnext_tiny")):
            ours, theirs = rate.get(("moat_0", mode, compiled)), rate.get((peer, mode, compiled))
            if ours is None or theirs is None:
                continue
            out.append({"claim": f"moat_0 {mode} GMAC/s >= {peer}", "compiled": compiled,
                        "moat_0": ours, peer: theirs, "holds": ours >= theirs})
    return out


# --- the report ------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# MOAT on {env.get('gpu') or env['cpu']} ({report['date']})", "",
             f"torch {env['torch']}, timm {env['timm']}, moat {env['moat']}, "
             f"{'dry run (CPU, tiny sizes)' if report['dry_run'] else 'full run'}", "",
             "| section | status | seconds | failures |", "|---|---|---|---|"]
    for name, sec in report["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {sec.get('seconds', '-')} | "
                     f"{len(sec['failures'])} |")
    parity_rows = report["sections"].get("parity", {}).get("results", [])
    if parity_rows:
        lines += ["", "## Parity (max |ours - official|)", "",
                  "| case | kernel | precision | logits | stage5 | fp32 tolerance |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['kernel']} | {r['precision']} | {r['logits']:.2e} | "
                  f"{r['stage5']:.2e} | {'within' if r['within_fp32_tolerance'] else 'outside'}"
                  " |" for r in parity_rows]
    train_rows = report["sections"].get("training", {}).get("results", [])
    if train_rows:
        lines += ["", "## Training on a fixed batch (tiny-MOAT-0, channels-last)", "",
                  "| precision | compiled | losses | scaler skips | ok |", "|---|---|---|---|---|"]
        lines += [f"| {r['precision']} | {r['compiled']} | {r['losses'][0]} -> "
                  f"{r['losses'][-1]} | {r['scaler_skipped_steps']} | {r['ok']} |"
                  for r in train_rows]
    rows = report["sections"].get("throughput", {}).get("results", [])
    if rows:
        lines += ["", "## Throughput, bf16 channels-last", "",
                  "| model | mode | compiled | size | batch | GMACs/img | img/s | GMAC/s | "
                  "peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            lines.append(f"| {r['model']} | {r['mode']} | {r['compiled']} | {r['img_size']} | "
                         f"{r['batch']} | {r['gmacs']:.2f} | {r['img_per_s']:.1f} | "
                         f"{r['gmacs_per_s']:.0f} | {mem} |")
    if report.get("verdicts"):
        lines += ["", "## Comparisons per multiply-add", ""]
        lines += [f"- {v['claim']} ({'compiled' if v['compiled'] else 'eager'}): "
                  f"{'holds' if v['holds'] else 'does NOT hold'}" for v in report["verdicts"]]
    failures = [(n, f) for n, s in report["sections"].items() for f in s["failures"]]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {n}: {f['item']}: {f['error'].splitlines()[0][:300]}" for n, f in failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU at tiny sizes (batch 2, 64 px)")
    parser.add_argument("--output", default=os.environ.get("OUT") or "gpu-report",
                        help="folder for report.json and report.md (default: $OUT, else "
                        "./gpu-report)")
    parser.add_argument("--reference", default=str(REFERENCE),
                        help="the official reference folder (default: ../shared/reference)")
    parser.add_argument("--sections", nargs="+", default=list(GPU.budgets),
                        choices=list(GPU.budgets), help="run only these sections")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    # on the CPU FlexAttention runs its unfused reference on purpose (moat.models.layers)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU, or --dry-run for the CPU check")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "dry_run": args.dry_run, "environment": environment(sizes.device),
              "sizes": {k: v for k, v in sizes.__dict__.items()}, "sections": {}}
    report["environment"]["platform"] = platform.platform()

    def save() -> None:
        atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
        atomic_write_text(out / "report.md", markdown(report))

    with tempfile.TemporaryDirectory(prefix="moat-gpu-") as work:
        runners = {"parity": lambda s: run_parity(s, sizes, Path(args.reference)),
                   "training": lambda s: run_training(s, sizes),
                   "torchrun": lambda s: run_torchrun(s, sizes, Path(work)),
                   "attention": lambda s: run_attention(s, sizes),
                   "throughput": lambda s: run_throughput(s, sizes)}
        for name in args.sections:
            section = Section(name, sizes.budgets[name])
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            try:
                runners[name](section)
            except OverBudget as error:
                section.record["status"] = f"stopped: {error}"
            except Exception as error:  # the section's setup itself: recorded, next section
                section.record["status"] = "failed"
                section.record["failures"].append({"item": "setup", "error": repr(error)[:2000],
                                                   "traceback": traceback.format_exc()[-4000:]})
            section.record["seconds"] = round(time.perf_counter() - section.start, 1)
            report["sections"][name] = section.record
            report["environment"]["tf32_at_end"] = tf32_enabled()
            if name == "throughput":
                report["verdicts"] = verdicts(section.record["results"])
            save()
            print(f"  {section.record['status']} in {section.record['seconds']} s, "
                  f"{len(section.record['failures'])} failure(s)", flush=True)
    print((out / "report.md").read_text())
    failed = any(s["status"] == "failed" for s in report["sections"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
