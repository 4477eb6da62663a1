"""Official checkpoints -> models and safetensors: selection, detection, safety, zoo, CLI.

The released checkpoints cannot be downloaded in tests, so variants of the real reference
checkpoint are built with tests/tf_writer.py (byte-identical to TensorFlow's writer).
"""

from __future__ import annotations

import json
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moat
from moat.cli import main
from moat.weights import catalogue as zoo
from moat.weights.convert import MissingBatchNormStatisticsWarning, convert_checkpoint
from moat.integrity import file_sha256 as sha256sum
from moat.weights.loader import load_weights
from moat.weights.metadata import WeightsMetadata
from moat.weights.official import load_official_weights, to_official
from moat.weights.tf_checkpoint import CheckpointError
from tf_writer import make_archive, write_checkpoint

ENDPOINTS = ("stage1", "stage2", "stage3", "stage4", "stage5")


@pytest.fixture(scope="module")
def case(reference_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(reference_dir / "case_224_global.npz"))


def _model(**kwargs) -> torch.nn.Module:
    return moat.create_model("tiny_moat_0", pool_size=2, **kwargs).eval()


def _assert_reproduces_reference(model: torch.nn.Module, case: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(case["input"].transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        endpoints = model.forward_endpoints(x)
        logits = model.forward_head(endpoints["stage5"])  # = model(x), one pass instead of two
    np.testing.assert_allclose(logits.numpy(), case["logits"], atol=1e-4, rtol=0)
    for name in ENDPOINTS:
        np.testing.assert_allclose(endpoints[name].numpy().transpose(0, 2, 3, 1), case[name],
                                   atol=1e-4, rtol=1e-5, err_msg=name)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


# --- the real checkpoint, end to end ---


def test_converted_reference_reproduces_official_outputs(tmp_path: Path, ref_prefix: Path,
                                                         case) -> None:
    out = tmp_path / "tiny_moat0.safetensors"
    meta = convert_checkpoint(ref_prefix, out)
    assert meta.to_header() == WeightsMetadata.read(out).to_header()
    meta = WeightsMetadata.read(out)
    assert (meta.variant, meta.position_embedding, meta.bn_statistics) == \
        ("tiny_moat_0", True, "present")
    assert meta.source_sha256 == sha256sum(ref_prefix.with_name("tiny_moat0.index"))
    assert meta.mean == [0.485, 0.456, 0.406]  # option 1, on 0..1 input
    assert meta.native_resolution == 256 and meta.pretrained_tag == "tiny_moat_0.in1k_256"
    assert len(meta.label_names) == 1000 and meta.label_names[1] == "goldfish"
    _assert_reproduces_reference(_model(weights=out), case)


def test_reference_through_released_style_archive(tmp_path: Path, ref_prefix: Path,
                                                  case) -> None:
    archive = make_archive(tmp_path / zoo.PRETRAINED["tiny_moat_0.in1k_256"].file, ref_prefix,
                           arcdir="tiny_moat0")
    model = moat.create_model("tiny_moat_0.in1k_256", weights=archive, pool_size=2,
                              sha256=sha256sum(archive)).eval()
    assert model.pretrained_tag == "tiny_moat_0.in1k_256"
    _assert_reproduces_reference(model, case)
    meta = convert_checkpoint(archive, tmp_path / "a.safetensors", model="tiny_moat_0.in1k_256")
    assert meta.source_file == archive.name and meta.source_sha256 == sha256sum(archive)
    _assert_same_state(_model(weights=tmp_path / "a.safetensors"), model)


def test_every_format_loads_the_same(tmp_path: Path, ref_prefix: Path, reference_dir) -> None:
    expected = load_official_weights(_model(), reference_dir / "tiny_moat0_weights.npz")
    torch.save(expected.state_dict(), tmp_path / "w.pt")
    convert_checkpoint(ref_prefix, tmp_path / "w.safetensors")
    for source in (ref_prefix, tmp_path / "w.pt", tmp_path / "w.safetensors",
                   reference_dir / "tiny_moat0_weights.npz"):
        _assert_same_state(load_weights(_model(), source), expected)


# --- checkpoints shaped like other releases ---


def test_several_shards(tmp_path: Path, ref_weights, ref_prefix: Path) -> None:
    prefix = write_checkpoint(tmp_path / "model-ckpt-0", ref_weights, num_shards=4)
    _assert_same_state(_model(weights=prefix), _model(weights=ref_prefix))


def test_bfloat16_checkpoint(tmp_path: Path, ref_weights) -> None:
    prefix = write_checkpoint(tmp_path / "c", ref_weights,
                              dtypes={n: "bfloat16" for n in ref_weights})
    assert moat.weights.checkpoint_info(prefix)["dtypes"] == {"bfloat16": 361}
    loaded = _model(weights=prefix)
    original = _model(weights=None)
    load_official_weights(original, ref_weights)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, original.state_dict()[name], rtol=2**-8, atol=0,
                                   msg=name)


def _with_training_state(ref_weights) -> dict[str, np.ndarray]:
    """The reference plus EMA copies (x0.5) of weights, Momentum slots and global_step."""
    tensors = dict(ref_weights)
    for name, value in ref_weights.items():
        if not name.endswith(("moving_mean", "moving_variance")):
            tensors[name + "/ExponentialMovingAverage"] = value * 0.5
        tensors[name + "/Momentum"] = np.zeros_like(value)
    tensors["global_step"] = np.array(1000, np.int64)
    return tensors


def test_ema_copies_and_optimizer_slots(tmp_path: Path, ref_weights, ref_prefix: Path,
                                        capsys) -> None:
    prefix = write_checkpoint(tmp_path / "model-ckpt-0", _with_training_state(ref_weights),
                              num_shards=2)
    raw = _model(weights=prefix)  # default: raw weights, slots and global_step ignored
    _assert_same_state(raw, _model(weights=ref_prefix))
    ema = _model(weights=prefix, ema=True)
    for name, value in ema.state_dict().items():
        if "running_" in name or "num_batches" in name:  # BN statistics have no EMA copy
            torch.testing.assert_close(value, raw.state_dict()[name])
        else:
            torch.testing.assert_close(value, raw.state_dict()[name] * 0.5, msg=name)
    assert main(["info", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"EMA copies:\s+275", out)
    assert re.search(r"optimizer slots:\s+361 \(Momentum\)", out)
    assert "global_step" in out and "tiny_moat_0.in1k_256" in out
    assert main(["convert", str(prefix), str(tmp_path / "e.safetensors"), "--ema"]) == 0
    assert WeightsMetadata.read(tmp_path / "e.safetensors").source_weights == "ema"
    _assert_same_state(_model(weights=tmp_path / "e.safetensors"), ema)


def test_ema_flag_needs_ema_copies(tmp_path: Path, ref_prefix: Path, ref_weights) -> None:
    with pytest.raises(ValueError, match="no ExponentialMovingAverage copies"):
        _model(weights=ref_prefix, ema=True)
    only_ema = {n + "/ExponentialMovingAverage": v for n, v in ref_weights.items()}
    prefix = write_checkpoint(tmp_path / "c", only_ema)
    with pytest.raises(ValueError, match="only ExponentialMovingAverage copies.*ema=True"):
        _model(weights=prefix)
    _assert_same_state(_model(weights=prefix, ema=True), _model(weights=ref_prefix))
    # `moat info` names the variant of an EMA-only checkpoint too (it read the copies).
    info = moat.weights.checkpoint_info(prefix)
    assert info["variant"].name == moat.weights.checkpoint_info(ref_prefix)["variant"].name
    assert info["weights"] == 0 and info["ema_copies"] == len(ref_weights)


def test_missing_batchnorm_statistics(tmp_path: Path, ref_weights, capsys) -> None:
    tensors = {n: v for n, v in ref_weights.items()
               if not n.endswith(("moving_mean", "moving_variance"))}
    prefix = write_checkpoint(tmp_path / "first_release", tensors)
    with pytest.raises(ValueError, match="lacks 86 of 86 BatchNorm.*first official"):
        _model(weights=prefix)
    with pytest.warns(MissingBatchNormStatisticsWarning, match="statistics 0/1"):
        model = _model(weights=prefix, allow_missing_bn_stats=True)
    bn = model.stem.norm_0
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert main(["info", str(prefix)]) == 0
    assert "0 of 86 (MISSING" in capsys.readouterr().out
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(prefix), str(out)]) == 2
    assert "BatchNorm" in capsys.readouterr().err and not out.exists()
    with pytest.warns(MissingBatchNormStatisticsWarning):
        assert main(["convert", str(prefix), str(out), "--allow-missing-bn-stats"]) == 0
    assert WeightsMetadata.read(out).bn_statistics.startswith("missing")


