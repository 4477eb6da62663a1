"""How much of tiny-MOAT's ONNX Runtime time its unfused GELU costs: a diagnostic, not a model.

ONNX Runtime runs MOAT's convolutions in its blocked NCHWc layout and fuses ReLU (also
Clip, Sigmoid, Tanh, ...) into them, but no GELU: each GELU is one more pass over the
4x-expanded maps, twice a block. This script exports each tiny-MOAT twice at 256x256,
opset 23:

* as the judged file: `moat export onnx --gelu tanh` (the approximate GELU);
* the same graph with ReLU in place of every GELU. That is a different function, with
  random weights; it only bounds what a convolution with a fused GELU could give in ONNX
  Runtime;

and times both with the MobileViTv2 it is judged against (opset 18, the peers' faster
file), interleaved, batch 1, 2 threads, in `moat.export.ort.onnx_session`s:

    python benchmarks/ort_gelu_bound.py [--repeats 60] [--export-dir DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in benchmarks/inference.py

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moat.atomic import atomic_output  # noqa: E402
from moat.bench.onnx_runtime import JUDGED_MOBILE_PAIRS, export_model  # noqa: E402
from moat.bench.pytorch import interleaved  # noqa: E402
from moat.cpu import cpu_info  # noqa: E402
from moat.export.formats import EXPORTER_OPSET  # noqa: E402
from moat.export.graph import ATTENTION_OPSET  # noqa: E402
from moat.export.ort import onnx_session  # noqa: E402

SIZE = (256, 256)


def relu_in_place_of_gelu(x, approximate: str = "none"):
    return F.relu(x)


def export_all(folder: Path) -> dict[str, Path]:
    files = {}
    for ours, peer in JUDGED_MOBILE_PAIRS:
        for label, activation in ((f"{ours} [tanh GELU]", None), (f"{ours} [ReLU]", "relu")):
            path = folder / f"{ours}.{activation or 'tanh'}.opset{ATTENTION_OPSET}.onnx"
            if not path.exists():
                patch = (mock.patch("moat.export.graph.graph_gelu", relu_in_place_of_gelu)
                         if activation else contextlib.nullcontext())
                with patch, atomic_output(path) as tmp:  # a killed export leaves no file
                    export_model(ours, SIZE, tmp, gelu="tanh", opset=ATTENTION_OPSET)
            files[label] = path
        path = folder / f"{peer}.opset{EXPORTER_OPSET}.onnx"
        if not path.exists():
            with atomic_output(path) as tmp:
                export_model(peer, SIZE, tmp, opset=EXPORTER_OPSET)
        files[f"{peer} [opset {EXPORTER_OPSET}]"] = path
    return files


def gelu_nodes(path: Path) -> int:
    return sum(node.op_type == "Gelu" for node in onnx.load(path).graph.node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export-dir", help="keep (and reuse) the exported files here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.export_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = export_all(folder)
        x = np.random.default_rng(0).standard_normal((1, 3, *SIZE), dtype=np.float32)
        sessions = {label: onnx_session(path, args.threads) for label, path in files.items()}
        runs = {label: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x}))
                for label, s in sessions.items()}
        times = interleaved(runs, args.warmup, args.repeats, "cpu")
        median = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        print(f"| model | Gelu nodes | batch 1 ms (median of {args.repeats}) | min ms |")
        print("|---|---|---|---|")
        for label, path in files.items():
            print(f"| {label} | {gelu_nodes(path)} | {median[label]:.2f} | "
                  f"{min(times[label]) * 1e3:.2f} |")
    print(f"\nonnxruntime {ort.__version__}, {args.threads} threads; CPU: {cpu_info().describe()}")
    for ours, peer in JUDGED_MOBILE_PAIRS:
        theirs = median[f"{peer} [opset {EXPORTER_OPSET}]"]
        for form in ("tanh GELU", "ReLU"):
            print(f"{ours} [{form}]: x{theirs / median[f'{ours} [{form}]']:.2f} "
                  f"{peer}'s batch-1 speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
