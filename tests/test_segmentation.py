"""Segmentation: backbone presets and freezing, DeepLabv3+, metrics, inference, data, task."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moat.data import masks
from moat.data import segmentation as segdata
from moat.data.synthetic_segmentation import write_segmentation_dataset
from moat.tasks.backbone import (PRESETS, FrozenBatchNorm2d, MoatBackbone, batch_norm_thawed,
                                 build_backbone)
from moat.tasks.confusion import ConfusionMatrix, confusion_matrix
from moat.tasks.segmentation import (DeepLabV3Plus, deeplabv3plus, metrics_from_confusion,
                                     segment, slide_inference)

torch.set_num_threads(min(2, torch.get_num_threads()))
NAN = float("nan")


def small_model(num_classes: int = 4, **kwargs) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return deeplabv3plus("tiny_moat_0", num_classes, aspp_channels=16, decoder_channels=16,
                         low_level_channels=8, **kwargs).eval()


# --- metrics --------------------------------------------------------------------------------

def test_confusion_matrix_by_hand():
    # classes 0..3; 255 = ignore. Class 3 appears nowhere (neither truth nor prediction).
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 3, 2]])  # predictions on ignored pixels do not count
    cm = confusion_matrix(pred, target, 4)
    expected = torch.tensor([[1, 1, 0, 0],   # truth 0: one right, one predicted as 1
                             [0, 2, 0, 0],   # truth 1: both right
                             [1, 0, 1, 0],   # truth 2: one right, one predicted as 0
                             [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    m = metrics_from_confusion(cm, ["a", "b", "c", "d"])
    # IoU: a = 1/(2+2-1) = 1/3, b = 2/(2+3-2) = 2/3, c = 1/(2+1-1) = 1/2; d absent -> excluded
    assert m["IoU/a"] == pytest.approx(1 / 3)
    assert m["IoU/b"] == pytest.approx(2 / 3)
    assert m["IoU/c"] == pytest.approx(1 / 2)
    assert "IoU/d" not in m
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # not /4
    assert m["pixel_acc"] == pytest.approx(4 / 6)  # ignored pixels excluded
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert all(math.isfinite(v) for v in m.values())


def test_predicted_but_absent_class_counts_as_zero():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 0, 1])  # class 1 predicted, never present: IoU 0, counted
    m = metrics_from_confusion(confusion_matrix(pred, target, 3))
    assert m["IoU/1"] == 0.0 and "IoU/2" not in m
    assert m["mIoU"] == pytest.approx((3 / 4 + 0) / 2)


def test_metrics_are_over_the_whole_set_not_per_image_means():
    cm = ConfusionMatrix(2)
    # image 1: class 1 absent from both -> only class 0 defined there
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]))
    # image 2: class 1 present
    cm.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 255]))
    # whole-set matrix: truth 0 -> [5, 1], truth 1 -> [0, 1]
    assert torch.equal(cm.matrix, torch.tensor([[5, 1], [0, 1]]))
    m = metrics_from_confusion(cm.matrix)
    # IoU_0 = 5 / (6 + 5 - 5), IoU_1 = 1 / (1 + 2 - 1); a per-image mean would give
    # ((1) + (2/3 + 1/2) / 2) / 2 instead
    assert m["IoU/0"] == pytest.approx(5 / 6) and m["IoU/1"] == pytest.approx(1 / 2)
    assert m["mIoU"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert m["pixel_acc"] == pytest.approx(6 / 7)


def test_empty_confusion_matrix_and_bad_labels():
    m = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert m == {"mIoU": 0.0, "pixel_acc": 0.0, "mAcc": 0.0}
    with pytest.raises(ValueError, match="reduce_zero_label"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    # the ignore index is skipped whatever its value
    assert confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 3,
                            ignore_index=-1).sum() == 1


# --- backbone -------------------------------------------------------------------------------

def test_presets():
    assert PRESETS["detection"].window_size == (None, None, (14, 14), None)
    assert PRESETS["segmentation"].window_size == (None, None, None, None)
    assert PRESETS["detection"].pool_size == PRESETS["segmentation"].pool_size == 3
    b = build_backbone("tiny_moat_0", "detection")
    assert [blk.window for blk in b.stages[2]] == [(14, 14)] * len(b.stages[2])
    assert all(blk.window is None for blk in b.stages[3])
    assert all(blk.pool_size == 3 for stage in b.stages for blk in stage)
    with pytest.raises(ValueError, match="preset"):
        build_backbone("tiny_moat_0", "nope")


@pytest.mark.parametrize("size", [(200, 264), (61, 97)])
def test_windowed_backbone_at_sizes_the_window_does_not_divide(size):
    b = build_backbone("tiny_moat_0", "detection", out_indices=(0, 1, 2, 3, 4)).eval()
    with torch.no_grad():
        feats = b(torch.randn(1, 3, *size))
    assert b.strides == [2, 4, 8, 16, 32]
    assert b.out_channels == [32, 32, 64, 128, 256]
    for f, stride, chs in zip(feats, b.strides, b.out_channels):
        assert f.shape == (1, chs, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert torch.isfinite(f).all()
    # 200x264: the stride-16 map is 13x17, padded to two 14x14 windows
    named = b.forward_dict(torch.randn(1, 3, *size))
    assert list(named) == ["stage1", "stage2", "stage3", "stage4", "stage5"]


def test_output_stride_16():
    b = build_backbone("tiny_moat_0", out_indices=(1, 4), output_stride=16).eval()
    assert b.strides == [4, 16]
    with torch.no_grad():
        low, deep = b(torch.randn(1, 3, 96, 80))
    assert low.shape[-2:] == (24, 20) and deep.shape[-2:] == (6, 5)


def test_frozen_batch_norm_is_exact_and_keeps_eps():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_()
        bn.running_var.uniform_(0.01, 3)
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    x = torch.randn(2, 8, 5, 7)
    assert frozen.eps == 1e-3
    assert torch.equal(frozen(x), bn.eval()(x))  # bit-exact
    assert not list(frozen.parameters())
    # state dicts are interchangeable with BatchNorm2d's
    frozen.load_state_dict(bn.state_dict())
    torch.nn.BatchNorm2d(8, eps=1e-3).load_state_dict(frozen.state_dict())


def test_frozen_backbone_matches_unfrozen_outputs_exactly():
    ref = build_backbone("tiny_moat_0").eval()
    frozen = build_backbone("tiny_moat_0", freeze_bn=True, weights=ref.state_dict())
    frozen.train()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(ref(x), frozen(x)):
            assert torch.equal(a, b)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def test_frozen_stages_and_bn_get_no_gradient_and_keep_statistics():
    torch.manual_seed(0)
    b = build_backbone("tiny_moat_0", frozen_stages=2, drop_path_rate=0.2)
    b.train()  # the frozen parts must stay in eval mode anyway
    assert not b.stem.training and not b.stages[0].training and not b.stages[1].training
    assert b.stages[2].training and b.stages[3].training
    frozen_part = torch.nn.ModuleList([b.stem, b.stages[0], b.stages[1]])
    before_frozen, before_rest = _bn_state(frozen_part), _bn_state(b.stages[2])
    out = b(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in out).backward()
    for name, p in frozen_part.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert all(p.grad is not None for p in b.stages[3].parameters())
    after_frozen = _bn_state(frozen_part)
    assert all(torch.equal(before_frozen[k], after_frozen[k]) for k in before_frozen)
    after_rest = _bn_state(b.stages[2])
    assert any(not torch.equal(before_rest[k], after_rest[k]) for k in before_rest)

    # freeze_bn: every BN everywhere keeps its statistics in train mode
    fb = build_backbone("tiny_moat_0", freeze_bn=True)
    fb.train()
    before = {k: v.clone() for k, v in fb.state_dict().items()}
    sum(o.mean() for o in fb(torch.randn(2, 3, 64, 64))).backward()
    frozen_bns = [m for m in fb.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen_bns) > 20
    assert all(torch.equal(before[k], v) for k, v in fb.state_dict().items()
               if k.endswith(("running_mean", "running_var")))
    assert not any(p.requires_grad for m in frozen_bns for p in m.parameters())


def test_frozen_bn_still_loads_official_names(tmp_path):
    from moat.weights.official import to_official

    src = build_backbone("tiny_moat_0")
    with torch.no_grad():
        src.stages[1][0].pre_norm.running_mean.fill_(0.25)
    official = to_official(src)
    b = build_backbone("tiny_moat_0", freeze_bn=True, weights=official)
    assert isinstance(b.stages[1][0].pre_norm, FrozenBatchNorm2d)
    assert torch.all(b.stages[1][0].pre_norm.running_mean == 0.25)
    with batch_norm_thawed(b):  # BatchNorm2d inside (what official loaders look for) ...
        bn = b.stages[1][0].pre_norm
        assert type(bn) is torch.nn.BatchNorm2d and bn.eps == 1e-3 and not bn.training
        with torch.no_grad():
            bn.running_var.fill_(2.0)
    frozen = b.stages[1][0].pre_norm  # ... frozen again after, with the new values
    assert isinstance(frozen, FrozenBatchNorm2d) and torch.all(frozen.running_var == 2.0)

    # --init-from official weights into a segmentation model with frozen BN
    np.savez(tmp_path / "official.npz", **official)
    task, _ = _task(tmp_path, freeze_bn=True)
    task.build_datasets()
    model = task.build_model()
    assert "official" in task.load_pretrained(model, str(tmp_path / "official.npz"))
    loaded = model.backbone.stages[1][0].pre_norm
    assert isinstance(loaded, FrozenBatchNorm2d) and torch.all(loaded.running_mean == 0.25)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = build_backbone("tiny_moat_0", out_indices=(4,)).train()
    b = build_backbone("tiny_moat_0", out_indices=(4,), grad_checkpointing=True,
                       weights=a.state_dict()).train()
    x = torch.randn(2, 3, 64, 64)
    a(x)[0].sum().backward()
    b(x)[0].sum().backward()
    ga = torch.cat([p.grad.flatten() for p in a.parameters()])
    gb = torch.cat([p.grad.flatten() for p in b.parameters()])
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


# --- model and inference --------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 64), (33, 47), (97, 131), (17, 23)])
def test_deeplab_output_has_the_input_size(size):
    model = small_model(5)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)


def test_deeplab_with_windows_at_an_undivided_size():
    model = small_model(3, preset="detection")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 200, 264)).shape == (1, 3, 200, 264)


def test_sliding_window_equals_whole_image_when_the_window_covers_it():
    model = small_model(3)
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        whole = segment(model, x)
        assert torch.equal(segment(model, x, mode="slide", crop_size=(64, 96)), whole)
        assert torch.equal(segment(model, x, mode="slide", crop_size=(45, 70)), whole)
        slid = slide_inference(model, x, crop_size=32, stride=20)  # 2 x 3 overlapping windows
    assert slid.shape == whole.shape and torch.isfinite(slid).all()


def test_flip_test_averages_the_mirrored_prediction():
    model = small_model(3)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1)).flip(-1)) / 2
        torch.testing.assert_close(segment(model, x, flip=True), expected)
        resized = segment(model, x, flip=True, output_size=(80, 112))
    assert resized.shape[-2:] == (80, 112)


# --- data -----------------------------------------------------------------------------------

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


def _colour_coded(height: int, width: int, seed: int = 0):
    """An image whose colour encodes the mask's class (blocks of 8x8 pixels)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, (height // 8 + 1, width // 8 + 1))
    mask = np.kron(blocks, np.ones((8, 8), np.int64))[:height, :width]
    return COLOURS[mask], mask