def test_other_variant_is_refused(tmp_path: Path, ref_weights) -> None:
    tiny1 = write_checkpoint(tmp_path / "tiny1", to_official(moat.create_model("tiny_moat_1")))
    with pytest.raises(ValueError, match=r"holds tiny_moat_1 \(with position embedding\), but "
                                         r"the model is tiny_moat_0 \(with"):
        _model(weights=tiny1)
    with pytest.raises(ValueError, match="holds tiny_moat_1.*not the requested tiny_moat_0"):
        convert_checkpoint(tiny1, tmp_path / "x.safetensors", model="tiny_moat_0")
    no_pe = write_checkpoint(tmp_path / "no_pe", {
        n: v for n, v in ref_weights.items() if not n.endswith("relative_position_embedding")})
    with pytest.raises(ValueError, match=r"without position embedding\), but the model is "
                                         r"tiny_moat_0 \(with position"):
        _model(weights=no_pe)
    moat.create_model("tiny_moat_0_no_pe", weights=no_pe)  # the matching model loads it
    # a converted file of another variant is refused by its metadata, with the same message
    convert_checkpoint(tiny1, tmp_path / "tiny1.safetensors")
    with pytest.raises(ValueError, match="holds tiny_moat_1"):
        _model(weights=tmp_path / "tiny1.safetensors")


