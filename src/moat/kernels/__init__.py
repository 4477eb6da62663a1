"""Two C++ kernels for what eager PyTorch on a CPU is missing in MOAT's MBConv blocks.

* `batch_norm_gelu` (training): MOAT's MBConv blocks apply BatchNorm then GELU to their
  widest activations (384 channels at 112x112 in MOAT-0's first block). In training, eager
  PyTorch makes seven memory-bound passes over each of those tensors (eight with the padding
  of the next convolution) and keeps two of them for backward; the fused kernel
  (`batch_norm_gelu.cpp`) makes four and keeps one.
* `expand_depthwise` (inference): GELU(depthwise(GELU(expand(x)))) of a folded MBConv
  block in bands of rows, so that the 4x-expanded map never goes to memory and back
  (`expand_depthwise.cpp`; `moat.export.cpu_ops.expand_depthwise` decides where it runs).

Everywhere else, and whenever they cannot run, PyTorch's ops do the same computation.

The kernels are compiled on first use with `torch.utils.cpp_extension` (a C++ compiler and
ninja, once each, about 30 s; cached in PyTorch's extension folder under a name that hashes
the sources and the PyTorch installation, so that virtual environments do not rebuild each
other's). Without them moat warns once and uses PyTorch's ops. `MOAT_FUSED_KERNELS=0`
turns both off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# The flags ATen compiles its own vectorised CPU kernels with, per capability.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _import_cpp_extension():
    # Its import warns when no CUDA runtime is found: irrelevant for a CPU kernel.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _load(cpp_extension, name: str, **kwargs) -> ModuleType:
    """`cpp_extension.load` under a build lock of our own.

    PyTorch's own build lock is a plain file (`lock` in the build folder): a compile killed
    half-way leaves it behind, and every later process then waits for it forever (seen here
    when a training run was killed during its first build). An flock is released by the
    operating system when its holder dies, so while we hold ours no live moat process is
    building, and a plain lock file still there is such a leftover: it is removed."""
    import fcntl  # POSIX only; imported here so that `import moat` works everywhere

    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    with open(build_dir / "moat-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process building: wait for it
        leftover = build_dir / "lock"
        if leftover.exists():
            log.warning("removing %s, left behind by an interrupted build", leftover)
            leftover.unlink(missing_ok=True)
        return cpp_extension.load(name=name, **kwargs)


_HERE = Path(__file__).parent
_WHAT_FALLS_BACK = {"batch_norm_gelu": "training uses the unfused PyTorch ops",
                    "expand_depthwise": "inference runs oneDNN's separate convolutions"}


def build_name(kernel: str) -> str:
    """The name `kernel` (a .cpp file here) is built under for this CPU capability. PyTorch
    rebuilds when the .cpp changes, not a header it includes, so the name hashes both; and it
    rebuilds whenever another PyTorch installation (another virtual environment) built the
    same name last, so the name hashes the installation's folder too: each keeps its build."""
    capability = torch.backends.cpu.get_cpu_capability()
    digest = hashlib.sha256((_HERE / f"{kernel}.cpp").read_bytes()
                            + (_HERE / "gelu.h").read_bytes()
                            + str(Path(torch.__file__).resolve().parent).encode()).hexdigest()
    return f"moat_{kernel}_{capability.lower()}_{digest[:10]}"


def _build(kernel: str) -> ModuleType | None:
    """The compiled `kernel`, or None (turned off, or it cannot be built)."""
    if os.environ.get("MOAT_FUSED_KERNELS", "1") == "0":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability)
    defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"] \
        if flags else ["-DCPU_CAPABILITY=DEFAULT"]
    log.info("loading the fused %s kernel for %s (the first time on a machine it is "
             "compiled, about a minute)", kernel, capability)
    try:
        cpp_extension = _import_cpp_extension()
        return _load(cpp_extension, name=build_name(kernel),
                     sources=[str(_HERE / f"{kernel}.cpp")],
                     extra_cflags=["-O3", "-fopenmp", *defines, *(flags or [])])
    except Exception as error:  # no compiler, no headers, ...: same results, just slower
        warnings.warn(f"moat: the fused {kernel} kernel could not be built ({error}); "
                      f"{_WHAT_FALLS_BACK[kernel]}, which are slower. It needs a C++ compiler "
                      "and ninja (`pip install ninja`) on the PATH", stacklevel=3)
        return None


@functools.cache
def extension() -> ModuleType | None:
    """The compiled BatchNorm+GELU training kernel, or None."""
    return _build("batch_norm_gelu")


@functools.cache
def expand_depthwise_extension() -> ModuleType | None:
    """The compiled expand + depthwise inference kernel, or None."""
    return _build("expand_depthwise")


class _BatchNormGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                pad: tuple[int, int, int, int]):
        out, mean, var, invstd = extension().forward(x, weight, bias, eps, list(pad))
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.pad = pad
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out: Tensor, _mean: None, _var: None):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        left, _, top, _ = ctx.pad
        grad_out = grad_out[:, :, top:top + x.shape[2], left:left + x.shape[3]]
        if grad_out.stride(1) != 1:
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x, grad_weight, grad_bias = extension().backward(grad_out, x, weight, bias,
                                                              mean, invstd)
        return grad_x, grad_weight, grad_bias, None, None


def _fusable(norm: nn.Module, x: Tensor) -> bool:
    # Exactly BatchNorm2d (not SyncBatchNorm: its statistics span processes), in training
    # mode with running statistics and an exponential average, on float32 channels-last CPU
    # tensors, in eager mode (compilers and exporters see the plain ops).
    return (type(norm) is nn.BatchNorm2d and norm.training and norm.affine
            and norm.track_running_stats and norm.momentum is not None
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.stride(1) == 1 and x.shape[1] > 1
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.is_autocast_enabled("cpu")
            and extension() is not None)


def batch_norm_gelu(norm: nn.BatchNorm2d, x: Tensor,
                    pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Tensor:
    """F.pad(F.gelu(norm(x)), pad), fused on CPU in training mode (running statistics
    updated alike). `pad` is F.pad's (left, right, top, bottom)."""
    if not _fusable(norm, x):
        y = F.gelu(norm(x))
        return F.pad(y, pad) if any(pad) else y
    out, mean, var = _BatchNormGELU.apply(x, norm.weight, norm.bias, norm.eps, pad)
    with torch.no_grad():
        count = x.numel() // x.shape[1]
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * (count / (count - 1)), norm.momentum)
        norm.num_batches_tracked.add_(1)
    return out
