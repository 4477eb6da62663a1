"""`moat export FORMAT MODEL OUT` as a library function: the model to export (`load_model`,
from a name or a weights file) and the export in one of `FORMATS` (`run_export`), with the
preprocessing an ONNX file records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from moat.data.preprocessing import size_pair
from moat.errors import InvalidInputError
from moat.export.formats import (DEFAULT_OPSET, SIZE_MULTIPLE, check_dynamic_size, export_onnx,
                                 export_program, export_torchscript)
from moat.export.onnx_metadata import OnnxMetadata
from moat.atomic import atomic_output
from moat.models.config import MODEL_CONFIGS
from moat.weights.hub import is_hub_name

__all__ = ["FORMATS", "load_model", "run_export"]

FORMATS = ("onnx", "torchscript", "torch-export", "executorch")


def load_model(model: str, *, weights: str | os.PathLike | None = None,
               pretrained: bool = False, window_size: Sequence | None = None, global_attention_at_end: bool = False,
               pool_size: int | None = None, num_classes: int | None = None):
    """A model to export, from a variant / pretrained tag or from a weights file.

    `model` is a name (`moat_0`, `moat_0_no_pe`, `moat_0.in1k_224`; `weights` optionally
    loads a file into it) or a file that records its variant: a `.safetensors` file written
    by `moat convert` / `moat.weights.save_weights`, or a TensorFlow checkpoint.
    """
    import moat

    options = dict(window_size=window_size, global_attention_at_end=global_attention_at_end)
    if pool_size is not None:
        options["pool_size"] = pool_size
    path = Path(model)
    if path.exists() and not is_hub_name(model):
        if weights is not None:
            raise InvalidInputError(f"MODEL is already a weights file ({model}); drop --weights")
        name, classes = _variant_of_file(path)
        if num_classes is not None and classes is not None and num_classes != classes:
            raise InvalidInputError(f"{model} holds a {classes}-class classifier, not "
                                    f"{num_classes}")
        return moat.create_model(name, weights=path, num_classes=classes, **options).eval()
    if num_classes is not None:
        options["num_classes"] = num_classes
    return moat.create_model(model, weights=weights, pretrained=pretrained or None,
                             **options).eval()


def _variant_of_file(path: Path) -> tuple[str, int | None]:
    """(model name, classes) recorded in a weights file (None: not recorded, the file's head
    decides)."""
    from moat.weights.metadata import WeightsMetadata

    if path.suffix == ".safetensors":
        meta = WeightsMetadata.read(path)
        if meta.variant is None:
            raise InvalidInputError(f"{path} records no variant; pass the variant as MODEL "
                                    "and the file with --weights")
        return meta.model_name, meta.num_classes
    if path.suffix in (".pt", ".pth", ".bin", ".npz"):
        raise InvalidInputError(f"{path} does not record its variant; pass the variant as "
                                "MODEL and the file with --weights, e.g. `moat export onnx "
                                f"moat_0 out.onnx --weights {path}`")
    from moat.weights.info import checkpoint_info

    variant = checkpoint_info(path)["variant"]
    if isinstance(variant, str):
        raise InvalidInputError(f"{path}: {variant}")
    return variant.model_name, variant.num_classes


def _release_preprocessing(model) -> dict:
    """Crop, interpolation, mean and std of the model's weights (its pretrained_cfg), else
    of its variant's release (ImageNet's for a custom configuration)."""
    from moat.weights.catalogue import release
    from moat.weights.variant import model_variant

    name = model_variant(model).name
    config = {**release(name if name in MODEL_CONFIGS else "moat_0").data_config(),
              **(getattr(model, "pretrained_cfg", None) or {})}
    return {k: config[k] for k in ("crop_pct", "interpolation", "mean", "std")}


def run_export(model, fmt: str, out: str | os.PathLike, *,
               img_size: int | Sequence[int] | None = None, batch: int = 1,
               opset: int = DEFAULT_OPSET,
               check: bool = True, static_size: bool = False, dynamic_size: bool = False,
               layout: str = "onnxruntime", metadata: dict[str, str] | None = None,
               preprocessing: dict | None = None, gelu: str = "exact") -> str:
    """Export `model` in format `fmt` ("onnx", "torchscript", "torch-export"); a summary.

    `img_size` defaults to the variant's native resolution. ONNX: fixed height and width
    (position biases as constants, the fastest graph) unless `dynamic_size`, in the module
    path `layout` (see `moat.export.formats.LAYOUTS`). torch.export: dynamic height and
    width (multiples of 32) for a globally attending model unless `static_size`.
    TorchScript traces are always fixed-size. An ONNX file records `preprocessing`
    (input_size, crop_pct, interpolation, mean, std; default: the variant's release) and
    `metadata` in its metadata_props, for `moat quantize` and `moat eval`. `gelu` "tanh"
    (ONNX only): GELU's tanh approximation; measure its cost first (`moat.export.gelu`).
    """
    if gelu != "exact" and fmt != "onnx":
        raise InvalidInputError(f"--gelu {gelu} is offered for ONNX exports only, not {fmt}")
    if fmt not in FORMATS:
        raise InvalidInputError(f"format must be one of {FORMATS}, got {fmt!r}")
    size = size_pair(img_size or model.cfg.native_resolution)
    with atomic_output(out) as tmp:  # a failed export (or check) leaves no file behind
        return _export_to(model, fmt, tmp, out, size, batch=batch, opset=opset, check=check,
                          static_size=static_size, dynamic_size=dynamic_size, layout=layout,
                          metadata=metadata, preprocessing=preprocessing, gelu=gelu)


def _export_to(model, fmt: str, tmp: Path, out: str | os.PathLike, size: tuple[int, int], *,
               batch: int, opset: int, check: bool, static_size: bool, dynamic_size: bool,
               layout: str, metadata: dict[str, str] | None,
               preprocessing: dict | None, gelu: str = "exact") -> str:
    if fmt == "torchscript":
        export_torchscript(model, tmp, size, batch=batch)
        return (f"wrote {out}: TorchScript trace, dynamic batch, fixed {size[0]}x{size[1]}; "
                "load with torch.jit.load")
    if fmt == "executorch":
        from moat.export.edge import export_executorch

        report = export_executorch(model, tmp, size, batch=batch, check=check)
        return (f"wrote {out}: ExecuTorch program, XNNPACK delegate ({report['delegated_calls']} "
                f"delegated calls), batch {batch}, fixed {size[0]}x{size[1]}"
                + (f"; ExecuTorch runtime vs PyTorch: max abs error {report['max_abs_err']:.2e}"
                   if check else ""))
    if fmt == "onnx":
        dynamic = check_dynamic_size(model, size, dynamic_size)
    else:
        dynamic = check_dynamic_size(model, size, False if static_size else None)
    shape = (f"dynamic height/width (multiples of {SIZE_MULTIPLE}, traced at "
             f"{size[0]}x{size[1]})" if dynamic else f"fixed {size[0]}x{size[1]}")
    if fmt == "torch-export":
        export_program(model, tmp, size, batch=batch, dynamic_size=dynamic)
        return (f"wrote {out}: torch.export program, dynamic batch, {shape}; load with "
                "torch.export.load(path).module()")
    preprocessing = {**(preprocessing or _release_preprocessing(model)),
                     "input_size": (3, *size)}
    metadata = {**(metadata or {}), **OnnxMetadata(preprocessing=preprocessing).props()}
    report = export_onnx(model, tmp, size, opset=opset, batch=batch, dynamic_size=dynamic,
                         check=check, layout=layout, metadata=metadata, gelu=gelu)
    lines = [f"wrote {out}: ONNX opset {report['opset']}, dynamic batch, {shape}, "
             f"{layout} layout, {gelu} GELU"]
    lines += [f"  onnxruntime vs PyTorch, batch {r['batch']}, {r['img_size'][0]}x"
              f"{r['img_size'][1]}: max abs error {r['max_abs_err']:.2e}"
              for r in report.get("check", [])]
    return "\n".join(lines)
