"""MOAT and its peers in ONNX Runtime: exported the same way, timed in the same run.

`run_onnx_benchmark` exports every model once per image size (MOAT with `moat.export`'s
ONNX Runtime layout at a fixed size; timm's peers with `torch.onnx.export`, the same
torch.export-based exporter and opset), optionally adds static int8 versions of every
file (`moat.export.quantize`; peers too, so that int8 speed-ups are compared in the same
run), and times all sessions **interleaved** (one run of each model per round), batch N then
batch 1, reporting medians. The rows have the columns of `moat.bench.report` (table and CSV),
with `runtime` and `onnxruntime` versions added.

Sessions: `moat.export.ort.onnx_session` (CPU, all graph optimisations, `threads` intra-op
threads that do not spin while idle), the same for every model.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from moat.bench.models import PEERS, count_macs, count_params, create_peer, is_moat
from moat.bench.pytorch import interleaved
from moat.bench.report import environment, with_ratio_to_moat
from moat.data.preprocessing import size_pair
from moat.export.formats import EXPORTER_OPSET
from moat.export.ort import onnx_session
from moat.atomic import atomic_output

__all__ = ["JUDGED_MOBILE_PAIRS", "MOBILE_PEERS", "export_model", "peers_for",
           "run_onnx_benchmark"]

# timm models that tiny-MOAT is compared with (the paper's mobile table and today's
# mobile CNN/hybrid baselines), at 256x256 like tiny-MOAT.
MOBILE_PEERS = ("mobilevitv2_075", "mobilevitv2_100", "mobilevitv2_150", "fastvit_t8",
                "mobilenetv4_conv_medium")
# Each tiny-MOAT and the MobileViTv2 of about its multiply-adds its batch-1 latency is judged
# against (benchmarks/inference_onnxruntime.py, benchmarks/ort_gelu_bound.py).
JUDGED_MOBILE_PAIRS = (("tiny_moat_0", "mobilevitv2_075"), ("tiny_moat_1", "mobilevitv2_100"))
OPSET = EXPORTER_OPSET  # MOAT and peers alike, as the exporter writes them (no downgrade)


def peers_for(models: Sequence[str]) -> tuple[str, ...]:
    """The peers of the given MOAT models: mobile peers for tiny-MOAT, else `PEERS`."""
    tiny = any(m.startswith("tiny_moat") for m in models)
    large = any(is_moat(m) and not m.startswith("tiny_moat") for m in models)
    return (PEERS if large or not tiny else ()) + (MOBILE_PEERS if tiny else ())


def export_model(name: str, img_size: tuple[int, int], path: str | os.PathLike,
                 gelu: str = "exact", opset: int = OPSET) -> Path:
    """Export MOAT (`moat.export.export_onnx`, with `gelu`) or a timm model to `path` (fp32,
    NCHW input `x`, dynamic batch, fixed size) at `opset` (at 23, MOAT's attention and the
    peers' scaled_dot_product_attention become ONNX's Attention operator)."""
    path = Path(path)
    if is_moat(name):
        import moat
        from moat.export import export_onnx

        model = moat.create_model(name).eval()
        export_onnx(model, path, img_size, opset=opset, check=False, gelu=gelu)
        return path
    model = create_peer(name, img_size, pretrained=False).eval()
    example = torch.randn(2, 3, *img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(model, (example,), os.fspath(path), dynamo=True, opset_version=opset,
                          input_names=["x"], dynamic_shapes={"x": {0: batch}},
                          external_data=False, verbose=False)
    return path


def _runner(session, batch: int, img_size: tuple[int, int]) -> Callable[[], None]:
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, *img_size), dtype=np.float32)
    return lambda: session.run(None, {name: x})


def run_onnx_benchmark(models: Sequence[str] = ("moat_0",), *, peers: bool = False,
                       img_sizes: Iterable[int | Sequence[int]] = (224,),
                       batch_sizes: Iterable[int] = (8,), threads: Iterable[int] = (0,),
                       warmup: int = 2, repeats: int = 5, latency: bool = True,
                       int8_calibration: str | os.PathLike | None = None,
                       export_dir: str | os.PathLike | None = None,
                       gelu: str | Sequence[str] = "exact", opset: int = OPSET,
                       peer_opsets: Sequence[int] | None = None,
                       log: Callable[[str], None] | None = None) -> list[dict]:
    """Measure in ONNX Runtime; one row per model, size, batch and thread count.

    `peers` adds `peers_for(models)`. `int8_calibration`: a folder of images to calibrate
    static int8 versions of every model, peers included (rows "NAME (int8)"). `export_dir`
    keeps the exported files and reuses those already there (delete them after changing the code);
    by default they go to a temporary folder. `gelu`: the GELU forms MOAT is exported with,
    one or several of "exact", "tanh" (rows "NAME [tanh GELU]"; `moat.export.gelu` measures
    what the approximation costs). `opset`: every model, MOAT and peers, is exported at it;
    `peer_opsets` exports the peers at each of these instead (rows "NAME [opset N]" when
    several: the exporter writes some operators differently from one opset to the next, and
    ONNX Runtime does not run every spelling equally fast).
    """
    import onnxruntime as ort

    names = list(dict.fromkeys([*models, *(peers_for(models) if peers else ())]))
    log = log or (lambda message: None)
    env = {**environment("cpu"), "runtime": "onnxruntime", "onnxruntime": ort.__version__}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(export_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size in img_sizes:
            size = size_pair(size)
            files = _export_all(names, size, folder, int8_calibration, log,
                                [gelu] if isinstance(gelu, str) else list(gelu), opset,
                                list(peer_opsets or [opset]))
            for n_threads in threads:
                sessions = {label: onnx_session(path, n_threads) for label, path in files.items()}
                for batch in batch_sizes:
                    log(f"onnxruntime, {size[0]}x{size[1]}, batch {batch}, "
                        f"{n_threads or 'default'} threads: {', '.join(sessions)}")
                    rows += _measure(sessions, size, batch, n_threads, warmup, repeats,
                                     latency, env, log)
    return rows


def _export_all(names: list[str], size: tuple[int, int], folder: Path,
                calibration: str | os.PathLike | None,
                log: Callable[[str], None], gelus: Sequence[str] = ("exact",),
                opset: int = OPSET, peer_opsets: Sequence[int] = ()) -> dict[str, Path]:
    files: dict[str, Path] = {}
    peer_opsets = list(peer_opsets) or [opset]
    for name in names:
        if is_moat(name):  # (GELU form, opset, label suffix)
            variants = [(g, opset, " [tanh GELU]" if g == "tanh" else "") for g in gelus]
        else:
            variants = [("exact", o, f" [opset {o}]" if len(peer_opsets) > 1 else "")
                        for o in peer_opsets]
        for gelu, file_opset, suffix in variants:
            label = name + suffix
            path = folder / (f"{name}_{size[0]}x{size[1]}{'.tanh' if gelu == 'tanh' else ''}"
                             f".opset{file_opset}.onnx")
            if not path.exists():
                log(f"exporting {label} at {size[0]}x{size[1]} -> {path}")
                with atomic_output(path) as tmp:  # a killed export leaves no file to reuse
                    export_model(name, size, tmp, gelu=gelu, opset=file_opset)
            files[label] = path
            if calibration is not None:
                from moat.export.quantize import quantize_onnx

                int8 = path.with_suffix(".int8.onnx")
                if not int8.exists():
                    log(f"quantizing {label} (calibration: {calibration}) -> {int8}")
                    quantize_onnx(path, int8, calibration, img_size=size)
                files[f"{label} (int8)"] = int8
    return files


def _measure(sessions: dict, size: tuple[int, int], batch: int, threads: int, warmup: int,
             repeats: int, latency: bool, env: dict, log: Callable[[str], None]) -> list[dict]:
    times = interleaved({k: _runner(s, batch, size) for k, s in sessions.items()},
                         warmup, repeats, "cpu")
    ones = {}
    if latency:
        ones = interleaved({k: _runner(s, 1, size) for k, s in sessions.items()},
                            warmup, max(repeats, 5), "cpu")
    rows = []
    for label, measured in times.items():
        model = label.split(" ")[0]
        macs = count_macs(model, size)
        seconds = statistics.median(measured)
        row = {
            "model": label, "mode": "inference", "img_size": f"{size[0]}x{size[1]}",
            "batch": batch, "dtype": "int8" if label.endswith("(int8)") else "float32",
            "threads": threads, "channels_last": False, "params_m": count_params(model) / 1e6,
            "gmacs": macs / 1e9, "time_ms": seconds * 1e3, "time_min_ms": min(measured) * 1e3,
            "img_per_s": batch / seconds, "gmacs_per_s": macs * batch / seconds / 1e9,
            "best_gmacs_per_s": macs * batch / min(measured) / 1e9,
            "latency_ms": statistics.median(ones[label]) * 1e3 if label in ones else None,
            "latency_min_ms": min(ones[label]) * 1e3 if label in ones else None,
            "peak_mem_mib": None, "repeats": len(measured), "warmup": warmup,
        }
        rows.append({**row, **env})
        log(f"  {label:28s} {row['time_ms']:9.1f} ms  {row['gmacs_per_s']:6.2f} GMAC/s"
            + (f"  b1 {row['latency_ms']:.1f} ms" if row["latency_ms"] else ""))
    reference = next((r for r in rows if is_moat(r["model"])), None)  # the first MOAT row
    return with_ratio_to_moat(rows, reference)