def test_no_pe_tag_builds_and_loads(tmp_path: Path, ref_weights) -> None:
    no_pe = write_checkpoint(tmp_path / "no_pe", {
        n: v for n, v in ref_weights.items() if not n.endswith("relative_position_embedding")})
    model = moat.create_model("tiny_moat_0_no_pe.in1k_256", weights=no_pe)
    assert model.pretrained_tag == "tiny_moat_0_no_pe.in1k_256"
    assert not any("relative_position" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="without position embedding"):
        moat.create_model("tiny_moat_0_no_pe", position_embedding=True)


def test_new_classifier_for_fine_tuning(ref_prefix: Path) -> None:
    model = moat.create_model("tiny_moat_0.in1k_256", weights=ref_prefix, num_classes=10)
    assert model.logits_head.out_features == 10
    reference = _model(weights=ref_prefix)
    torch.testing.assert_close(model.stem.conv_0.weight, reference.stem.conv_0.weight)
    features = moat.create_model("tiny_moat_0.in1k_256", weights=ref_prefix, features_only=True)
    for name, value in features.state_dict().items():  # everything but the head is loaded
        torch.testing.assert_close(value, reference.state_dict()[name], msg=name)


# --- broken and hostile inputs ---


def test_corrupted_checkpoint(tmp_path: Path, ref_weights, capsys) -> None:
    prefix = write_checkpoint(tmp_path / "c", ref_weights)
    data = tmp_path / "c.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="c.data-00000-of-00001: tensor 'moat/.*corrupted"):
        _model(weights=prefix)
    assert main(["convert", str(prefix), str(tmp_path / "x.safetensors")]) == 2
    assert "crc32c mismatch" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_hostile_archive(tmp_path: Path, ref_prefix: Path) -> None:
    link = tarfile.TarInfo("tiny_moat0/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = make_archive(tmp_path / "evil.tar.gz", ref_prefix, "tiny_moat0", extra=[link])
    with pytest.raises(CheckpointError, match="refusing to extract member 'tiny_moat0/evil'"):
        _model(weights=archive)


def test_sha256_mismatch(tmp_path: Path, ref_prefix: Path) -> None:
    convert_checkpoint(ref_prefix, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="sha256 is .* expected 00"):
        _model(weights=tmp_path / "w.safetensors", sha256="00" * 32)


class _NotWeights:
    pass


def test_one_adapter_keeps_replaces_or_drops_the_classifier():
    """Every loader's adapter: the head is kept (must fit), replaced (another number of
    classes, fine-tuning) or dropped (a model without one); nothing else is exempt."""
    from moat.weights.adapt import adapt_state_dict

    source = moat.create_model("tiny_moat_0", num_classes=5).state_dict()
    same = adapt_state_dict(moat.create_model("tiny_moat_0", num_classes=5), source)
    assert same.state.keys() == source.keys() and not same.replaced + same.dropped
    seven = moat.create_model("tiny_moat_0", num_classes=7)
    with pytest.raises(ValueError, match=r"(?s)wrong shape \(2\).*logits_head.bias \[5\] -> \[7\]"):
        adapt_state_dict(seven, source)
    new = adapt_state_dict(seven, source, classifier="new")
    assert new.replaced == ["logits_head.weight [5, 256] -> [7, 256]", "logits_head.bias [5] -> [7]"]
    assert "final_layer_norm.weight" in new.state and "logits_head.weight" not in new.state
    heads = ["final_layer_norm.bias", "final_layer_norm.weight", "logits_head.bias",
             "logits_head.weight"]
    backbone = moat.create_model("tiny_moat_0", features_only=True)
    assert sorted(adapt_state_dict(backbone, source).dropped) == heads
    pooled = moat.create_model("tiny_moat_0", num_classes=0)
    assert sorted(adapt_state_dict(pooled, source).dropped) == heads[2:]
    broken = {k: v for k, v in source.items() if k != "stem.conv_0.weight"}
    with pytest.raises(ValueError, match=r"(?s)missing \(1\).*stem.conv_0.weight"):
        adapt_state_dict(seven, broken, classifier="new")
    extra = {**source, "decoder.weight": torch.ones(1)}
    assert adapt_state_dict(seven, extra, classifier="new", extra="ignore").unused == \
        ["decoder.weight"]


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    torch.save({"stem.conv_0.weight": torch.ones(1), "payload": _NotWeights()}, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="arbitrary pickles are refused"):
        load_weights(_model(), tmp_path / "p.pt")


def test_wrong_state_dict_lists_problems(tmp_path: Path) -> None:
    state = _model().state_dict()
    del state["stem.conv_0.weight"]
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"(?s)missing \(1\).*stem.conv_0.weight.*unexpected "
                                         r"\(1\).*extra.weight"):
        load_weights(_model(), tmp_path / "w.pt")