def _decode(image: torch.Tensor, mean, std) -> np.ndarray:
    rgb = image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    rgb = (rgb.clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    return np.argmin(((rgb[:, :, None, :] - COLOURS[None, None].astype(np.float32)) ** 2)
                     .sum(-1), axis=-1)


def test_joint_augmentation_keeps_image_and_mask_aligned():
    from torchvision import tv_tensors

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    rgb, mask = _colour_coded(90, 120)
    image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
    target = tv_tensors.Mask(torch.from_numpy(mask))
    torch.manual_seed(0)
    # no resampling: crops (with padding) and flips must keep every pixel aligned exactly
    exact = segdata.train_transform((100, 64), scale=(1.0, 1.0), base_size=90, photometric=False,
                                    mean=mean, std=std)
    flipped = 0
    for _ in range(10):
        x, y = exact(image, target)
        assert x.shape == (3, 100, 64) and y.shape == (100, 64) and y.dtype == torch.long
        labelled = y != 255
        assert (~labelled).sum() == 10 * 64  # 90 rows padded to 100, padding is ignore
        assert np.array_equal(_decode(x, mean, std)[labelled.numpy()], y[labelled].numpy())
        flipped += not torch.equal(x, exact(image, target)[0])
    # random scale + photometric: nearest-neighbour mask vs antialiased image, so only pixels
    # next to a block edge may disagree
    scaled = segdata.train_transform(64, scale=(0.5, 2.0), base_size=90, mean=mean, std=std)
    for _ in range(10):
        x, y = scaled(image, target)
        labelled = (y != 255).numpy()
        agree = (_decode(x, mean, std) == y.numpy())[labelled].mean()
        assert agree > 0.8


def _palette_png(array: np.ndarray, path) -> None:
    img = Image.fromarray(array.astype(np.uint8))
    palette = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)
    img.putpalette(palette.reshape(-1).tolist())  # colours unrelated to the indices
    img.save(path)


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (4, 2), (10, 20, 30)).save(tmp_path / "images" / split / "a.jpg")
        _palette_png(np.array([[0, 1, 2, 150], [255, 3, 0, 1]]),
                     tmp_path / "annotations" / split / "a.png")
    layout = segdata.find_segmentation_splits(tmp_path)
    assert layout.name == "ade20k" and layout.reduce_zero_label and layout.val is not None
    train, val = segdata.segmentation_datasets(tmp_path, None, None)
    _, mask = val[0]
    assert mask.tolist() == [[255, 0, 1, 149], [255, 2, 255, 0]]
    # the raw mask is read as palette indices, not colours
    assert masks.read_mask(tmp_path / "annotations" / "training" / "a.png").tolist() == \
        [[0, 1, 2, 150], [255, 3, 0, 1]]
    # reduce_zero_label can be turned off
    raw, _ = segdata.segmentation_datasets(tmp_path, None, None, reduce_zero_label=False)
    assert raw[0][1].tolist() == [[0, 1, 2, 150], [255, 3, 0, 1]]


