"""Benchmarks with peers: throughput, latency, memory and multiply-adds of PyTorch models
(`pytorch.py`, `moat benchmark`) and of ONNX Runtime files, fp32 and int8
(`onnx_runtime.py`, `moat benchmark --runtime onnxruntime`), of the same models
(`models.py`: MOAT and timm's peers, their parameters and multiply-adds), reported alike
(`report.py`: the environment, a table, CSV). Nothing is imported here."""
