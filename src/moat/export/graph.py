"""The module path of an ONNX export for ONNX Runtime: `for_graph_runtime(fused)`.

`optimize_for_inference` shapes a model for eager PyTorch on CPU: channels-last, oneDNN's
fused convolution + GELU calls, attention projections as 1x1 convolutions. In an ONNX
graph those choices cost time: ONNX Runtime runs convolutions in NCHW (blocked NCHWc on
x86), so every channels-last view becomes a Transpose, and a projection written as a
1x1 convolution becomes two Transposes around a blocked convolution with layout reorders
around it. This path writes the same function the way ONNX Runtime's optimiser and
kernels want it (measured with `moat benchmark --runtime onnxruntime`):

* NCHW convolutions (BatchNorm folded, 'SAME' padding frozen by the exporter);
* GELU spelled `(x * 0.5) * (1 + erf(x / sqrt(2)))`, the pattern ONNX Runtime's GeluFusion
  replaces by one Gelu kernel (PyTorch's exporter spells it in an order that is not fused:
  five element-wise passes over the widest tensors of the network);
* the tanh GELU (`optimize_for_inference(..., gelu="tanh")`) as `F.gelu(x, approximate="tanh")`,
  which the exporter writes as ONNX's one Gelu(approximate="tanh") operator (opset 20):
  ONNX Runtime keeps it in its NCHWc layout, unlike its FastGelu or the decomposed formula;
* attention as plain matrix products on [B, T, C] tokens: one Transpose into tokens and one
  back per block (the residual added on tokens), plus the head split and merge; the 1/sqrt(d) scale is folded into the
  query weights; the position bias is a constant for every size known at export time;
* LayerNorm as LayerNormalization on the token view (no transposes of its own);
* from opset 23 (`ATTENTION_OPSET`, `attention_op=True`), each attention as ONNX's one
  Attention operator on [N, T, heads x K] tokens (`token_attention`): ONNX Runtime then splits
  the heads, adds the position bias and takes the softmax inside its kernel, with no
  Transpose of q, k, v or of the output and the projections as Gemm (tiny-MOAT-0's
  stage-3 attention at batch 1: 0.92 -> 0.71 ms).

The copy computes the same function as the model (within float rounding). It is for
exporting only; eager PyTorch is faster with `optimize_for_inference` alone.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moat.errors import InvalidInputError
from moat.export.cpu_ops import ConvGelu
from moat.export.fused import FusedMBConv, FusedMoatBlock, InferenceAttention, is_optimized
from moat.models.blocks import MBConvShortcut
from moat.models.layers import window_attention
from moat.models.moat import MoatNet

__all__ = ["ATTENTION_OPSET", "GraphGelu", "for_graph_runtime", "graph_gelu", "token_attention"]

_SQRT_2 = math.sqrt(2.0)
ATTENTION_OPSET = 23  # ONNX's Attention operator (with 3-D inputs and a float mask)


@torch.library.custom_op("moat::token_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor? bias, int num_heads) "
                         "-> Tensor")
def token_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                    num_heads: int) -> Tensor:
    """softmax(q k^T + bias) v per head, on tokens [N, T, heads x K] (q already scaled).

    One operator in a traced graph, so the ONNX export writes it as ONNX's Attention
    (`moat.export.formats`, opset 23); here it runs as scaled_dot_product_attention.
    """
    n, tokens, inner = q.shape

    def heads(x: Tensor) -> Tensor:
        return x.view(n, tokens, num_heads, inner // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), bias, scale=1.0)
    return out.transpose(1, 2).reshape(n, tokens, inner)


@token_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, num_heads: int) -> Tensor:
    return torch.empty_like(q)


def graph_gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """Exact (erf) GELU in the operator order ONNX Runtime fuses into one Gelu kernel; the
    tanh form as the aten.gelu call that the ONNX export (opset 20) writes as one Gelu."""
    if approximate == "tanh":
        return F.gelu(x, approximate="tanh")
    return (x * 0.5) * (torch.erf(x / _SQRT_2) + 1.0)


class GraphGelu(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return graph_gelu(x, self.approximate)


class GraphMBConv(MBConvShortcut, nn.Module):
    """A `FusedMBConv` (same modules, same parameter names) in plain NCHW operators."""

    def __init__(self, fused: FusedMBConv) -> None:
        super().__init__()
        self.approximate = fused.approximate
        self.stride, self.pool_size = fused.stride, fused.pool_size
        self.shortcut_conv = fused.shortcut_conv
        self.expand_conv, self.depthwise_conv = fused.expand_conv, fused.depthwise_conv
        self.se, self.shrink_conv = fused.se, fused.shrink_conv

    def forward(self, x: Tensor) -> Tensor:
        y = graph_gelu(self.expand_conv(x), self.approximate)
        y = graph_gelu(self.depthwise_conv(y), self.approximate)
        if self.se is not None:
            y = self.se(y)
        return self.shortcut(x) + self.shrink_conv(y)


class GraphAttention(InferenceAttention):
    """`InferenceAttention` as matrix products on tokens, the query scale in its weights."""

    def __init__(self, fused: InferenceAttention, attention_op: bool = False) -> None:
        super().__init__(fused)
        self.attention_op = attention_op  # one token_attention call (ONNX Attention)
        for name in fused._precomputed.values():
            self.register_buffer(name, getattr(fused, name), persistent=False)
        self._precomputed = dict(fused._precomputed)
        inner = self.num_heads * self.head_size
        with torch.no_grad():  # q = x Wq^T + bq, times head_size^-0.5: fold the scale
            self.qkv.weight[:inner] *= self.head_size ** -0.5
            self.qkv.bias[:inner] *= self.head_size ** -0.5
        self.requires_grad_(False)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x: [B, windows, T, C], bias: [1, heads, T, T] or None -> [B, windows, T, C]."""
        batch, windows, tokens, _ = x.shape
        if self.attention_op:  # 2-D projections: ONNX Runtime fuses MatMul + Add into Gemm
            qkv = self.qkv(x.reshape(batch * windows * tokens, -1))
            q, k, v = qkv.view(batch * windows, tokens, -1).chunk(3, -1)
            out = token_attention(q, k, v, None if bias is None else bias.to(q.dtype),
                                  self.num_heads)
            return self.proj(out.reshape(q.shape[0] * tokens, -1)).view(batch, windows,
                                                                        tokens, -1)
        qkv = self.qkv(x).view(batch * windows, tokens, 3, self.num_heads, self.head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*windows, heads, T, K]
        scores = q @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, windows, tokens, -1))