def test_folder_layout_pairs_by_stem_and_bad_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("b", "a"):
        Image.new("RGB", (6, 4)).save(tmp_path / "images" / f"{stem}.jpg")
        Image.fromarray(np.full((4, 6), 2, np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    (tmp_path / "images" / "c.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "masks" / "c.png")
    Image.new("RGB", (6, 4)).save(tmp_path / "images" / "d.png")
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "masks" / "d.png")
    layout = segdata.find_segmentation_splits(tmp_path)
    assert layout.name == "folder" and layout.val is None and not layout.reduce_zero_label
    ds, _ = segdata.segmentation_datasets(tmp_path, segdata.eval_transform(), None)
    assert [p[0].rsplit("/", 1)[-1] for p in ds.pairs] == ["a.jpg", "b.jpg", "c.png", "d.png"]
    batch = segdata.SegmentationCollate()([ds[i] for i in range(4)])
    assert batch.images.shape == (2, 3, 4, 6) and batch.masks.shape == (2, 4, 6)
    assert len(batch.bad) == 2 and "same size" in batch.bad[1].reason
    (tmp_path / "images" / "e.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no mask"):
        segdata.find_pairs(tmp_path / "images", tmp_path / "masks")
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb_mask.png")
    with pytest.raises(segdata.BadImageError, match="colour"):
        masks.read_mask(tmp_path / "rgb_mask.png")


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = write_segmentation_dataset(tmp_path / "a", train_size=4, val_size=2, img_size=48, seed=3)
    b = write_segmentation_dataset(tmp_path / "b", train_size=4, val_size=2, img_size=48, seed=3)
    assert a.classes == ["background", "circle", "square", "triangle", "cross"]
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            files = sorted((a.root / split / kind).iterdir())
            assert len(files) == a.counts[split]
            for f in files:
                assert f.read_bytes() == (b.root / split / kind / f.name).read_bytes()
    mask = masks.read_mask(a.root / "train" / "masks" / "00000.png")
    assert mask.shape == (48, 48) and mask.max() < a.num_classes
    assert Image.open(a.root / "train" / "masks" / "00000.png").mode == "P"
    # reused when identical, refused when the folder holds something else
    assert write_segmentation_dataset(tmp_path / "a", train_size=4, val_size=2, img_size=48,
                                      seed=3) == a
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_segmentation_dataset(tmp_path / "other")


# --- task -----------------------------------------------------------------------------------

def _task(tmp_path, **task_options):
    from moat.tasks.base import get_task
    from moat.train.config import TrainConfig

    data = write_segmentation_dataset(tmp_path / "data", train_size=6, val_size=3, img_size=48)
    options = dict(aspp_channels=16, decoder_channels=16, low_level_channels=8) | task_options
    config = TrainConfig(task="segmentation", model="tiny_moat_0", data=str(data.root),
                         img_size=48, pool_size=3, task_options=options)
    return get_task("segmentation")(config), data


def test_task_contract(tmp_path):
    task, data = _task(tmp_path)
    assert task.main_metric == "mIoU"
    train, val = task.build_datasets()
    assert task.num_classes == data.num_classes == 5  # from segmentation.json
    model = task.build_model()
    assert isinstance(task.backbone(model), MoatBackbone)
    collate = task.collate_fn(True)
    batch = collate([train[i] for i in range(3)])
    loss, logs = task.loss(model.train(), batch, torch.device("cpu"))
    loss.backward()
    assert loss.item() > 0 and isinstance(logs, dict)
    loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=task.collate_fn(False))
    metrics = task.evaluate(model.eval(), loader, torch.device("cpu"))
    assert 0 <= metrics["mIoU"] <= 1 and 0 <= metrics["pixel_acc"] <= 1
    task.options.inference, task.options.slide_crop, task.options.flip_test = "slide", 32, True
    assert set(task.evaluate(model, loader, torch.device("cpu"))) >= {"mIoU", "pixel_acc"}
    assert "mIoU" in task.format_metrics(metrics)
    # evaluation at another resolution: logits are resized to the (original) mask
    task.config.eval_img_size = 40
    resized = task.build_eval_dataset()
    assert resized[0][0].shape[-2:] == (40, 40) and resized[0][1].shape == (48, 48)
    loader = torch.utils.data.DataLoader(resized, batch_size=2, collate_fn=task.collate_fn(False))
    metrics = task.evaluate(model, loader, torch.device("cpu"))
    files = task.write_report(metrics, str(tmp_path / "report"))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["metrics.json", "per_class.csv",
                                                      "confusion.csv"]
    assert (tmp_path / "report" / "per_class.csv").read_text().startswith("class,IoU")


def test_task_predict_writes_mask_and_overlay(tmp_path):
    task, data = _task(tmp_path)
    task.build_datasets()
    model = task.build_model()
    path = data.root / "val" / "images" / "00000.png"
    out = task.predict(model, [str(path)], torch.device("cpu"), str(tmp_path / "pred"))
    assert len(out) == 1 and abs(sum(out[0]["classes"].values()) - 1) < 1e-4
    mask = Image.open(out[0]["mask"])
    assert mask.mode == "P" and mask.size == (48, 48)
    assert np.asarray(mask).max() < task.num_classes
    overlay = Image.open(out[0]["overlay"])
    # the overlay, then a legend of the predicted classes below it
    assert overlay.mode == "RGB" and overlay.width == 48 and overlay.height > 48


def _same_stem_folder(root: Path, images: list[Path]) -> Path:
    """root/a/img.png, root/b/img.png, ... (copies of `images`) and root/z/img.png, corrupt."""
    for sub, image in zip("abcdefgh", images):
        (root / sub).mkdir(parents=True)
        (root / sub / "img.png").write_bytes(image.read_bytes())
    (root / "z").mkdir()
    (root / "z" / "img.png").write_bytes(b"not a png")
    return root


def test_task_predict_names_same_stems_apart_and_reports_bad_images(tmp_path):
    from moat.train.eval_predict import expand_images

    task, data = _task(tmp_path)
    task.build_datasets()
    model = task.build_model()
    originals = [data.root / "val" / "images" / f"0000{i}.png" for i in range(2)]
    folder = _same_stem_folder(tmp_path / "in", originals)
    out = task.predict(model, expand_images([folder]), torch.device("cpu"), str(tmp_path / "pred"))
    assert [Path(r["path"]).parent.name for r in out] == ["a", "b", "z"]
    assert Path(out[0]["mask"]).name == "img_mask.png"
    assert Path(out[1]["mask"]).name == "img-2_mask.png"
    assert Path(out[1]["overlay"]).name == "img-2_overlay.png"
    assert "error" not in out[0] and set(out[2]) == {"path", "error"}
    assert "z/img.png" in out[2]["error"]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "img-2_mask.png", "img-2_overlay.png", "img_mask.png", "img_overlay.png"]
    # each file is its own input's: the same as predicting that image alone
    for result, original in zip(out, originals):
        alone = task.predict(model, [str(original)], torch.device("cpu"), str(tmp_path / "one"))[0]
        for key in ("mask", "overlay"):
            np.testing.assert_array_equal(np.asarray(Image.open(result[key])),
                                          np.asarray(Image.open(alone[key])))
    assert not np.array_equal(np.asarray(Image.open(out[0]["overlay"])),
                              np.asarray(Image.open(out[1]["overlay"])))