# --- zoo ---


def _zoo_doc_rows(spec: Path) -> list[dict[str, str]]:
    text = (spec / "MODEL_ZOO.md").read_text()
    section = text.split("## 4.", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[2:]]


def test_zoo_matches_model_zoo_doc(reference_dir: Path) -> None:
    rows = _zoo_doc_rows(reference_dir.parent / "spec")
    assert len(rows) == len(zoo.PRETRAINED) == 18
    for row in rows:
        family, number = row["backbone"].rsplit("-", 1)
        model = {"MOAT": "moat_", "tiny-MOAT": "tiny_moat_"}[family] + number
        entry = zoo.find(model, {"yes": True, "no": False}[row["PE"]])
        assert entry.file == row["file (current docs)"].strip("`"), entry.tag
        assert zoo.BASE_URL == "https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/"
        assert entry.resolution == int(row["input"])
        assert {"IN-1K": "in1k", "IN-22K+1K": "in22k_ft_in1k"}[row["data"]] == entry.data
        assert entry.normalization == row["norm"].replace("opt ", "option")
        assert f"{entry.params_m}M" == row["params"]
        assert f"{entry.gflops}B" == row["FLOPs"]
        assert f"{entry.top1}%" == row["top-1"]


def test_zoo_params_match_the_models() -> None:
    for entry in zoo.PRETRAINED.values():
        with torch.device("meta"):
            model = moat.create_model(entry.tag)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(params - entry.params_m) <= 0.05 + 1e-9, entry.tag