class GraphMoatBlock(GraphMBConv):
    """A `FusedMoatBlock` in plain operators: NCHW MBConv, then attention on tokens."""

    def __init__(self, fused: FusedMoatBlock, attention_op: bool = False) -> None:
        super().__init__(fused)
        self.window = fused.window
        self.attention_norm = fused.attention_norm
        self.attention = GraphAttention(fused.attention, attention_op)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x).permute(0, 2, 3, 1)  # [B, H, W, C]: one Transpose
        window = self.window or tuple(x.shape[1:3])
        # The residual is added to the token view, so one Transpose leads back to NCHW
        # (ONNX Runtime folds both into its layout reorders around the convolutions).
        x = x + window_attention(self.attention, self.attention_norm(x), window)
        return x.permute(0, 3, 1, 2)


def for_graph_runtime(fused: MoatNet, attention_op: bool = False) -> MoatNet:
    """A copy of an `optimize_for_inference` model in the module path above; `attention_op`:
    attention as `token_attention` (for an ONNX export at ATTENTION_OPSET or later)."""
    if not is_optimized(fused):
        raise InvalidInputError("for_graph_runtime takes a model from optimize_for_inference")
    graph = copy.deepcopy(fused).to(memory_format=torch.contiguous_format)
    stem = graph.stem
    if isinstance(stem.conv_0, ConvGelu):
        stem.conv_0, stem.act_0 = stem.conv_0[0], GraphGelu(stem.conv_0.approximate)
    for stage in graph.stages:
        for index, block in enumerate(stage):
            stage[index] = (GraphMoatBlock(block, attention_op)
                            if isinstance(block, FusedMoatBlock) else GraphMBConv(block))
    return graph
