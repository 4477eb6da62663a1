"""CPU inference speed: the tanh GELU option and its measured cost, the CPU recorded with
benchmarks, and the kernel choices made from the instruction set found at run time."""

from __future__ import annotations

import collections
import csv
import functools

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import moat
from moat import kernels
from moat.cli import main as cli
from moat.cpu import cpu_info, effective_isa
from moat.export import TANH_GELU_OPSET, export_onnx, optimize_for_inference
from moat.export.cpu_ops import cpu_choices
from moat.export.gelu import (TOP1_LIMIT, GeluApproximationRefused, check_gelu_cost,
                              format_gelu_cost, gelu_cost)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0", num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # BatchNorm statistics that make the GELU inputs spread out
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _images(batch: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_tanh_gelu_is_the_model_with_every_gelu_in_tanh_form(tiny, monkeypatch):
    x = _images()
    with torch.no_grad():
        exact = tiny(x)
        fast = optimize_for_inference(tiny, gelu="tanh")(x)
        # The plain model with each of its GELUs (the stem's module, the blocks' BN+GELU)
        # switched to the tanh form computes the same function as the tanh copy.
        monkeypatch.setattr(kernels.F, "gelu", functools.partial(F.gelu, approximate="tanh"))
        monkeypatch.setattr(tiny.stem.act_0, "approximate", "tanh")
        reference = tiny(x)
    assert (fast - reference).abs().max() < 1e-4
    deviation = float((fast - exact).abs().max())
    assert 1e-5 < deviation < 1e-2  # a real, bounded change (erf vs tanh differ by <= 5e-4)
    assert optimize_for_inference(tiny).gelu == "exact"
    with pytest.raises(ValueError, match="gelu must be one of"):
        optimize_for_inference(tiny, gelu="sigmoid")


def test_gelu_cost_is_measured_and_the_limit_enforced(tiny):
    x = _images(8)
    with torch.no_grad():
        labels = optimize_for_inference(tiny)(x).argmax(-1)  # exact model: 100% top-1
    cost = gelu_cost(tiny, [(x[:4], labels[:4]), (x[4:], labels[4:])])
    assert cost["images"] == 8 and cost["top1_exact"] == 100.0
    assert 0 < cost["max_logit_deviation"] < 1e-2
    assert cost["top1_tanh"] == 100.0 - cost["changed_top1"]
    assert "largest logit deviation" in format_gelu_cost(cost)
    check_gelu_cost(cost)  # nothing changed class here: allowed
    # The rule: a drop of more than TOP1_LIMIT points (or, without labels, that share of
    # images changing class) is refused; exactly at the limit is allowed.
    base = {"images": 1000, "max_logit_deviation": 0.01, "changed_top1": 0.0}
    check_gelu_cost({**base, "top1_exact": 80.0, "top1_tanh": 80.0 - TOP1_LIMIT})
    check_gelu_cost({**base, "top1_exact": 80.0, "top1_tanh": 80.5, "changed_top1": 2.0})
    with pytest.raises(GeluApproximationRefused, match="top-1 drops by 0.20 points"):
        check_gelu_cost({**base, "top1_exact": 80.0, "top1_tanh": 79.8})
    with pytest.raises(GeluApproximationRefused, match="changed on 0.20%"):
        check_gelu_cost({**base, "changed_top1": 0.2, "top1_exact": None, "top1_tanh": None})


def _ort_ops(path, tmp_path) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime runs (all optimisations, NCHWc included)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                               .graph.node)


@pytest.mark.slow  # several ONNX exports and sessions: 20-50 s
def test_onnx_tanh_gelu_is_one_gelu_kept_in_nchwc(tiny, tmp_path):
    path = tmp_path / "tanh.onnx"
    report = export_onnx(tiny, path, 64, gelu="tanh")  # checked against the tanh model
    assert max(r["max_abs_err"] for r in report["check"]) < 1e-4
    assert report["opset"] == TANH_GELU_OPSET  # ONNX's Gelu(approximate) is opset 20
    proto = onnx.load(path)
    gelus = [n for n in proto.graph.node if n.op_type == "Gelu"]
    assert len(gelus) == 1 + 2 * sum(len(stage) for stage in tiny.stages)  # stem + 2 a block
    assert all(onnx.helper.get_node_attr_value(n, "approximate") == b"tanh" for n in gelus)
    assert {p.key: p.value for p in proto.metadata_props}["moat.gelu"] == "tanh"
    exact = tmp_path / "exact.onnx"
    export_onnx(tiny, exact, 64, check=False)
    assert {p.key: p.value for p in onnx.load(exact).metadata_props}["moat.gelu"] == "exact"
    # ONNX Runtime runs both in its blocked NCHWc layout: no extra reorders around the
    # tanh GELU (its FastGelu had 24 more ReorderInput/Output pairs on tiny-MOAT-0).
    fast, slow = _ort_ops(path, tmp_path), _ort_ops(exact, tmp_path)
    assert fast["ReorderInput"] == slow["ReorderInput"] and fast["Gelu"] == len(gelus)


