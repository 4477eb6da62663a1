"""Benchmarks with peers: throughput, latency, memory and multiply-adds of PyTorch models
(`pytorch.py`, `moat benchmark`) and of ONNX Runtime files, fp32 and int8
(`onnx_runtime.py`, `moat benchmark --runtime onnxruntime`). Nothing is imported here."""
