"""Parity with the official implementation: the reference cases in ../shared/reference (an input,
the official logits and endpoints, the model options), run through MoatNet on any device and
precision. The tests (tests/test_models.py) and benchmarks/gpu.py share it.

A case file `case_*.npz` holds `input` [B, H, W, 3] (NHWC, as TensorFlow), `logits`,
the endpoints `stage1`..`stage5` (NHWC) and `config_json` (window_size, pool_size).
The weights are `tiny_moat0_weights.npz`, under their official names.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from moat.models.factory import create_model
from moat.models.moat import ENDPOINTS, MoatNet
from moat.weights.official import load_official_weights

# fp32 parity: the tolerances of the official comparison (logits absolute; endpoints
# absolute + relative to their larger magnitudes)
LOGITS_ATOL = 1e-4
ENDPOINT_ATOL, ENDPOINT_RTOL = 1e-4, 1e-5


def load_reference_case(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of a reference case file and its model options (config_json)."""
    case = np.load(path)
    return {k: case[k] for k in case.files}, json.loads(str(case["config_json"]))


def reference_model(weights: str | os.PathLike | dict, config: dict) -> MoatNet:
    """tiny-MOAT-0 with the reference weights and a case's attention layout, in eval mode."""
    model = create_model("tiny_moat_0", window_size=config.get("window_size"),
                         pool_size=config.get("pool_size", 2)).eval()
    if not isinstance(weights, dict):
        weights = dict(np.load(weights))
    return load_official_weights(model, weights)


def deviations(model: MoatNet, case: dict[str, np.ndarray], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> dict[str, float]:
    """Max |ours - official| of the logits and of each endpoint (float32 weights; `dtype`
    autocasts the forward pass), and `within_fp32_tolerance`: whether all are within the
    fp32 parity tolerances above."""
    device = torch.device(device)
    model = model.to(device)
    x = torch.from_numpy(case["input"]).permute(0, 3, 1, 2).to(device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:
        logits = model(x).float().cpu().numpy()
        endpoints = {k: v.float().permute(0, 2, 3, 1).cpu().numpy()
                     for k, v in model.forward_endpoints(x).items()}
    out = {"logits": float(np.abs(logits - case["logits"]).max())}
    within = out["logits"] <= LOGITS_ATOL
    for name in ENDPOINTS:
        error = np.abs(endpoints[name] - case[name])
        out[name] = float(error.max())
        within &= bool((error <= ENDPOINT_ATOL + ENDPOINT_RTOL * np.abs(case[name])).all())
    out["within_fp32_tolerance"] = bool(within)
    return out


def reference_cases(reference_dir: str | os.PathLike) -> list[Path]:
    """The case files of a reference folder (case_224_global, case_320_window, ...)."""
    cases = sorted(Path(reference_dir).glob("case_*.npz"))
    if not cases:
        raise FileNotFoundError(f"no case_*.npz in {reference_dir}: point --reference at the "
                                "shared reference folder (../shared/reference)")
    return cases
