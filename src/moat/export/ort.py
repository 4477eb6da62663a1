"""ONNX Runtime sessions as moat uses them: the benchmark's settings and an exported file
called like a PyTorch model (for `moat eval` on an `.onnx` file)."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from moat.errors import InvalidInputError

__all__ = ["OnnxRuntimeModel", "onnx_session"]


def onnx_session(path: str | os.PathLike, threads: int = 0):
    """A CPU session: all graph optimisations, `threads` intra-op threads (0: ONNX Runtime's
    default), sequential execution, and threads that sleep instead of spinning when idle.

    Spinning threads hold cores while waiting for work; on a machine shared with other
    jobs that slowed every model several-fold in our measurements.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel(nn.Module):
    """An exported file run by ONNX Runtime: float32 CPU tensor in, first output out."""

    def __init__(self, path: str | os.PathLike, threads: int = 0) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.session = onnx_session(path, threads)
        graph_input = self.session.get_inputs()[0]
        self.input_name, self.input_shape = graph_input.name, graph_input.shape

    def forward(self, x: Tensor) -> Tensor:
        fixed = [d if isinstance(d, int) else None for d in self.input_shape]
        if any(f is not None and f != s for f, s in zip(fixed[1:], x.shape[1:])):
            raise InvalidInputError(f"{self.path} takes inputs of shape {self.input_shape}, got "
                                    f"{list(x.shape)}: evaluate at the size it was exported for")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