@pytest.mark.slow  # several ONNX exports and sessions: 20-50 s
def test_onnx_opset_23_writes_each_attention_as_one_attention_operator(tiny, tmp_path):
    # From opset 23 the ONNX Runtime layout writes ONNX's Attention (q, k, v as [N, T, C]
    # tokens, the position bias as its float mask): no Softmax, no head Transposes left.
    blocks = sum(hasattr(block, "attention") for stage in tiny.stages for block in stage)
    for dynamic in (False, True):  # the bias a constant / computed from its table in the graph
        path = tmp_path / f"attention_{dynamic}.onnx"
        report = export_onnx(tiny, path, 64, opset=23, dynamic_size=dynamic)
        assert report["opset"] == 23 and report["dynamic_size"] == dynamic
        assert max(r["max_abs_err"] for r in report["check"]) < 1e-4  # batch 1 and 8
        ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
        assert ops["Attention"] == blocks and ops["Softmax"] == 0
    opset18 = tmp_path / "opset18.onnx"
    export_onnx(tiny, opset18, 64, opset=18, check=False)
    ops = collections.Counter(n.op_type for n in onnx.load(opset18).graph.node)
    assert ops["Attention"] == 0 and ops["Softmax"] == blocks


def test_cli_tanh_gelu_needs_images_and_prints_its_cost(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = ["export", "onnx", "tiny_moat_0", str(out), "--img-size", "64", "--no-check",
            "--gelu", "tanh"]
    assert cli(args) == 2
    assert "--gelu tanh needs images" in capsys.readouterr().err and not out.exists()
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(80, 80, 3) * 255).byte().numpy()).save(images / f"{i}.png")
    # Random weights: the logits are nearly equal, so any changed class is refused (exit 2);
    # either way the measured cost is printed first.
    code = cli(args + ["--gelu-check", str(images)])
    captured = capsys.readouterr()
    assert "tanh GELU vs exact on 3 images: largest logit deviation" in captured.out
    assert code == (0 if out.exists() else 2)
    if code == 0:
        props = {p.key: p.value for p in onnx.load(out).metadata_props}
        assert props["moat.gelu"] == "tanh" and "max_logit_deviation" in props["moat.gelu_cost"]
    assert cli(["export", "torchscript", "tiny_moat_0", str(tmp_path / "m.pt"),
                "--img-size", "64"]) == 0  # no --gelu option outside ONNX


def test_cpu_info_is_recorded_with_benchmark_results(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert cli(["benchmark", "tiny_moat_0", "--img-size", "32", "--batch-size", "1",
                "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-memory",
                "--csv", str(out)]) == 0
    table = capsys.readouterr().out
    info = cpu_info()
    assert f"CPU: {info.describe()}" in table and info.model in table
    (row,) = csv.DictReader(out.open())
    assert row["cpu"] == info.model and row["cpu_isa"] == info.isa
    assert {row[k] for k in ("cpu_avx2", "cpu_avx512", "cpu_vnni", "cpu_amx")} <= {"True",
                                                                                   "False"}
    assert row["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_effective_isa_follows_the_processor_and_the_limits():
    assert effective_isa(True, True, "AVX512", "") == "avx512"
    assert effective_isa(True, True, "AVX2", "") == "avx2"  # ATEN_CPU_CAPABILITY=avx2
    assert effective_isa(True, True, "AVX512", "AVX2") == "avx2"  # ONEDNN_MAX_CPU_ISA=AVX2
    assert effective_isa(True, False, "AVX2", "AVX512_CORE") == "avx2"  # a limit never raises
    assert effective_isa(True, True, "AVX512", "", "AVX2") == "avx2"  # MKL_ENABLE_INSTRUCTIONS
    assert effective_isa(False, False, "DEFAULT", "") == "default"


def test_cpu_choices_follow_the_documented_rule():
    for isa in ("avx512", "avx2", "default"):
        choices = cpu_choices(isa)
        # Measured on both instruction sets (README, "CPU instruction sets"): channels-last
        # and oneDNN's conv+GELU fusion win or tie; projections stay 1x1 convolutions.
        assert choices.channels_last and choices.onednn_fusion and choices.projections_as_conv
        assert choices.chunk_batches  # below CHUNK_BYTES: allocator reuse, any ISA
        assert choices.prepack_weights  # x1.06 on AVX-512, a tie on emulated AVX2
        assert choices.expand_depthwise  # x1.07 on AVX-512, x1.08 on emulated AVX2
