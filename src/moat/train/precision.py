"""Mixed precision: the autocast dtype a `precision` setting means on a device, the context
that applies it (training, evaluation and `moat eval` share both), and the gradient scaler
float16 training needs.

float16 runs on the CPU too (autocast and `torch.amp.GradScaler("cpu")`), through the same
code as on CUDA: that is how the loss-scaling path is tested without a GPU. It is slower
than bf16 or fp32 on most CPUs; use it there to test, not to train.
"""

from __future__ import annotations

import contextlib

import torch


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None = float32, no autocast)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler of float16 training on `device` (None for any other precision).

    It multiplies the loss before backward so that small float16 gradients do not flush to
    zero; a step whose unscaled gradients hold an inf or NaN is skipped (the weights and the
    optimiser state unchanged) and the scale halved; after 2000 good steps it doubles.
    """
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