@pytest.mark.slow
def test_short_training_run_through_the_shared_loop(tmp_path):
    from moat.cli import main
    from moat.train.config import load_config
    from moat.train.eval_predict import evaluate_checkpoint, predict_checkpoint
    from moat.train.loop import train

    data = write_segmentation_dataset(tmp_path / "data", train_size=4, val_size=2, img_size=40)
    config = load_config(None, ["task_options.aspp_channels=16",
                                "task_options.decoder_channels=16",
                                "task_options.low_level_channels=8"],
                         task="segmentation", model="tiny_moat_0", data=str(data.root),
                         output=str(tmp_path / "run"), img_size=32, epochs=1, batch_size=2,
                         workers=0, progress=False, tensorboard=False, log_every_steps=1,
                         frozen_stages=0, ema=True)
    assert config.pool_size == 3 and config.mixup == 0  # the task's defaults
    result = train(config)
    assert set(result["metrics"]) >= {"mIoU", "pixel_acc", "mAcc"}
    assert config.num_classes == 5
    evaluation = evaluate_checkpoint(str(tmp_path / "run"), str(data.root), batch_size=2,
                                     workers=0)
    assert 0 <= evaluation["metrics"]["mIoU"] <= 1 and "mIoU" in evaluation["line"]
    image = data.root / "val" / "images" / "00001.png"
    out = predict_checkpoint([str(image)], str(tmp_path / "run"),
                             output_dir=str(tmp_path / "pred"))
    assert Image.open(out[0]["mask"]).size == (40, 40)
    assert (tmp_path / "pred" / "00001_overlay.png").is_file()
    # the command: one corrupt image among good ones is reported, the others written, exit 1
    folder = _same_stem_folder(tmp_path / "in", [image, data.root / "val" / "images" / "00000.png"])
    assert main(["predict", str(folder), "--checkpoint", str(tmp_path / "run"),
                 "--output-dir", str(tmp_path / "cli")]) == 1
    assert sorted(p.name for p in (tmp_path / "cli").glob("*_mask.png")) == [
        "img-2_mask.png", "img_mask.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli" / "img_mask.png")),
                                  np.asarray(Image.open(out[0]["mask"])))


