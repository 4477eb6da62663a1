"""Released weights on first use (moat.weights.cache), against a local stand-in of the bucket.

The archives are real TensorFlow checkpoints in the official format and under the official
file names (the reference tiny-MOAT-0 checkpoint, packed like a release by tf_writer).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moat
from moat.cli import main
from moat.weights import catalogue
from moat.weights.cache import DownloadError, cached_file, pretrained_file
from release_server import ReleaseServer
from tf_writer import make_archive

TAG = "tiny_moat_0.in1k_256"
ENTRY = catalogue.PRETRAINED[TAG]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def bucket(tmp_path: Path, ref_prefix: Path) -> Path:
    """A folder holding the release archive under its official name."""
    folder = tmp_path / "bucket"
    folder.mkdir()
    make_archive(folder / ENTRY.file, ref_prefix, arcdir="tiny_moat0")
    return folder


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOAT_HOME", str(tmp_path / "home"))
    for name in ("MOAT_OFFLINE", "HF_HUB_OFFLINE", "MOAT_WEIGHTS_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def _image_batch() -> torch.Tensor:
    return torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))


def _leftovers(home: Path) -> list[str]:
    """Anything in the cache besides lock files: must be empty after a refused download."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if p.is_file() and not p.name.endswith(".lock"))


def test_first_use_downloads_converts_once_then_never_again(bucket, home, tmp_path, monkeypatch,
                                                            capsys):
    with ReleaseServer(bucket) as server:
        monkeypatch.setenv("MOAT_WEIGHTS_URL", server.url)
        model = moat.create_model(TAG, pretrained=True).eval()
        assert server.requests == {ENTRY.file: 1}
        assert _leftovers(home) == [f"weights/{TAG}.safetensors"]  # archive deleted
        again = moat.create_model(TAG, pretrained=True).eval()
        monkeypatch.setenv("MOAT_OFFLINE", "1")
        offline = moat.create_model(TAG, pretrained=True).eval()
        assert server.total == 1  # later uses and offline ones never contact the server
    # the cached weights are exactly what `moat convert` makes of the same archive
    converted = tmp_path / "converted.safetensors"
    assert main(["convert", str(bucket / ENTRY.file), str(converted)]) == 0
    reference = moat.create_model("tiny_moat_0", weights=converted).eval()
    x = _image_batch()
    with torch.no_grad():
        expected = reference(x)
        for m in (model, again, offline):
            assert torch.equal(m(x), expected)
    assert model.pretrained_cfg["label_names"][:2] == ["tench", "goldfish"]
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_file_mirror_and_default_home(bucket, home, monkeypatch):
    monkeypatch.setenv("MOAT_WEIGHTS_URL", bucket.as_uri())  # file:///...; no trailing slash
    monkeypatch.setenv("MOAT_OFFLINE", "1")  # a local mirror is not the network
    assert pretrained_file(TAG) == home / "weights" / f"{TAG}.safetensors"
    monkeypatch.delenv("MOAT_HOME")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(home / "torch-hub"))
    assert cached_file(ENTRY) == home / "torch-hub" / "moat" / "weights" / f"{TAG}.safetensors"


def test_offline_without_cache_names_the_file_and_the_fix(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        moat.create_model(TAG, pretrained=True)
    assert ENTRY.file in str(err.value) and "MOAT_WEIGHTS_URL=file://" in str(err.value)
    assert str(cached_file(ENTRY)) in str(err.value)


def test_processes_starting_together_download_and_convert_once(bucket, home, monkeypatch):
    with ReleaseServer(bucket, slow=1.0) as server:
        env = {**os.environ, "MOAT_HOME": str(home), "MOAT_WEIGHTS_URL": server.url,
               "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        code = ("import moat, torch; m = moat.create_model(%r, pretrained=True); "
                "print(float(sum(p.double().sum() for p in m.parameters())))" % TAG)
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(3)]
        results = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [r[1][-2000:] for r in results]
        assert server.requests == {ENTRY.file: 1}
    assert len({out for out, _ in results}) == 1  # the same weights everywhere
    assert _leftovers(home) == [f"weights/{TAG}.safetensors"]


