"""Export a MOAT model: ONNX, TorchScript (trace) and torch.export programs (.pt2).

Every exporter starts from `prepare_for_export`: the `optimize_for_inference` copy (BatchNorm
folded, position biases precomputed for the window sizes known in advance) with every
input-dependent 'SAME' padding frozen for the export's input size (a zero-padded kernel and
symmetric padding), so that graphs hold no Pad operators.

Shapes:

* the batch is always dynamic;
* height and width are dynamic only with global attention everywhere (`dynamic_size`
  defaults to that), in multiples of 32 (each of the five stride-2 layers then sees an even
  size, so one graph fits all); with window attention they are fixed at `img_size` (the
  window layout depends on the feature-map size).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moat.data.preprocessing import size_pair
from moat.errors import InvalidInputError
from moat.export.cpu_ops import SamePaddingConv2d, portable_ops
from moat.export.fused import is_optimized, optimize_for_inference
from moat.export.graph import ATTENTION_OPSET, for_graph_runtime
from moat.export.onnx_metadata import OnnxMetadata
from moat.export.onnx_metadata import write as write_metadata
from moat.atomic import atomic_output
from moat.models.layers import same_padding
from moat.models.moat import MoatNet

__all__ = ["DEFAULT_OPSET", "LAYOUTS", "SIZE_MULTIPLE", "TANH_GELU_OPSET",
           "check_dynamic_size", "check_onnx",
           "downgrade_onnx_to_opset17", "export_onnx", "export_program", "export_torchscript",
           "prepare_for_export", "supports_dynamic_size"]

EXPORTER_OPSET = 18  # the torch.export-based exporter's first opset
DEFAULT_OPSET = 17  # the oldest opset the export writes (a downgrade of the exporter's)
SIZE_MULTIPLE = 32  # input sizes of a dynamic-size export: the network's total stride
# The module path an exporter traces: "pytorch", the `optimize_for_inference` model (what
# PyTorch runtimes run best); "onnxruntime", its NCHW, fusion-friendly spelling
# (`moat.export.graph`), which ONNX Runtime runs faster. The one switch between the two.
LAYOUTS = ("pytorch", "onnxruntime")


def supports_dynamic_size(model: MoatNet) -> bool:
    """True when every MOAT block attends globally (then any input size shares one graph)."""
    return all(getattr(block, "window", None) is None
               for stage in model.stages for block in stage)


def check_dynamic_size(model: MoatNet, img_size: tuple[int, int],
                       dynamic_size: bool | None) -> bool:
    """Whether the export's height/width are dynamic; None: whenever the model allows."""
    can = supports_dynamic_size(model)
    # Traced at one size (SIZE_MULTIPLE) the last feature map is 1x1 and torch.export
    # specialises the graph to it: the smallest size that traces a general graph is twice that.
    traceable = all(s % SIZE_MULTIPLE == 0 and s >= 2 * SIZE_MULTIPLE for s in img_size)
    if dynamic_size is None:
        dynamic_size = can and traceable
    if dynamic_size and not can:
        raise InvalidInputError("dynamic height/width needs global attention in every MOAT block; "
                                "with window attention the export has a fixed input size "
                                "(leave dynamic_size at None or False)")
    if dynamic_size and any(s % SIZE_MULTIPLE for s in img_size):
        raise InvalidInputError(f"a dynamic-size export is traced at a multiple of {SIZE_MULTIPLE} "
                                f"and serves multiples of {SIZE_MULTIPLE}; got img_size {img_size}")
    if dynamic_size and not traceable:
        raise InvalidInputError(f"a dynamic-size export is traced at {2 * SIZE_MULTIPLE} pixels or "
                                f"more (at {SIZE_MULTIPLE} the last feature map is 1x1 and the graph "
                                f"specialises to it); got img_size {img_size}: trace at e.g. 224")
    return dynamic_size


class _FrozenSameConv(nn.Conv2d):
    """A SamePaddingConv2d whose padded kernel was computed for one input parity."""


class _PaddedInputConv(nn.Conv2d):
    """TF 'SAME' as a constant Pad of the input and an unpadded convolution: ONNX Runtime's
    PadFusion turns the pair into one Conv with asymmetric pads, so the stride-2
    convolutions keep their 3x3 kernels (the padded-kernel form computes 4x4: 16/9 of the
    multiply-adds of a stride-2 depthwise convolution)."""

    def __init__(self, conv: nn.Conv2d, padding: tuple[int, int, int, int]) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         0, groups=conv.groups, bias=conv.bias is not None)
        self.weight, self.bias = conv.weight, conv.bias
        self.input_padding = padding  # F.pad order: left, right, top, bottom

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.input_padding))