class _ChannelsAsLogits(torch.nn.Module):
    """A fixed 'model': the image's channels are the logits of 3 classes."""

    def forward(self, x):
        return x


def _eval_batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for size in ((8, 10), (8, 10), (5, 7), (6, 6)):
        images = torch.randn(2, 3, *size, generator=g)
        masks = torch.randint(0, 3, (2, *size), generator=g)
        masks[:, 0] = 255
        batches.append(segdata.SegBatch(images, masks, []))
    return batches


def _seg_task(num_classes: int = 3):
    from moat.tasks.segmentation import SegmentationTask
    from moat.train.config import TrainConfig

    return SegmentationTask(TrainConfig(task="segmentation", num_classes=num_classes))


def _distributed_eval_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        metrics = _seg_task().evaluate(_ChannelsAsLogits(), iter(_eval_batches()[rank::world]),
                                       torch.device("cpu"))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluation_is_summed_across_processes(tmp_path):
    import json
    import socket

    expected = _seg_task().evaluate(_ChannelsAsLogits(), iter(_eval_batches()),
                                    torch.device("cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_distributed_eval_worker, args=(2, port, str(tmp_path)),
                                nprocs=2, join=True)
    for rank in (0, 1):  # each process saw half the batches; both report the whole set
        metrics = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert metrics == pytest.approx(expected)