def _serve_broken(bucket: Path, how: str, ref_prefix: Path, tmp_path: Path) -> None:
    archive = bucket / ENTRY.file
    if how == "truncated":
        data = archive.read_bytes()
        archive.write_bytes(data[: len(data) // 2])
    elif how == "corrupt tensor":  # a flipped byte inside a tensor: its crc32c fails
        copy = tmp_path / "copy"
        copy.mkdir()
        for f in ref_prefix.parent.glob(ref_prefix.name + ".*"):
            shutil.copy(f, copy / f.name)
        shard = next(copy.glob("*.data-*"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        make_archive(archive, copy / ref_prefix.name, arcdir="tiny_moat0")
    else:  # bytes of the compressed archive
        data = bytearray(archive.read_bytes())
        data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
        archive.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "corrupt tensor", "corrupt archive"])
def test_broken_download_is_refused_and_leaves_nothing(bucket, home, monkeypatch, how,
                                                       ref_prefix, tmp_path):
    _serve_broken(bucket, how, ref_prefix, tmp_path)
    with ReleaseServer(bucket) as server:
        monkeypatch.setenv("MOAT_WEIGHTS_URL", server.url)
        with pytest.raises(DownloadError, match="Nothing was cached; run again"):
            moat.create_model(TAG, pretrained=True)
    assert _leftovers(home) == []
    monkeypatch.setenv("MOAT_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        moat.create_model(TAG, pretrained=True)


def test_failed_download_is_an_expected_error_in_the_cli(bucket, home, monkeypatch, ref_prefix,
                                                        tmp_path, capsys):
    from moat.cli import main as cli

    _serve_broken(bucket, "truncated", ref_prefix, tmp_path)
    with ReleaseServer(bucket) as server:
        monkeypatch.setenv("MOAT_WEIGHTS_URL", server.url)
        code = cli(["export", "onnx", TAG, str(tmp_path / "x.onnx"), "--pretrained"])
    err = capsys.readouterr().err
    assert code == 2, err  # a user-facing message, not "internal error" (70)
    assert "Nothing was cached; run again" in err and "Traceback" not in err


def test_short_response_is_refused(bucket, home, monkeypatch):
    """The server announces the full size and closes the connection half-way."""
    full = (bucket / ENTRY.file).read_bytes()
    with ReleaseServer(bucket) as server:
        handler = server._httpd.RequestHandlerClass

        def send_half(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(full)))
            self.end_headers()
            self.wfile.write(full[: len(full) // 2])

        monkeypatch.setattr(handler, "do_GET", send_half)
        monkeypatch.setenv("MOAT_WEIGHTS_URL", server.url)
        with pytest.raises(DownloadError, match="interrupted or truncated"):
            pretrained_file(TAG)
    assert _leftovers(home) == []


def test_known_sha256_is_checked(bucket, home, monkeypatch):
    monkeypatch.setitem(catalogue.PRETRAINED, TAG, dataclasses.replace(ENTRY, sha256="0" * 64))
    monkeypatch.setenv("MOAT_WEIGHTS_URL", bucket.as_uri())
    with pytest.raises(DownloadError, match="sha256"):
        pretrained_file(TAG)
    assert _leftovers(home) == []


def test_timm_pretrained_is_the_same_model(bucket, home, monkeypatch):
    import timm

    monkeypatch.setenv("MOAT_WEIGHTS_URL", bucket.as_uri())
    ours = moat.create_model(TAG, pretrained=True)
    theirs = timm.create_model(TAG, pretrained=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert theirs.pretrained_cfg["label_names"][0] == "tench"
    assert theirs.pretrained_cfg["input_size"] == (3, 256, 256)
    ten = timm.create_model(TAG, pretrained=True, num_classes=10)  # fine-tuning: new head
    assert ten.num_classes == 10 and "label_names" not in ten.pretrained_cfg
    assert torch.equal(ten.stem.conv_0.weight, ours.stem.conv_0.weight)


def test_predict_prints_imagenet_names_with_release_preprocessing(bucket, home, monkeypatch,
                                                                  tmp_path, capsys):
    from PIL import Image
    from skimage import data

    path = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(path)  # a real photo of a cat
    monkeypatch.setenv("MOAT_WEIGHTS_URL", bucket.as_uri())
    assert main(["predict", str(path), "--model", TAG, "--pretrained", "--top-k", "3",
                 "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    model = moat.create_model(TAG, pretrained=True).eval()
    x = moat.create_transform(TAG)(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = probs.topk(3)
    names = catalogue.imagenet_classes()
    expected = ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(top.values, top.indices))
    assert line == f"{path}: {expected}"
    assert np.isclose(float(top.values.sum()), sum(float(t.split()[-1]) for t in
                                                   line.split(": ", 1)[1].split(", ")), atol=2e-3)


def test_train_pretrained_fine_tunes_from_the_release(bucket, home, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from moat.data.synthetic import write_shapes_dataset
    from moat.train.checkpoint import CheckpointManager

    data = tmp_path / "shapes"
    write_shapes_dataset(data, num_classes=4, train_per_class=4, val_per_class=2, img_size=32)
    monkeypatch.setenv("MOAT_WEIGHTS_URL", bucket.as_uri())
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", TAG, "--pretrained", "--epochs", "1",
                 "--img-size", "32", "--batch-size", "8", "--workers", "0", "--frozen-stages", "4", "--lr", "1e-3",
                 "--output", str(run), "--no-progress", "--set", "tensorboard=false",
                 "--set", "ema_decay=0"]) == 0
    log = (run / "train.log").read_text()
    assert f"{TAG}.safetensors" in log and "classifier re-initialised" in log
    state = load_file(str(CheckpointManager(run).latest() / "model.safetensors"))
    release = moat.create_model(TAG, pretrained=True).state_dict()
    assert state["logits_head.weight"].shape == (4, 256)  # a new head for the data's classes
    # the frozen backbone's weights are the release's
    assert torch.equal(state["stem.conv_0.weight"], release["stem.conv_0.weight"])


def test_export_and_benchmark_build_the_pretrained_model(bucket, home, monkeypatch):
    from moat.bench.pytorch import BenchSpec, build_model
    from moat.export import load_model

    monkeypatch.setenv("MOAT_WEIGHTS_URL", bucket.as_uri())
    release = moat.create_model(TAG, pretrained=True).state_dict()
    exported = load_model(TAG, pretrained=True).state_dict()
    benched = build_model(BenchSpec(TAG, (256, 256), 1, pretrained=True)).state_dict()
    for state in (exported, benched):
        assert all(torch.equal(v, state[k]) for k, v in release.items())
    assert main(["export", "torchscript", TAG, str(home / "m.pt"), "--pretrained"]) == 0
