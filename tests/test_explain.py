"""`Explainer` and `moat explain` for the three tasks, on a real photograph (matplotlib's
sample of Grace Hopper): maps on the image's pixels, the chosen class or box, the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

import moat
from moat.app.page import render
from moat.cli import main
from moat.data.transforms import eval_transform
from moat.explain import (Explainer, NoDetectionError, class_activation_maps, class_score,
                          explain_files, to_input_size)

PHOTO = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
HALF = (0.5, 0.5, 0.5)


def small_photo(tmp_path, size=(96, 72)) -> str:
    path = tmp_path / "hopper.png"
    Image.open(PHOTO).convert("RGB").resize(size).save(path)
    return str(path)


def test_classification_maps_match_the_low_level_api_and_the_chosen_class():
    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0", num_classes=3)
    explainer = Explainer(model, transform=eval_transform(64, mean=HALF, std=HALF),
                          mean=HALF, std=HALF, class_names=["a", "b", "c"])
    expl = explainer.explain(PHOTO, "c")
    assert expl.target == "class 'c' (2)"
    assert [p["label"] for p in expl.predictions] == sorted(
        "abc", key=lambda n: -next(p["probability"] for p in expl.predictions if p["label"] == n))
    assert expl.image.shape == (64, 64, 3) and expl.image.dtype == np.uint8
    # the image is the model's input, de-normalised
    x = explainer.transform(Image.open(PHOTO).convert("RGB"))
    np.testing.assert_allclose(expl.image / 255, (x * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0),
                               atol=1 / 255)
    direct = class_activation_maps(model.eval(), x[None], class_score(2))
    for stage, cam in expl.cams.items():
        assert cam.shape == (64, 64)
        np.testing.assert_allclose(cam, to_input_size(direct[stage], (64, 64))[0], rtol=1e-4,
                                   atol=1e-7)
    assert expl.attention["stages.2.0"].shape == (4, 64, 64)   # 128 / 32 heads
    assert expl.attention["stages.3.1"].shape == (8, 64, 64)
    # received attention: each head's map averages to 1 / tokens over the global map
    np.testing.assert_allclose(expl.attention["stages.3.1"].mean((1, 2)), 1 / 4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        explainer.explain(PHOTO, "dog")
    unnamed = Explainer(model, transform=explainer.transform, mean=HALF, std=HALF)
    assert unnamed.explain(PHOTO, 2).target == "class '2' (2)"  # indices stand for names


def test_moat_explain_writes_overlays_arrays_and_json(tmp_path, capsys):
    image = small_photo(tmp_path)
    out = tmp_path / "out"
    assert main(["explain", image, "--model", "tiny_moat_0", "--img-size", "64",
                 "--class", "7", "--output-dir", str(out)]) == 0
    assert "class '7' (7)" in capsys.readouterr().out
    summary = json.loads((out / "hopper.json").read_text())
    assert summary["target"] == "class '7' (7)" and len(summary["predictions"]) == 5
    arrays = np.load(out / "hopper_maps.npz")
    assert arrays["cam_stage3"].shape == (64, 64)
    assert arrays["attention_stages.2.6"].shape == (4, 64, 64)
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures[0] == "hopper_attention_stages_2_0.png" and "hopper_cam.png" in pictures
    assert len(pictures) == 1 + 9  # stages, then one row per MOAT block
    assert Image.open(out / "hopper_cam.png").size[0] > 5 * 64
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert main(["explain", str(bad), "--model", "tiny_moat_0", "--img-size", "64",
                 "--output-dir", str(out)]) == 1
    assert "bad.jpg: error" in capsys.readouterr().out


def test_moat_explain_names_same_stems_apart_and_reports_bad_images(tmp_path, capsys):
    photo = Image.open(PHOTO).convert("RGB").resize((96, 72))
    for sub, picture in (("a", photo), ("b", photo.transpose(Image.FLIP_LEFT_RIGHT))):
        (tmp_path / "in" / sub).mkdir(parents=True)
        picture.save(tmp_path / "in" / sub / "hopper.png")
    (tmp_path / "in" / "z").mkdir()
    (tmp_path / "in" / "z" / "hopper.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = ["--model", "tiny_moat_0", "--img-size", "64"]
    assert main(["explain", str(tmp_path / "in"), *args, "--output-dir", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "z/hopper.png: error" in printed and "b/hopper.png: class" in printed
    assert sorted(p.name for p in out.glob("*.json")) == ["hopper-2.json", "hopper.json"]
    # each file is its own input's: what explaining that image alone writes
    for sub, name in (("a", "hopper"), ("b", "hopper-2")):
        alone = tmp_path / f"alone_{sub}"
        assert main(["explain", str(tmp_path / "in" / sub / "hopper.png"), *args,
                     "--output-dir", str(alone)]) == 0
        np.testing.assert_array_equal(np.load(out / f"{name}_maps.npz")["image"],
                                      np.load(alone / "hopper_maps.npz")["image"])
    assert not np.array_equal(np.load(out / "hopper_maps.npz")["image"],
                              np.load(out / "hopper-2_maps.npz")["image"])


def test_an_image_with_nothing_to_explain_does_not_stop_the_others(tmp_path, monkeypatch):
    image = small_photo(tmp_path)
    empty = tmp_path / "empty.png"
    Image.new("RGB", (96, 72), "white").save(empty)
    explain = Explainer.explain

    def explain_or_find_nothing(self, path, *args, **kwargs):  # a detector seeing nothing
        if Path(path) == empty:
            raise NoDetectionError("no detection to explain: try another image, class or box")
        return explain(self, path, *args, **kwargs)

    monkeypatch.setattr(Explainer, "explain", explain_or_find_nothing)
    results = explain_files([empty, image], tmp_path / "out", model="tiny_moat_0", img_size=64)
    assert results[0] == {"path": str(empty), "error": "no detection to explain: try another "
                          "image, class or box"}
    assert results[1]["path"] == image and (tmp_path / "out" / "hopper.json").is_file()
    assert not list((tmp_path / "out").glob("empty*"))


def test_segmentation_explains_a_class_over_its_pixels(tmp_path):
    from moat.tasks.segmentation import deeplabv3plus

    torch.manual_seed(0)
    model = deeplabv3plus("tiny_moat_0", 3, aspp_channels=16, decoder_channels=16,
                          low_level_channels=8, window_size=[None, None, (3, 3), None])
    def transform(rgb):
        return (torch.from_numpy(np.array(rgb)).permute(2, 0, 1) / 255 - 0.5) / 0.5
    explainer = Explainer(model, "segmentation", transform=transform, mean=HALF, std=HALF,
                          class_names=["sky", "face", "coat"])
    expl = explainer.explain(small_photo(tmp_path), "face")
    assert expl.mask.shape == (72, 96) and set(np.unique(expl.mask)) <= {0, 1, 2}
    assert abs(sum(p["share"] for p in expl.predictions) - 1) < 1e-4
    assert "'face' (1)" in expl.target
    assert set(expl.cams) == {"stage1", "stage2", "stage3", "stage4", "stage5"}
    assert all(m.shape == (72, 96) and (m >= 0).all() for m in expl.cams.values())
    # 72x96 -> 5x6 at stride 16: (3, 3) windows cut at the bottom
    assert expl.attention_maps["backbone.stages.2.0"].size == (5, 6)
    assert expl.attention["backbone.stages.2.0"].shape == (4, 72, 96)
    page = render(expl)  # what `moat app` shows: class shares and the mask
    assert page["picture"].shape == (72, 96, 3) and "face" in page["status"]
    assert set(page["labels"]) <= {"sky", "face", "coat"}


def test_detection_explains_a_chosen_box(tmp_path):
    from moat.tasks.detection import build_detector

    torch.manual_seed(0)
    model = build_detector("faster_rcnn", "tiny_moat_0", num_classes=2, fpn_channels=16,
                           min_size=96, max_size=128, representation_size=32,
                           box_score_thresh=0.0, box_detections_per_img=5,
                           rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    explainer = Explainer(model, "detection", class_names=["person", "flag"])
    expl = explainer.explain(small_photo(tmp_path, (120, 90)), box=1)
    assert expl.image.shape == (90, 120, 3)
    assert 1 <= len(expl.predictions) <= 5
    chosen = sorted(expl.predictions, key=lambda p: -p["score"])[1]  # box=1: second best
    assert str(chosen["box"]) in expl.target
    with pytest.raises(NoDetectionError, match="no detection to explain"):
        explainer.explain(small_photo(tmp_path, (120, 90)), box=5)  # at most 5 detections
    assert all(m.shape == (90, 120) for m in expl.cams.values())
    assert sum(float(m.sum()) for m in expl.cams.values()) > 0
    assert all(a.shape[1:] == (90, 120) for a in expl.attention.values())
    page = render(expl)  # what `moat app` shows: the boxes drawn, the best five listed
    assert page["picture"].shape == (90, 120, 3)
    assert not np.array_equal(page["picture"], expl.image)
    assert len(page["labels"]) == min(5, len(expl.predictions))
