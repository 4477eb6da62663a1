"""ONNX Runtime deployment: the export layout ONNX Runtime fuses, int8 quantization,
`moat eval` on .onnx files, the ONNX Runtime benchmark, and ExecuTorch (XNNPACK).

Models are tiny (a five-block MOAT, tiny-MOAT-0 at 32-64 px) so that exports stay short;
the code paths are those of the released variants.
"""

from __future__ import annotations

import collections
import csv
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moat.bench.onnx_runtime import OPSET
from moat.bench.models import count_macs
from moat.cli import main as cli
from moat.export import export_onnx
from moat.models import MoatConfig, MoatNet

MICRO = MoatConfig(stem_size=(16, 16), num_blocks=(1, 1, 2, 1), hidden_size=(16, 32, 64, 64))


def _micro() -> MoatNet:
    torch.manual_seed(0)
    model = MoatNet(MICRO, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _optimized_ops(path: Path, tmp_path: Path) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime actually runs (after its optimiser)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                               .graph.node)


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory) -> Path:
    """Real photographs and drawings that ship with matplotlib, as a calibration folder."""
    folder = tmp_path_factory.mktemp("calibration")
    data = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        shutil.copy(data / name, folder / name)
    return folder


def test_onnxruntime_layout_is_fused_and_exact(tmp_path):
    model = _micro()
    path = tmp_path / "micro.onnx"
    report = export_onnx(model, path, 64)
    assert not report["dynamic_size"]
    assert [r["batch"] for r in report["check"]] == [1, 8]
    assert all(r["max_abs_err"] <= 1e-4 for r in report["check"])
    exported = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    blocks = sum(MICRO.num_blocks)
    attention_blocks = sum(MICRO.num_blocks[s] for s in MICRO.moat_stages)
    # Position biases are constants: no Resize / Gather of the tables in the graph.
    assert exported["Resize"] == 0 and exported["Gather"] == 0
    # Tokens in and out, head split and merge: at most 5 Transposes per attention block.
    assert exported["Transpose"] <= 5 * attention_blocks
    # TF 'SAME' at stride 2 stays a 3x3 kernel with pads (top, left, bottom, right) =
    # (0, 0, 1, 1): the stem and every downsampling depthwise convolution.
    strided = [n for n in onnx.load(path).graph.node if n.op_type == "Conv"
               and onnx.helper.get_node_attr_value(n, "strides") == [2, 2]]
    assert len(strided) == 1 + 4
    for node in strided:
        assert onnx.helper.get_node_attr_value(node, "kernel_shape") == [3, 3]
        assert onnx.helper.get_node_attr_value(node, "pads") == [0, 0, 1, 1]
    ops = _optimized_ops(path, tmp_path)
    # Every GELU (stem + two per block) becomes one fused Gelu kernel; LayerNorm is fused.
    assert ops["Gelu"] == 1 + 2 * blocks and ops["Erf"] == 0
    assert ops["LayerNormalization"] == attention_blocks + 1
    assert ops["BatchNormalization"] == 0


def test_pytorch_layout_has_the_transposes_the_onnxruntime_layout_avoids(tmp_path):
    model = _micro()
    export_onnx(model, tmp_path / "pt.onnx", 64, layout="pytorch", check=False)
    export_onnx(model, tmp_path / "ort.onnx", 64, check=False)
    count = {name: collections.Counter(n.op_type for n in onnx.load(tmp_path / name).graph.node)
             for name in ("pt.onnx", "ort.onnx")}
    assert count["ort.onnx"]["Transpose"] < count["pt.onnx"]["Transpose"]
    with pytest.raises(ValueError, match="layout"):
        export_onnx(model, tmp_path / "x.onnx", 64, layout="nhwc")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run) of a 1-epoch tiny_moat_0 run on 4 generated classes at 32 px, with
    preprocessing unlike ImageNet's defaults (mean/std 0.5, bilinear, no crop)."""
    from moat.data.synthetic import write_shapes_dataset
    from moat.train.config import load_config
    from moat.train.loop import train

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_classes=4, train_per_class=8, val_per_class=4, img_size=32)
    run = tmp_path_factory.mktemp("run")
    train(load_config(None, [], data=str(root), output=str(run), epochs=1, model="tiny_moat_0",
                      img_size=32, batch_size=8, workers=0, progress=False, tensorboard=False,
                      lr=2e-3, warmup_epochs=0.5, crop_pct=1.0, interpolation="bilinear",
                      mean=(0.5,) * 3, std=(0.5,) * 3))
    return root, run


def _top1(capsys) -> float:
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return float(line.split("top-1:")[1].split("%")[0])