def test_tags_and_data_config() -> None:
    assert "moat_0_no_pe.in1k_224" in moat.list_pretrained()
    assert moat.list_pretrained("moat_2*") == ["moat_2.in22k_ft_in1k_384",
                                               "moat_2_no_pe.in22k_ft_in1k_384"]
    config = moat.data_config("moat_2.in22k_ft_in1k_384")
    assert config["input_size"] == (3, 384, 384)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    assert moat.data_config("tiny_moat_1")["input_size"] == (3, 256, 256)
    with torch.device("meta"):
        assert moat.data_config(moat.create_model("moat_0", position_embedding=False)) == \
            moat.data_config("moat_0_no_pe.in1k_224")
    with pytest.raises(ValueError, match="unknown pretrained tag.*moat_0.in1k_224"):
        moat.create_model("moat_0.in1k_999")
    with pytest.raises(FileNotFoundError):
        moat.create_model("moat_0.in1k_224", weights="/nonexistent/moat0.tar.gz")


@pytest.mark.parametrize("tag", ["tiny_moat_0.in1k_256", "moat_2.in22k_ft_in1k_384"])
def test_transforms_resize_crop_and_normalise(tag: str) -> None:
    from PIL import Image

    entry = zoo.PRETRAINED[tag]
    image = Image.new("RGB", (500, 400), (128, 64, 255))
    x = moat.create_transform(tag)(image)
    assert x.shape == (3, entry.resolution, entry.resolution) and x.dtype == torch.float32
    mean, std = np.array(entry.data_config()["mean"]), np.array(entry.data_config()["std"])
    expected = (np.array([128, 64, 255]) / 255 - mean) / std
    np.testing.assert_allclose(x.mean((1, 2)).numpy(), expected, atol=1e-5)
    # option 2 of the official docs: (x - 127.5) / 127.5 on 0..255 input
    if entry.normalization == "option2":
        np.testing.assert_allclose(x[:, 0, 0].numpy(), (np.array([128, 64, 255]) - 127.5) / 127.5,
                                   atol=1e-6)


def test_cli_info_on_converted_file(tmp_path: Path, ref_prefix: Path, capsys) -> None:
    assert main(["convert", str(ref_prefix), str(tmp_path / "t.safetensors"),
                 "--model", "tiny_moat_0"]) == 0
    assert "tiny_moat_0.in1k_256" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "t.safetensors")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"variant:\s+tiny_moat_0", out) and re.search(r"tensors:\s+325", out)
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no TensorFlow checkpoint" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean conversion warns about nothing
        convert_checkpoint(ref_prefix, tmp_path / "u.safetensors")


@pytest.mark.parametrize("table", ["moat0", "moat1", "moat2", "moat3", "moat4", "tiny_moat0",
                                   "tiny_moat1", "tiny_moat2", "tiny_moat3"])
def test_detection_on_official_variable_tables(reference_dir: Path, table: str) -> None:
    """The official names and shapes of every variant (spec/variables) are recognised."""
    from moat.weights.variant import detect_variant
    from moat.weights.official import official_tensors

    lines = (reference_dir.parent / "spec" / "variables" / f"{table}.txt").read_text()
    shapes = {name: tuple(json.loads(shape)) for name, shape, *_ in
              (line.split("\t") for line in lines.splitlines() if not line.startswith("#"))}
    variant = detect_variant(shapes)
    assert variant.name == table.replace("moat", "moat_")
    assert variant.position_embedding and variant.num_classes == 1000
    expected = {n for e in official_tensors(variant.meta_model()) for n in e.official}
    assert expected == set(shapes)
    no_pe = {n: s for n, s in shapes.items() if not n.endswith("relative_position_embedding")}
    assert not detect_variant(no_pe).position_embedding
