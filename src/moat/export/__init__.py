"""Deployment: a fused inference copy of a model, and exporters.

* `optimize_for_inference(model)`: BatchNorm folded, fused attention with precomputed
  position biases, channels-last where faster (see `moat.export.fused`);
* `export_onnx`, `export_torchscript`, `export_program` (torch.export .pt2): see
  `moat.export.formats`; `moat export FORMAT MODEL OUT` on the command line
  (`moat.export.pipeline`: `load_model`, `run_export`);
* ONNX Runtime: `moat.export.graph` (the module path its optimiser fuses),
  `moat.export.onnx_metadata` (what an ONNX file records, one owner),
  `moat.export.quantize` (static int8), `moat.export.ort` (sessions, `.onnx` as a model);
* ExecuTorch (XNNPACK): `moat.export.edge`.

Names below are imported on first use, so `import moat.export.onnx_metadata` stays cheap.
"""

from moat._lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_OPSET": "moat.export.formats", "SIZE_MULTIPLE": "moat.export.formats",
    "check_dynamic_size": "moat.export.formats", "check_onnx": "moat.export.formats",
    "export_onnx": "moat.export.formats", "export_program": "moat.export.formats",
    "export_torchscript": "moat.export.formats", "prepare_for_export": "moat.export.formats",
    "supports_dynamic_size": "moat.export.formats", "TANH_GELU_OPSET": "moat.export.formats",
    "is_optimized": "moat.export.fused", "optimize_for_inference": "moat.export.fused",
    "load_model": "moat.export.pipeline", "run_export": "moat.export.pipeline",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