def test_export_run_quantize_and_evaluate_onnx(trained_run, tmp_path, capsys):
    root, run = trained_run
    fp32, int8 = tmp_path / "run.onnx", tmp_path / "run.int8.onnx"
    assert cli(["export", "onnx", str(run), str(fp32)]) == 0
    assert "32x32" in capsys.readouterr().out  # the run's evaluation size
    # A run brings its own model and classes: model flags are refused, not ignored.
    assert cli(["export", "onnx", str(run), str(tmp_path / "x.onnx"), "--num-classes", "3"]) == 2
    assert "--num-classes cannot be used with it" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert cli(["quantize", str(fp32), str(int8), "--calibration", str(root / "train")]) == 0
    assert "calibrated on 32 images" in capsys.readouterr().out
    graph = onnx.load(int8).graph
    kinds = collections.Counter(n.op_type for n in graph.node)
    assert kinds["QuantizeLinear"] > 0 and kinds["DequantizeLinear"] > kinds["QuantizeLinear"]
    # Per-channel weights: a weight's DequantizeLinear has one scale per output channel.
    scales = {t.name: t for t in graph.initializer}
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear"
                   and n.input[1] in scales and len(scales[n.input[1]].dims) == 1
                   and scales[n.input[1]].dims[0] > 1]
    assert per_channel
    report = tmp_path / "report"
    assert cli(["eval", "--data", str(root), "--checkpoint", str(run), "--workers", "0",
                "--report", str(report)]) == 0
    torch_top1 = _top1(capsys)
    assert cli(["eval", "--data", str(root), "--checkpoint", str(fp32), "--workers", "0",
                "--report", str(report)]) == 0
    assert _top1(capsys) == torch_top1  # the same images, the same function
    assert cli(["eval", "--data", str(root), "--checkpoint", str(int8), "--workers", "0",
                "--report", str(report)]) == 0
    capsys.readouterr()
    # An ONNX file without the run's description is refused with the fix.
    plain = tmp_path / "plain.onnx"
    export_onnx(_micro(), plain, 32, check=False)
    assert cli(["eval", "--data", str(root), "--checkpoint", str(plain)]) == 2
    assert "moat export onnx RUN_DIR" in capsys.readouterr().err
    assert cli(["quantize", str(fp32), str(fp32), "--calibration", str(root)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["quantize", str(fp32), str(int8), "--calibration", str(empty)]) == 2
    assert "no images" in capsys.readouterr().err


def test_app_shows_an_exported_run_as_moat_predict_does(trained_run, tmp_path):
    """`moat app --model run.onnx`: the file's preprocessing and class names, so the page
    gives the names, top-1 and probabilities of `moat predict` on the run."""
    from PIL import Image

    from moat.app.exported import ExportedClassifier
    from moat.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from moat.train.eval_predict import predict_checkpoint

    _, run = trained_run
    exported = tmp_path / "run.onnx"
    assert cli(["export", "onnx", str(run), str(exported)]) == 0
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    expected = predict_checkpoint([photo], run, top_k=4, device="cpu")[0]["top_k"]
    got = ExportedClassifier(exported).explain(Image.open(photo), top_k=4).predictions
    assert sorted(p["label"] for p in got) == ["circle", "cross", "square", "triangle"]
    assert [(p["label"], p["index"]) for p in got] == [(p["label"], p["index"])
                                                       for p in expected]
    probs = [p["probability"] for p in expected]
    np.testing.assert_allclose([p["probability"] for p in got], probs, atol=1e-4)
    # ImageNet's mean/std (what the page used for every file) give answers the tolerance
    # above tells apart (this barely trained model moves them by about 5e-3).
    imagenet = ExportedClassifier(exported, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    other = sorted(imagenet.explain(Image.open(photo), top_k=4).predictions,
                   key=lambda p: p["index"])
    by_index = sorted(expected, key=lambda p: p["index"])
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(other, by_index)) > 1e-3


def test_quantized_model_stays_close_to_float(sample_images, tmp_path, capsys):
    from moat.export.onnx_metadata import read_preprocessing
    from moat.export.quantize import calibration_batches

    fp32, int8 = tmp_path / "tiny.onnx", tmp_path / "tiny.int8.onnx"
    assert cli(["export", "onnx", "tiny_moat_0", str(fp32), "--img-size", "64"]) == 0
    assert cli(["quantize", str(fp32), str(int8), "--calibration", str(sample_images)]) == 0
    preprocessing = read_preprocessing(int8)
    assert preprocessing["input_size"] == (3, 64, 64) and preprocessing["crop_pct"] == 0.875
    x = next(calibration_batches(sample_images, preprocessing))
    assert x.shape == (3, 3, 64, 64)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            .run(None, {"x": x})[0] for p in (fp32, int8))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.95, cosine


