"""Device handling, in one place: which device a `--device` name means, how batches reach it,
and the process-wide CUDA math settings (TF32, cuDNN autotuning, determinism).

* `--device auto` is cuda:LOCAL_RANK where CUDA is available, else the CPU;
* on CUDA, loaders pin their batches in page-locked memory and batches are copied with
  `non_blocking=True`, so the copy of the next batch overlaps the current step's kernels
  (on the CPU both are no-ops: nothing is copied);
* TF32 matrix products and convolutions are allowed only when asked for (`tf32=True`, what a
  mixed-precision training run uses): PyTorch lets cuDNN convolutions use TF32 by default,
  and TF32 keeps 10 bits of mantissa, about 1e-3 relative, far from the 1e-4 of the parity
  with the official model; `configure_device(tf32=False)` makes float32 mean float32;
* cuDNN autotuning (`benchmark`) is on unless the run is deterministic.
"""

from __future__ import annotations

import os

import torch

from moat.errors import MoatError


class DeviceError(MoatError, RuntimeError):
    """A --device that this machine does not have."""


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device `--device NAME` means in the process of local rank `local_rank`.

    auto: cuda:LOCAL_RANK (modulo the GPUs) where CUDA is available, else the CPU; a bare
    `cuda` is also cuda:LOCAL_RANK, so that each torchrun process takes its own GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise DeviceError(f"--device {name!r} is not a device name ({error}); use auto, cpu, "
                          "cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name!r} requested but CUDA is not available here; "
                              "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif device.index >= count:
            raise DeviceError(f"--device {name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 .. cuda:{count - 1}")
    return device


def configure_device(device: torch.device, *, tf32: bool = False,
                     deterministic: bool = False) -> None:
    """The process-wide math settings for work on `device` (see the module docstring).

    `deterministic` also makes PyTorch refuse (on the CPU) or warn about (on CUDA, where a few
    backward kernels, e.g. the bilinear resize of position tables, have no deterministic
    version) nondeterministic algorithms.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=torch.cuda.is_available())
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    set_tf32(tf32)


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in float32 matrix products and cuDNN convolutions on CUDA."""
    # The old flags, on every PyTorch: torch.export still reads them, and a value they cannot
    # express (the new API's cuDNN conv "ieee" beside RNN "tf32") makes that read an error,
    # so an export after fp32 training in the same process failed.
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether float32 matrix products or convolutions may use TF32 (recorded by benchmarks)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return "tf32" in (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    return bool(matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def pins_memory(device: torch.device) -> bool:
    """Whether data loaders feeding `device` should pin their batches (CUDA only)."""
    return device.type == "cuda"


def to_device(x: torch.Tensor, device: torch.device,
              memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """`x` on `device` in `memory_format`; asynchronous from pinned memory to a GPU."""
    return x.to(device, non_blocking=True, memory_format=memory_format)