def _freeze_padding(model: nn.Module, img_size: tuple[int, int], *,
                    pad_input: bool = False) -> None:
    """Replace every SamePaddingConv2d by a plain convolution for this input size (with
    `pad_input`, by a Pad of the input and an unpadded convolution)."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, SamePaddingConv2d)}
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in convs.items()]
    try:  # without oneDNN's fused calls, which bypass the convolution modules
        with torch.no_grad(), portable_ops():
            param = next(model.parameters())
            model(torch.zeros(1, _in_chans(model), *img_size, device=param.device,
                              dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    for name, conv in convs.items():
        parent, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent) if parent else model
        if pad_input:
            (top, bottom), (left, right) = (same_padding(n, k, s) for n, k, s in
                                            zip(seen[name], conv.kernel_size, conv.stride))
            setattr(parent, attr, _PaddedInputConv(conv, (left, right, top, bottom)))
            continue
        weight, padding = conv.weight_and_padding(*seen[name])
        frozen = _FrozenSameConv(conv.in_channels, conv.out_channels, weight.shape[-2:],
                                 conv.stride, padding, groups=conv.groups,
                                 bias=conv.bias is not None)
        frozen.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        frozen.bias = conv.bias
        setattr(parent, attr, frozen)


def prepare_for_export(model: nn.Module, img_size: int | Sequence[int], *,
                       dynamic_size: bool | None = None, channels_last: bool = False,
                       layout: str = "pytorch", gelu: str = "exact",
                       attention_op: bool = False) -> tuple[MoatNet, bool]:
    """The model to hand to an exporter, and whether its height/width may vary.

    Returns an eval-mode, fused copy in the module path `layout` (see `LAYOUTS`): `model`
    itself is not changed. `gelu`: see `optimize_for_inference`. `attention_op` (layout
    "onnxruntime"): attention as one `moat.export.graph.token_attention` call.
    """
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(model, MoatNet):
        raise TypeError(f"expected a MoatNet, got {type(model).__name__}")
    if is_optimized(model):
        raise InvalidInputError("pass the plain model: the exporter optimises a copy itself")
    size = size_pair(img_size)
    dynamic = check_dynamic_size(model, size, dynamic_size)
    fused = optimize_for_inference(model, channels_last=channels_last,
                                   img_size=None if dynamic else size, gelu=gelu)
    _freeze_padding(fused, size, pad_input=layout == "onnxruntime")
    return (for_graph_runtime(fused, attention_op) if layout == "onnxruntime" else fused), dynamic


def _in_chans(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def _example(model: nn.Module, img_size: tuple[int, int], batch: int) -> Tensor:
    param = next(model.parameters())
    return torch.randn(batch, _in_chans(model), *img_size,
                       generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)


def _output_names(model: MoatNet) -> list[str]:
    from moat.models.moat import ENDPOINTS

    if model.features_only:
        return [ENDPOINTS[i] for i in model.out_indices]
    return ["logits" if model.num_classes else "features"]


def _dynamic_shapes(dynamic_size: bool, img_size: tuple[int, int]) -> dict:
    from torch.export import Dim

    shapes = {0: Dim("batch", min=1, max=4096)}
    if dynamic_size:
        # H = 32 * h: every stride-2 layer sees an even size, so 'SAME' padding is fixed.
        h = Dim("h32", min=1, max=max(256, img_size[0] // SIZE_MULTIPLE))
        w = Dim("w32", min=1, max=max(256, img_size[1] // SIZE_MULTIPLE))
        shapes.update({2: SIZE_MULTIPLE * h, 3: SIZE_MULTIPLE * w})
    return {"x": shapes}


# --- torch.export ------------------------------------------------------------------------

def export_program(model: nn.Module, path: str | os.PathLike, img_size: int | Sequence[int], *,
                   batch: int = 2, dynamic_size: bool | None = None):
    """`torch.export` the fused model to a .pt2 file; returns the ExportedProgram.

    Load it with `torch.export.load(path).module()`.
    """
    program, _ = _export(model, size_pair(img_size), batch, dynamic_size)
    torch.export.save(program, os.fspath(path))
    return program


def _export(model: nn.Module, size: tuple[int, int], batch: int, dynamic_size: bool | None,
            layout: str = "pytorch", gelu: str = "exact", attention_op: bool = False):
    fused, dynamic = prepare_for_export(model, size, dynamic_size=dynamic_size, layout=layout,
                                        gelu=gelu, attention_op=attention_op)
    example = _example(fused, size, max(batch, 2))  # batch 1 would be specialised
    with torch.no_grad():
        program = torch.export.export(fused, (example,),
                                      dynamic_shapes=_dynamic_shapes(dynamic, size))
    return program, dynamic


# --- TorchScript -------------------------------------------------------------------------

def export_torchscript(model: nn.Module, path: str | os.PathLike,
                       img_size: int | Sequence[int], *, batch: int = 1) -> torch.jit.ScriptModule:
    """Trace the fused model with TorchScript; returns the traced module.

    The trace has a dynamic batch but a fixed input size (a trace records the shape
    arithmetic of this size as constants). Load it with `torch.jit.load(path)`.
    """
    size = size_pair(img_size)
    fused, _ = prepare_for_export(model, size, dynamic_size=False, channels_last=False)
    example = _example(fused, size, batch)
    with torch.no_grad(), warnings.catch_warnings():
        # The trace freezes this size's shape arithmetic, as documented: no need to warn.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fused, example, check_trace=False)
    traced.save(os.fspath(path))
    return traced


# --- ONNX ----------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int | Sequence[int], *,
                opset: int = DEFAULT_OPSET, batch: int = 1, dynamic_size: bool | None = False,
                check: bool = True, check_batches: Sequence[int] = (1, 8),
                atol: float = 1e-4, program=None, layout: str = "onnxruntime",
                metadata: dict[str, str] | None = None, gelu: str = "exact") -> dict:
    """Export to ONNX (dynamic batch; fixed height/width unless `dynamic_size`).

    A fixed size (the default) holds every position bias as a constant; `dynamic_size`
    True (or None: whenever the model allows, i.e. global attention) computes the biases
    from their tables in the graph, for any multiple of 32. `layout` "onnxruntime" (the
    default) exports the module path of `moat.export.graph`, which ONNX Runtime runs
    fastest; "pytorch" the `optimize_for_inference` model as it is.

    Uses the torch.export-based ("dynamo") exporter: it records the relative position
    bias as a function of the input size, so a dynamic-size graph is correct at every size
    (the TorchScript-based exporter would freeze the traced size's bias into the graph).
    With `check`, runs the file in onnxruntime at batch sizes `check_batches` (and, for a
    dynamic-size graph, also at a second input size) and compares with PyTorch within
    `atol`; raises if it does not match. `program`: the ExportedProgram that
    `export_program` returned for the same model, size and `dynamic_size` (saves tracing
    the model a second time; it holds the "pytorch" layout, so pass that `layout` too).
    `metadata`: string entries for the file's metadata_props
    (`moat export onnx` records the preprocessing, see `moat.export.onnx_metadata`); the
    GELU form is always recorded (`OnnxMetadata.gelu`). `gelu` "tanh": GELU's tanh
    approximation (see `optimize_for_inference`), written as ONNX's Gelu(approximate="tanh"),
    so at opset 20 at least (TANH_GELU_OPSET); the check then compares with the tanh model
    in PyTorch
    (`moat.export.gelu` measures what the approximation itself changes). From opset 23
    (ATTENTION_OPSET) the "onnxruntime" layout writes each attention as ONNX's Attention
    operator, which ONNX Runtime runs faster (`moat.export.graph`). Returns a report dict.
    """
    size = size_pair(img_size)
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not DEFAULT_OPSET <= opset <= newest:
        raise InvalidInputError(f"opset {opset} is not supported: use 17 (default) to {newest} "
                                f"(the newest this onnx {onnx.__version__} knows)")
    path = Path(path)
    if gelu == "tanh":
        opset = max(opset, TANH_GELU_OPSET)
    attention_op = layout == "onnxruntime" and opset >= ATTENTION_OPSET
    if program is None:
        program, dynamic = _export(model, size, batch, dynamic_size, layout, gelu, attention_op)
    elif layout != "pytorch" or gelu != "exact":
        raise InvalidInputError("`program` (from export_program) holds the 'pytorch' layout with "
                                "the exact GELU: pass layout='pytorch' with it, or leave program out")
    else:
        dynamic = check_dynamic_size(model, size, dynamic_size)
    with atomic_output(path) as tmp:  # `path` appears once written and checked, or not at all
        with torch.no_grad():
            torch.onnx.export(program, (), os.fspath(tmp), dynamo=True,
                              opset_version=max(opset, EXPORTER_OPSET), input_names=["x"],
                              output_names=_output_names(model), external_data=False,
                              verbose=False, custom_translation_table=_translations())
        if opset == 17:
            downgrade_onnx_to_opset17(tmp)
        write_metadata(tmp, {**(metadata or {}), **OnnxMetadata(gelu=gelu).props()})
        report = {"path": str(path), "opset": _onnx_opset(tmp), "dynamic_batch": True,
                  "dynamic_size": dynamic, "img_size": size}
        if check:
            sizes = [size] + ([_other_size(size)] if dynamic else [])
            reference = model if gelu == "exact" else optimize_for_inference(
                model, gelu=gelu, channels_last=False)
            report["check"] = check_onnx(tmp, reference, sizes, check_batches, atol)
    return report


def _translations() -> dict:
    """ONNX for moat's own operators: `token_attention` as ONNX's Attention (opset 23)."""
    from onnxscript import opset23 as op

    def attention(q, k, v, bias, num_heads: int):
        return op.Attention(q, k, v, bias, q_num_heads=num_heads, kv_num_heads=num_heads,
                            scale=1.0)[0]  # Y; the optional present key / value unused

    return {torch.ops.moat.token_attention.default: attention}


# ONNX's Gelu operator (with approximate="tanh") arrived in opset 20. A tanh GELU is exported
# as that one operator: ONNX Runtime runs it in its blocked NCHWc layout like its fused exact
# Gelu, where its contrib FastGelu (and the decomposed formula) cost a layout reorder on
# either side (tiny-MOAT-0: 37 ReorderInput against 13).
TANH_GELU_OPSET = 20


# Operators whose axes became an input in opset 18 (ReduceSum already in 13).
_REDUCE_AXES_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                   "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare"}
# Changed or added in opset 18 in ways this downgrade does not rewrite.
_NEW_IN_18 = {"Pad", "Split", "ScatterElements", "ScatterND", "LpPool", "Col2Im",
              "CenterCropPad", "GroupNormalization", "Mish", "BitwiseAnd", "BitwiseOr",
              "BitwiseXor", "BitwiseNot", "OptionalHasElement", "OptionalGetElement"}


def downgrade_onnx_to_opset17(path: str | os.PathLike) -> None:
    """Rewrite an opset-18 file as opset 17, in place.

    The torch.export-based exporter emits opset 18 at least, and onnx's version converter
    cannot take this graph down (its Reduce* adapter fails). The only opset-18 changes a
    MOAT graph uses are Reduce* taking `axes` as an input (back to an attribute) and
    Resize's new attributes (dropped: they hold their defaults). Anything else is refused.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(os.fspath(path))
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _NEW_IN_18:
            raise InvalidInputError(f"cannot write opset 17: the graph uses {node.op_type}, which "
                                    "changed in opset 18; export with opset 18")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in _REDUCE_AXES_18:
            if attrs.pop("noop_with_empty_axes", 0):
                raise InvalidInputError(f"cannot write opset 17: {node.name} reduces nothing")
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in constants:
                    raise InvalidInputError(f"cannot write opset 17: {node.name} has computed axes")
                attrs["axes"] = [int(a) for a in constants[node.input[1]].reshape(-1)]
            del node.input[1:]
        elif node.op_type == "Resize":
            defaults = {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"}
            if "axes" in attrs or any(attrs.pop(k, v) != v for k, v in defaults.items()):
                raise InvalidInputError(f"cannot write opset 17: {node.name} uses Resize-18 "
                                        f"options")
        else:
            continue
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in sorted(attrs.items()))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 17
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, os.fspath(path))


def _other_size(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] + SIZE_MULTIPLE, size[1] + 2 * SIZE_MULTIPLE


def _onnx_opset(path: Path) -> int:
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def check_onnx(path: str | os.PathLike, model: nn.Module,
               sizes: Sequence[tuple[int, int]], batches: Sequence[int] = (1, 8),
               atol: float = 1e-4) -> list[dict]:
    """Run an exported file in onnxruntime and compare with `model` (eval) in PyTorch."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    was_training = model.training
    model.eval()
    results = []
    try:
        for size in sizes:
            for batch in batches:
                x = _example(model, size, batch).float()
                with torch.no_grad():
                    expected = model(x)
                expected = [expected] if isinstance(expected, Tensor) else list(expected)
                got = session.run(None, {name: x.cpu().numpy()})
                error = max(float(np.abs(g - e.cpu().numpy()).max())
                            for g, e in zip(got, expected))
                results.append({"img_size": tuple(size), "batch": batch, "max_abs_err": error})
                if not error <= atol:
                    raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {error:.2e} "
                                       f"(> {atol:g}) at batch {batch}, size {size}")
    finally:
        model.train(was_training)
    return results
