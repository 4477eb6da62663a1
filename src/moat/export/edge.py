"""Edge runtimes: ExecuTorch programs (.pte) with the XNNPACK delegate (`moat export
executorch`), run and checked through ExecuTorch's own runtime.

The exported module is `prepare_for_export`'s fused copy (BatchNorm folded, position biases
as constants, 'SAME' padding frozen) at a fixed input size and batch: what a phone app
feeds one camera frame at a time. XNNPACK runs the convolutions, matrix products and most
element-wise operators; whatever it does not take runs in ExecuTorch's portable kernels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["check_executorch", "export_executorch", "run_executorch"]


def export_executorch(model: nn.Module, path: str | os.PathLike, img_size: int | Sequence[int],
                      *, batch: int = 1, layout: str = "pytorch", check: bool = True,
                      atol: float = 1e-4) -> dict:
    """Lower the fused model to an ExecuTorch program with the XNNPACK delegate.

    With `check`, runs the written file in ExecuTorch's runtime and compares with the
    model in PyTorch (raises beyond `atol`). Returns a report dict.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from moat.data.preprocessing import size_pair
    from moat.export.formats import _example, prepare_for_export

    size = size_pair(img_size)
    fused, _ = prepare_for_export(model, size, dynamic_size=False, layout=layout)
    example = _example(fused, size, batch)
    with torch.no_grad():
        program = torch.export.export(fused, (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    delegated = sum(1 for node in lowered.exported_program().graph.nodes
                    if node.op == "call_function" and "executorch_call_delegate" in str(node.target))
    buffer = lowered.to_executorch().buffer
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer)
    os.replace(tmp, path)
    report = {"path": str(path), "img_size": size, "batch": batch, "delegated_calls": delegated,
              "bytes": len(buffer)}
    if check:
        report["max_abs_err"] = check_executorch(path, model, size, batch, atol)
    return report


def run_executorch(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """The first output of an ExecuTorch program's `forward` on `x`, in ExecuTorch's runtime."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(path))
    return program.load_method("forward").execute([x.contiguous()])[0]


def check_executorch(path: str | os.PathLike, model: nn.Module, size: tuple[int, int],
                     batch: int = 1, atol: float = 1e-4) -> float:
    """Largest difference between the program in ExecuTorch and `model` in PyTorch."""
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        model.train(was_training)
    error = float((run_executorch(path, x) - expected).abs().max())
    if not error <= atol:
        raise RuntimeError(f"{path}: ExecuTorch differs from PyTorch by {error:.2e} (> {atol:g})")
    return error
