"""Static int8 quantization of an exported ONNX file with ONNX Runtime (`moat quantize`).

`quantize_onnx(model, out, calibration_dir)`: activations are calibrated on real images
(the file's own preprocessing, see `moat.export.onnx_metadata`), weights are quantized per output
channel, and the result is a QDQ graph (QuantizeLinear/DequantizeLinear pairs around each
quantized operator) that ONNX Runtime runs as int8 kernels on CPU. Convolutions and matrix
products are quantized; GELU, LayerNorm and Softmax stay float (ONNX Runtime has no exact
int8 kernels for them), fused by ONNX Runtime before quantizing (`_fuse_for_quantization`).
Activations are uint8, weights int8 with `reduce_range` (7-bit
weights): x86 CPUs without VNNI multiply u8 x s8 pairs into a saturating 16-bit sum, which
7-bit weights keep from overflowing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moat.data.folders import walk_files
from moat.data.images import IMAGE_SUFFIXES, BadImageError, load_rgb
from moat.errors import InvalidInputError
from moat.export.onnx_metadata import copy_metadata, read_preprocessing

__all__ = ["calibration_batches", "quantize_onnx", "read_preprocessing"]


def calibration_batches(folder: str | os.PathLike, preprocessing: dict, *,
                        max_images: int = 256, batch: int = 8,
                        skipped: dict[str, str] | None = None) -> Iterator[np.ndarray]:
    """Preprocessed float32 NCHW batches of the images under `folder` (sorted, at most
    `max_images` readable ones). Files that are not readable images are skipped as training
    skips them (`moat.data.images.load_rgb`): each is added to `skipped` {path: reason}."""
    import torch

    from moat.data.transforms import eval_transform

    if max_images < 1:
        raise InvalidInputError(f"--max-images must be >= 1, got {max_images}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {str(folder)!r} does not exist"
                                + (" (it is a file, not a folder)" if folder.exists() else ""))
    files, unreadable = walk_files(folder, IMAGE_SUFFIXES)
    skipped = {} if skipped is None else skipped
    skipped.update({s.path: s.reason for s in unreadable})
    if not files:
        raise InvalidInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}: "
                                "calibration needs a few hundred images like those the model "
                                "will see")
    transform = eval_transform(tuple(preprocessing["input_size"][-2:]),
                               mean=preprocessing["mean"], std=preprocessing["std"],
                               interpolation=preprocessing["interpolation"],
                               crop_pct=preprocessing["crop_pct"])
    images, used = [], 0
    for file in files:
        if used == max_images:
            break
        try:
            images.append(transform(load_rgb(file)))
        except BadImageError as err:
            skipped[file] = str(err)
            continue
        used += 1
        if len(images) == batch:
            yield torch.stack(images).numpy()
            images = []
    if images:
        yield torch.stack(images).numpy()
    if used == 0:
        raise InvalidInputError(f"none of the {len(files)} image file(s) under {folder} could "
                                f"be read (e.g. {skipped[files[0]]})")


def quantize_onnx(model: str | os.PathLike, out: str | os.PathLike,
                  calibration: str | os.PathLike, *, max_images: int = 256,
                  img_size: tuple[int, int] | None = None) -> dict:
    """Static int8 (QDQ, per-channel weights) copy of `model`, calibrated on the images in
    the folder `calibration`; written atomically to `out`. Returns a summary dict (with
    `skipped`: {path: reason} of the files that are not readable images)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    model, out = Path(model), Path(out)
    if max_images < 1:
        raise InvalidInputError(f"--max-images must be >= 1, got {max_images}")
    if not model.is_file():
        raise FileNotFoundError(f"ONNX file {str(model)!r} "
                                + ("is not a regular file" if model.exists() else
                                   "does not exist"))
    if model.resolve() == out.resolve():
        raise InvalidInputError("OUT must differ from MODEL: quantization never overwrites its "
                                "input")
    preprocessing = read_preprocessing(model, img_size)
    if img_size is not None:
        preprocessing["input_size"] = (3, *img_size)
    skipped: dict[str, str] = {}
    batches = calibration_batches(calibration, preprocessing, max_images=max_images,
                                  skipped=skipped)
    import onnx

    input_name = onnx.load(os.fspath(model), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.count = 0

        def get_next(self):
            x = next(batches, None)
            if x is None:
                return None
            self.count += len(x)
            return {input_name: x}

    reader = Reader()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prepared, written = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        _fuse_for_quantization(model, prepared)
        quantize_static(os.fspath(prepared), os.fspath(written), reader,
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        calibrate_method=CalibrationMethod.MinMax)
        copy_metadata(model, written, quantization="int8 static QDQ, per-channel weights")
        os.replace(written, out)
    return {"path": str(out), "calibration_images": reader.count, "skipped": skipped}


def _fuse_for_quantization(model: Path, out: Path) -> None:
    """ONNX Runtime's own fusions (GELU, LayerNorm, ...) applied before quantizing.

    Quantizing the exported graph as it is leaves GELU as five element-wise operators with
    Quantize/Dequantize pairs around them, which ONNX Runtime then no longer fuses
    (tiny-MOAT-0: Div, Erf and Mul took 37% of the int8 run). Quantizing the graph after
    ONNX Runtime's extended optimisations keeps one Gelu kernel per GELU. The result uses
    ONNX Runtime's contrib operators, like every int8 file its quantizer writes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = os.fspath(out)
    ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])

