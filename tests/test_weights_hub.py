"""Hugging Face Hub folders (moat.weights.hub): save, reload in moat and timm, hf-hub: offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moat
from moat.cli import main
from moat.weights import hub

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


@pytest.fixture
def fine_tuned() -> torch.nn.Module:
    """A 5-class model with a non-default layout, its weights perturbed off the init."""
    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0_no_pe", num_classes=5, pool_size=3,
                              window_size=[None, None, 8, None])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in model.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 2.0)
    return model.eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "weights differ"
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x), b.eval()(x))


def test_saved_folder_reloads_bit_identically_in_moat_and_timm(fine_tuned, tmp_path):
    import timm

    folder = moat.save_pretrained(fine_tuned, tmp_path / "flowers", label_names=CLASSES,
                                  dataset="tf_flowers (5 classes)", metrics={"top1": 91.2})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "tiny_moat_0" and config["num_classes"] == 5
    assert config["model_args"] == {"position_embedding": False, "pool_size": 3,
                                    "window_size": [None, None, 8, None]}
    cfg = config["pretrained_cfg"]
    assert cfg["label_names"] == CLASSES and cfg["input_size"] == [3, 256, 256]
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["classifier"] == "logits_head"
    card = (folder / "README.md").read_text()
    for text in ("library_name: timm", "tiny_moat_0", "tf_flowers (5 classes)",
                 "| top1 | 91.2 |", "## Intended use", "hf-hub:", "local-dir:"):
        assert text in card, text

    ours = moat.create_model(f"local-dir:{folder}")
    _same(fine_tuned, ours)
    assert ours.pretrained_cfg["label_names"] == CLASSES
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True)
    _same(fine_tuned, theirs)
    assert theirs.pretrained_cfg["label_names"] == CLASSES
    # saving what was loaded gives the same folder contents again
    again = moat.save_pretrained(ours, tmp_path / "again")
    assert json.loads((again / "config.json").read_text()) == config


def test_predict_and_export_take_folder_names(fine_tuned, tmp_path, capsys):
    from PIL import Image
    from skimage import data

    folder = moat.save_pretrained(fine_tuned, tmp_path / "flowers", label_names=CLASSES)
    image = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(image)
    assert main(["predict", str(image), "--model", f"local-dir:{folder}", "--top-k", "2",
                 "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    x = moat.create_transform(fine_tuned)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        probs = fine_tuned(x).softmax(-1)[0]
    top = probs.topk(2)
    assert line == f"{image}: " + ", ".join(f"{CLASSES[i]} {p:.3f}"
                                            for p, i in zip(top.values, top.indices))


def _populate_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_hf_hub_name_resolves_from_the_cache_offline(fine_tuned, tmp_path):
    folder = moat.save_pretrained(fine_tuned, tmp_path / "saved", label_names=CLASSES)
    _populate_hf_cache(tmp_path / "hf" / "hub", "someone/tiny-moat-flowers", folder)
    torch.save(fine_tuned.state_dict(), tmp_path / "expected.pt")
    code = f"""
import torch, moat, timm
expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
a = moat.create_model("hf-hub:someone/tiny-moat-flowers").eval()
b = timm.create_model("hf-hub:someone/tiny-moat-flowers", pretrained=True).eval()
for model in (a, b):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
assert a.model_args == {{"position_embedding": False, "pool_size": 3,
                         "window_size": [None, None, 8, None]}}, a.model_args
assert a.pretrained_cfg["label_names"] == b.pretrained_cfg["label_names"] == {CLASSES!r}
try:
    moat.create_model("hf-hub:someone/not-cached")
except FileNotFoundError as err:
    assert "not in the Hugging Face cache" in str(err), err
else:
    raise AssertionError("a repository missing from the cache loaded offline")
print("ok")
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_push_to_hub_uploads_the_saved_folder(fine_tuned, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id

    def upload_folder(self, *, repo_id, folder_path, commit_message):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
        return "https://huggingface.co/someone/x/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = moat.push_to_hub(fine_tuned, "someone/x", label_names=CLASSES)
    assert url.endswith("/commit/1") and calls["repo"] == "someone/x"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert calls["config"]["pretrained_cfg"]["label_names"] == CLASSES


def test_folder_errors_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        moat.create_model(f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="label names for a 5-class model"):
        hub.hub_config(moat.create_model("tiny_moat_0", num_classes=5), ["a", "b"])
