"""FLOP counting: plain multiply-adds, or the official `moat_test.py` method.

"macs": multiply-adds of convolutions, linear layers and attention matmuls, the number
peers report (fvcore/timm convention).

"official": what the official FLOPs reproduce (docs/model_zoo.md §2): TF's profiler counts every
float op it has a formula for (matmuls and convolutions as 2 per multiply-add, but also
bias adds, batch-norm scale and shift, GELU's arithmetic, residual adds, ...), divides by 2,
and, because the test runs batch 8, includes one eighth of the batch-independent one-hot
einsums that re-index the relative position table. We count the same things on our graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from moat.errors import InvalidInputError
from moat.models.layers import Attention

_aten = torch.ops.aten
OFFICIAL_BATCH = 8  # the official count amortises batch-independent work over this batch


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # FlopCounterMode passes shapes


# torch counts the CUDA attention kernels but not the CPU flash kernel that
# scaled_dot_product_attention picks on CPU tensors (MOAT-0 would read 5.42, not 5.64 GMACs).
# Pass it as FlopCounterMode(custom_mapping=...) when counting any model.
CPU_ATTENTION_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu:
                       _cpu_flash_attention_flops}

# Float ops per output element that TF's profiler registers for the equivalent TF ops.
_ELEMENTWISE = {
    _aten.add.Tensor: 1, _aten.sub.Tensor: 1, _aten.mul.Tensor: 1, _aten.div.Tensor: 1,
    _aten.add.Scalar: 1, _aten.sub.Scalar: 1, _aten.mul.Scalar: 1, _aten.div.Scalar: 1,
    _aten.gelu.default: 4,  # 0.5 * x * (1 + erf(x / sqrt 2)): div, add, mul, mul
    _aten.silu.default: 1,  # x * sigmoid(x)
    _aten._native_batch_norm_legit_no_training.default: 2,  # x * scale + shift
    _aten.native_layer_norm.default: 2,
}


class _ElementwiseCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if func in _ELEMENTWISE:
            self.flops += _ELEMENTWISE[func] * first.numel()
        elif func is _aten.convolution.default and args[2] is not None:
            self.flops += first.numel()  # BiasAdd
        elif func is _aten.addmm.default:
            self.flops += first.numel()  # bias add after the einsum
        return out


def count_flops(model: nn.Module, img_size: tuple[int, int] | int, method: str = "official",
                batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass per image, attention included.

    `method="official"` reproduces the official FLOP counts (see module docstring);
    `method="macs"` counts convolutions, linear layers and attention matmuls only.
    Runs on the model's device: build large models on the meta device to count for free.
    """
    if method not in ("official", "macs"):
        raise InvalidInputError(f"method must be 'official' or 'macs', got {method!r}")
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    param = next(model.parameters())
    in_chans = model.stem.conv_0.in_channels
    x = torch.zeros(batch_size, in_chans, *img_size, device=param.device, dtype=param.dtype)
    lookups: list[tuple[int, int, int]] = []

    def record(block, args, output) -> None:
        attention = block.attention
        if attention.relative_position_embedding is not None:
            h, w = block.window or tuple(output.shape[-2:])
            lookups.append((attention.num_heads, h, w))

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(getattr(m, "attention", None), Attention)]
    was_training = model.training
    model.eval()
    elementwise = _ElementwiseCounter()
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter, \
                torch.no_grad():
            if method == "official":
                with elementwise:
                    model(x)
            else:
                model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    total = counter.get_total_flops() // 2
    if method == "macs":
        return total // batch_size
    # 'nhw,ixh->nixw' then 'nixw,jyw->nijxy' with one-hot tables of 2h-1 / 2w-1 entries.
    lookup = sum(n * h * h * (2 * h - 1) * (2 * w - 1) + n * h * h * w * w * (2 * w - 1)
                 for n, h, w in lookups)
    return (total + elementwise.flops // 2) // batch_size + lookup // OFFICIAL_BATCH