@pytest.mark.slow  # exports, calibrates int8 and times two models
def test_onnxruntime_benchmark_rows_and_csv(sample_images, tmp_path, capsys):
    out = tmp_path / "ort.csv"
    assert cli(["benchmark", "tiny_moat_0", "--runtime", "onnxruntime", "--img-size", "64",
                "--batch-size", "2", "--threads", "1", "--warmup", "0", "--repeats", "1",
                "--int8-calibration", str(sample_images), "--export-dir", str(tmp_path),
                "--csv", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tiny_moat_0 (int8)" in table
    rows = list(csv.DictReader(out.open()))
    assert [r["model"] for r in rows] == ["tiny_moat_0", "tiny_moat_0 (int8)"]
    assert {r["runtime"] for r in rows} == {"onnxruntime"}
    assert rows[0]["onnxruntime"] == ort.__version__
    assert float(rows[0]["gmacs"]) == pytest.approx(count_macs("tiny_moat_0", (64, 64)) / 1e9)
    assert all(float(r["latency_ms"]) > 0 and float(r["img_per_s"]) > 0 for r in rows)
    assert (tmp_path / f"tiny_moat_0_64x64.opset{OPSET}.onnx").exists()  # reused by opset
    assert cli(["benchmark", "--runtime", "onnxruntime", "--mode", "train"]) == 2


def test_peers_follow_the_models():
    from moat.bench.onnx_runtime import MOBILE_PEERS, peers_for
    from moat.bench.models import PEERS

    assert peers_for(["moat_0"]) == PEERS
    assert peers_for(["tiny_moat_0", "tiny_moat_1"]) == MOBILE_PEERS
    assert "mobilevitv2_075" in MOBILE_PEERS and "coatnet_0_rw_224" in PEERS


@pytest.mark.slow  # lowers through torch.export and XNNPACK
def test_executorch_program_matches_pytorch(tmp_path):
    from moat.export.edge import export_executorch, run_executorch

    model = _micro()
    report = export_executorch(model, tmp_path / "micro.pte", 64)
    assert report["max_abs_err"] <= 1e-4 and report["delegated_calls"] > 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(run_executorch(tmp_path / "micro.pte", x), model(x),
                                   atol=1e-4, rtol=1e-4)


def test_onnx_metadata_has_one_owner_and_reads_old_sizes():
    """moat.export.onnx_metadata writes and reads every key; files that recorded the input
    size as (H, W) read as (3, H, W) like every input_size in moat."""
    import json

    from moat.export.onnx_metadata import PREPROCESSING_KEY, OnnxMetadata

    meta = OnnxMetadata(preprocessing={"input_size": (40, 48), "crop_pct": 1.0},
                        config={"task": "classification"}, task_metadata={"classes": ["a"]},
                        quantization="int8")
    props = meta.props()
    assert PREPROCESSING_KEY == "moat.preprocessing"  # in every exported file: never renamed
    assert json.loads(props[PREPROCESSING_KEY])["input_size"] == [3, 40, 48]
    back = OnnxMetadata.from_props(props)
    assert back.preprocessing["input_size"] == (3, 40, 48)
    assert (back.task, back.class_names, back.quantization) == ("classification", ["a"], "int8")
    old = OnnxMetadata.from_props({PREPROCESSING_KEY: json.dumps({"input_size": [64, 64]})})
    assert old.preprocessing["input_size"] == (3, 64, 64) and old.config is None


def test_preprocessing_of_a_foreign_onnx_file(tmp_path):
    """A file without moat's metadata: ImageNet defaults at its fixed size, or at the size
    given when its height and width are dynamic (refused without one)."""
    from onnx import TensorProto, helper

    from moat.data.preprocessing import CROP_PCT, IMAGENET_MEAN
    from moat.export.onnx_metadata import read_preprocessing

    def identity(path, dims):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        onnx.save(helper.make_model(graph), path)
        return path

    fixed = read_preprocessing(identity(tmp_path / "fixed.onnx", ["b", 3, 40, 48]))
    assert fixed["input_size"] == (3, 40, 48) and fixed["crop_pct"] == CROP_PCT
    assert tuple(fixed["mean"]) == IMAGENET_MEAN
    dynamic = identity(tmp_path / "dynamic.onnx", ["b", 3, "h", "w"])
    with pytest.raises(ValueError, match="no fixed input size"):
        read_preprocessing(dynamic)
    assert read_preprocessing(dynamic, 56)["input_size"] == (3, 56, 56)


def test_peers_are_exported_at_each_peer_opset(tmp_path, monkeypatch):
    # The judged benchmark exports the peers at opset 18 and at MOAT's opset (the exporter's
    # spelling of some operators changes between them) and judges against the faster file.
    from moat.bench import onnx_runtime

    calls = []

    def export(name, size, path, gelu="exact", opset=OPSET):
        calls.append((name, gelu, opset))
        Path(path).write_bytes(b"onnx")
    monkeypatch.setattr(onnx_runtime, "export_model", export)
    files = onnx_runtime._export_all(["tiny_moat_0", "mobilevitv2_075"], (64, 64), tmp_path,
                                     None, lambda line: None, ["exact", "tanh"], 23, [18, 23])
    assert list(files) == ["tiny_moat_0", "tiny_moat_0 [tanh GELU]",
                           "mobilevitv2_075 [opset 18]", "mobilevitv2_075 [opset 23]"]
    assert calls == [("tiny_moat_0", "exact", 23), ("tiny_moat_0", "tanh", 23),
                     ("mobilevitv2_075", "exact", 18), ("mobilevitv2_075", "exact", 23)]
    assert files["mobilevitv2_075 [opset 18]"].name == "mobilevitv2_075_64x64.opset18.onnx"
    # One opset for everyone (the `moat benchmark` command): no suffix.
    files = onnx_runtime._export_all(["mobilevitv2_075"], (64, 64), tmp_path, None,
                                     lambda line: None, ["exact"], 18)
    assert list(files) == ["mobilevitv2_075"]
