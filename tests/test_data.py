"""Tests for moat.data: image loading, datasets, loaders, samplers, transforms, demo data."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from moat.data.bad_images import BadImageLog
from moat.data.classification import (
    CsvDataset,
    ImageFolderDataset,
    SkipBadCollate,
    classification_datasets,
    scan_for_bad_images,
)
from moat.data.images import BadImageError, load_rgb
from moat.data.samplers import ResumableSampler, ShardSampler
from moat.data.synthetic import write_shapes_dataset
from moat.data.transforms import (
    classification_loss,
    eval_resize_size,
    eval_transform,
    mixup_cutmix,
    train_transform,
)
from moat.train.loaders import eval_loader, set_epoch, train_loader

RNG = np.random.default_rng(0)


def _rgb_array(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb_array(64, 64)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb_array(64, 64)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- images.py


def test_truncated_loading_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "RGB"])
def test_plain_modes_become_rgb(tmp_path, mode):
    img = Image.fromarray(_rgb_array()).convert(mode)
    ext = "jpg" if mode in ("CMYK", "YCbCr") else "png"
    if mode == "YCbCr":
        ext = "jpg"
        img = img.convert("RGB")  # JPEG stores YCbCr internally; reopened as RGB
    out = load_rgb(_save(tmp_path / f"x.{ext}", img))
    assert out.mode == "RGB" and out.size == (32, 24)


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(arr))
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_rgb(path))
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [100, 200]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_32bit_int_and_float_grey(tmp_path):
    i32 = Image.new("I", (2, 1))
    i32.putpixel((1, 0), 65535)
    out = np.asarray(load_rgb(_save(tmp_path / "i.tif", i32)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255])
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    out = np.asarray(load_rgb(_save(tmp_path / "f.tif", f)))
    np.testing.assert_array_equal(out[0, :, 1], [0, 128, 255])


def test_alpha_is_composited_on_white(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque
    arr[0, 1] = (0, 0, 0, 0)  # transparent black -> white
    arr[1, 0] = (0, 0, 0, 128)  # half transparent black -> mid grey
    out = np.asarray(load_rgb(_save(tmp_path / "a.png", Image.fromarray(arr, "RGBA"))))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert 120 <= out[1, 0, 0] <= 135
    la = Image.fromarray(arr[..., [0, 3]], "LA")
    assert tuple(np.asarray(load_rgb(_save(tmp_path / "la.png", la)))[0, 1]) == (255, 255, 255)
    black = np.asarray(load_rgb(tmp_path / "a.png", background=(0, 0, 0)))
    assert tuple(black[0, 1]) == (0, 0, 0)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1
    path = _save(tmp_path / "p.png", img, transparency=1)
    out = np.asarray(load_rgb(path))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)  # the transparent index, not its palette black
    gif = np.asarray(load_rgb(_save(tmp_path / "p.gif", img, transparency=1)))
    assert tuple(gif[0, 1]) == (255, 255, 255)
    keyed = Image.fromarray(np.array([[[9, 9, 9], [1, 2, 3]]], dtype=np.uint8))
    out = np.asarray(load_rgb(_save(tmp_path / "key.png", keyed, transparency=(1, 2, 3))))
    assert tuple(out[0, 0]) == (9, 9, 9) and tuple(out[0, 1]) == (255, 255, 255)
    grey = np.asarray(load_rgb(_save(tmp_path / "key_l.png", keyed.convert("L"),
                                     transparency=2)))
    assert tuple(grey[0, 1]) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(_rgb_array(10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    path = _save(tmp_path / "o.jpg", img, exif=exif)
    assert load_rgb(path).size == (10, 20)
    assert load_rgb(path, exif_transpose=False).size == (20, 10)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"hello, I am text", "not in an image format"),
    (_jpeg_bytes()[:700], "truncated"),
    (_png_bytes()[:-300], "truncated"),
    (_png_bytes()[:2000] + bytes(100) + _png_bytes()[2100:], "broken data stream"),
    (_jpeg_bytes()[:1000] + bytes(range(256)) * 2 + _jpeg_bytes()[1512:], "broken data stream"),
    (_jpeg_bytes()[:20] + bytes(300) + _jpeg_bytes()[320:], "not in an image format"),
])
def test_bad_files_raise_bad_image_error(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as info:
        load_rgb(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_missing_file_is_bad_image(tmp_path):
    with pytest.raises(BadImageError, match="not found"):
        load_rgb(tmp_path / "nope.jpg")


# ---------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, train_per_class=4, val_per_class=2, img_size=32, seed=1)
    return root


def _folder_with_bad_files(root: Path) -> tuple[Path, set[str]]:
    """train/ with 3 classes x 4 good images plus bad ones and non-image clutter."""
    for c in ("cat", "dog", "fox"):
        for i in range(4):
            _save(root / c / f"{i}.png", Image.fromarray(_rgb_array()))
    bad = {
        root / "cat" / "corrupt.jpg": bytes(RNG.integers(0, 256, 500, dtype=np.uint8)),
        root / "dog" / "truncated.jpg": _jpeg_bytes()[:600],
        root / "dog" / "truncated.png": _png_bytes()[:-200],
        root / "fox" / "empty.png": b"",
        root / "fox" / "text.jpeg": b"<html>not an image</html>",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "dog" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("top-level files are not classes")
    return root, {str(p) for p in bad}


def test_scan_ignores_non_image_files(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path / "train")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["cat", "dog", "fox"]
    paths = {p for p, _ in ds.samples}
    assert len(ds) == 12 + len(bad) and bad <= paths
    assert not any(p.endswith((".txt", ".DS_Store", "._0.png")) for p in paths)


def test_bad_files_skipped_and_reported_through_workers(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path / "train")
    ds = ImageFolderDataset(root, transform=eval_transform(16, crop_pct=1.0))
    train = eval_loader(ds, 4, collate_fn=SkipBadCollate(), workers=2, pin_memory=False)
    seen, reported = 0, BadImageLog()
    for images, targets, bad_samples in train:
        assert images.shape[0] == targets.shape[0]
        if len(targets):
            assert images.shape[1:] == (3, 16, 16)
        seen += len(targets)
        reported.add(bad_samples)
    assert seen == 12
    assert set(reported.paths) == bad and reported.count == len(bad)
    assert all(path in reason for path, reason in reported.paths.items())
    assert {b.path for b in scan_for_bad_images(ds, num_workers=2)} == bad


def test_strict_makes_bad_file_fatal(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path / "train")
    ds = ImageFolderDataset(root, transform=eval_transform(16, crop_pct=1.0), strict=True)
    bad_index = next(i for i in range(len(ds)) if ds.path(i) in bad)
    with pytest.raises(BadImageError, match="strict"):
        ds[bad_index]
    train = train_loader(ds, 4, collate_fn=SkipBadCollate(), workers=2, seed=0, pin_memory=False)
    with pytest.raises(BadImageError) as info:
        for _ in train:
            pass
    assert any(p in str(info.value) for p in bad)


def test_train_val_folders_share_classes(shapes):
    train, val = classification_datasets(shapes)
    assert train.classes == val.classes and len(train.classes) == 10
    assert len(train) == 40 and len(val) == 20
    names = {Path(p).parent.name: t for p, t in val.samples}
    assert all(val.classes[t] == name for name, t in names.items())


def test_val_missing_class_ok_unknown_class_errors(tmp_path):
    for c in ("a", "b", "c"):
        _save(tmp_path / "train" / c / "0.png", Image.fromarray(_rgb_array()))
    _save(tmp_path / "val" / "c" / "0.png", Image.fromarray(_rgb_array()))
    train, val = classification_datasets(tmp_path)
    assert val.samples[0][1] == 2 and val.classes == ["a", "b", "c"]
    _save(tmp_path / "val" / "zebra" / "0.png", Image.fromarray(_rgb_array()))
    with pytest.raises(ValueError, match="zebra"):
        classification_datasets(tmp_path)


def test_empty_train_class_errors(tmp_path):
    _save(tmp_path / "a" / "0.png", Image.fromarray(_rgb_array()))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="b"):
        ImageFolderDataset(tmp_path)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("path,label\n" + "".join(f"{p},{lbl}\n" for p, lbl in rows))
    return path


def test_csv_dataset_names_and_indices(tmp_path):
    for i in range(4):
        _save(tmp_path / "img" / f"{i}.jpg", Image.fromarray(_rgb_array()))
    train = CsvDataset(_write_csv(tmp_path / "train.csv", [
        ("img/0.jpg", "dog"), ("img/1.jpg", "cat"), ("img/2.jpg", "dog")]))
    assert train.classes == ["cat", "dog"] and train.targets == [1, 0, 1]
    assert Path(train.samples[0][0]) == tmp_path / "img" / "0.jpg"
    img, target = train[1]
    assert img.mode == "RGB" and target == 0
    val = CsvDataset(_write_csv(tmp_path / "val.csv", [("img/3.jpg", "cat")]),
                     classes=train.classes)
    assert val.targets == [0]
    ints = CsvDataset(_write_csv(tmp_path / "ints.csv", [("img/0.jpg", "2"), ("img/1.jpg", "0")]))
    assert ints.targets == [2, 0] and ints.classes == ["0", "1", "2"]
    as_index = CsvDataset(tmp_path / "ints.csv", classes=["x", "y", "z"])
    assert as_index.targets == [2, 0]
    train2, val2 = classification_datasets(tmp_path)  # train.csv + val.csv in one folder
    assert train2.classes == ["cat", "dog"] and val2.targets == [0]


def test_csv_errors(tmp_path):
    _save(tmp_path / "0.png", Image.fromarray(_rgb_array()))
    with pytest.raises(ValueError, match="lion"):
        CsvDataset(_write_csv(tmp_path / "v.csv", [("0.png", "lion")]), classes=["cat"])
    with pytest.raises(ValueError, match="only 1 classes"):
        CsvDataset(_write_csv(tmp_path / "v.csv", [("0.png", "3")]), classes=["cat"])
    (tmp_path / "nohead.csv").write_text("0.png,cat\n")
    with pytest.raises(ValueError, match="header"):
        CsvDataset(tmp_path / "nohead.csv")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        CsvDataset(_write_csv(tmp_path / "m.csv", [("0.png", "a"), ("missing.png", "b")]))


# ---------------------------------------------------------------- samplers and loaders


def test_resumable_sampler_order_and_skip():
    data = list(range(103))
    s = ResumableSampler(data, seed=3)
    s.set_epoch(5)
    first = list(s)
    assert sorted(first) == data and first != data
    again = ResumableSampler(data, seed=3)
    again.set_epoch(5)
    assert list(again) == first
    again.set_epoch(6)
    assert list(again) != first
    again.set_epoch(5)
    again.skip(40)
    assert list(again) == first[40:] and len(again) == 63
    again.set_epoch(5)  # a new epoch starts from the beginning again
    assert list(again) == first


def test_distributed_partition_covers_dataset():
    data = list(range(101))
    parts = []
    for rank in (0, 1):
        s = ResumableSampler(data, seed=0, num_replicas=2, rank=rank)
        s.set_epoch(2)
        parts.append(list(s))
    assert len(parts[0]) == len(parts[1]) == 51  # padded to equal length
    assert set(parts[0]) | set(parts[1]) == set(data)
    shards = [list(ShardSampler(data, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == data  # every val sample exactly once


def test_loader_skip_batches_yields_exact_tail(shapes):
    train_set, val_set = classification_datasets(
        shapes, train_transform=train_transform(16, randaugment=(2, 9), random_erasing=0.25),
        val_transform=eval_transform(16))
    loaders = [train_loader(train_set, 6, collate_fn=SkipBadCollate(), workers=2, seed=7,
                            pin_memory=False) for _ in range(2)]
    for loader in loaders:
        assert not loader.pin_memory and loader.persistent_workers
    set_epoch(loaders[0], 1)
    full = list(loaders[0])
    set_epoch(loaders[1], 1)
    again = list(loaders[1])
    assert len(full) == 40 // 6  # drop_last
    for a, b in zip(full, again):  # same seed -> same order and same augmentation
        assert torch.equal(a.targets, b.targets) and torch.equal(a.images, b.images)
    set_epoch(loaders[1], 1, skip_batches=2)
    tail = list(loaders[1])
    assert len(tail) == len(full) - 2
    assert all(torch.equal(a.targets, b.targets) and torch.equal(a.images, b.images)
               for a, b in zip(full[2:], tail))  # per-sample seeding: the same augmentation
    set_epoch(loaders[1], 2)
    assert [b.targets.tolist() for b in loaders[1]] != [b.targets.tolist() for b in full]


# ---------------------------------------------------------------- transforms


def test_transforms_shapes_and_dtypes():
    img = Image.fromarray(_rgb_array(50, 70))
    for tf in (train_transform(32), train_transform(32, randaugment=None, random_erasing=1.0),
               eval_transform(32), eval_transform((32, 40), crop_pct=0.9)):
        out = tf(img)
        assert out.dtype == torch.float32 and out.shape[0] == 3
    assert eval_transform((32, 40))(img).shape == (3, 32, 40)
    assert train_transform(32)(img).shape == (3, 32, 32)
    assert eval_resize_size(224, 0.875) == 256 and eval_resize_size(384, 1.0) == 384
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(32, interpolation="cubic-ish")


def test_eval_transform_normalizes():
    img = Image.new("RGB", (40, 40), (124, 116, 104))
    out = eval_transform(32)(img)
    assert out.abs().max() < 0.02  # the ImageNet mean colour maps to ~0


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    targets = torch.arange(8) % 5
    mixer = mixup_cutmix(5, mixup, cutmix, label_smoothing=0.1)
    out, soft = mixer(images, targets)
    assert out.shape == images.shape and soft.shape == (8, 5)
    torch.testing.assert_close(soft.sum(-1), torch.ones(8))
    assert soft.min() >= 0.1 / 5 - 1e-6  # smoothing folded in
    loss = classification_loss(0.1, mixing=True)(torch.randn(8, 5), soft)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert mixup_cutmix(5, 0.0, 0.0) is None


def test_loss_without_mixing_smooths_hard_labels():
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    smooth = classification_loss(0.1)(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    torch.testing.assert_close(smooth, expected)
    soft = torch.full((4, 3), 0.1 / 3) + 0.9 * torch.nn.functional.one_hot(targets, 3)
    torch.testing.assert_close(classification_loss(mixing=True)(logits, soft), expected)


def test_mixing_in_loader_workers(shapes):
    train_set, _ = classification_datasets(shapes, train_transform=train_transform(16))
    mixer = mixup_cutmix(len(train_set.classes), 0.8, 1.0, 0.1)
    train = train_loader(train_set, 8, collate_fn=SkipBadCollate(mixer), workers=2, seed=0,
                         pin_memory=False)
    set_epoch(train, 0)
    batch = next(iter(train))
    assert batch.targets.shape == (8, 10) and batch.images.shape == (8, 3, 16, 16)


# ---------------------------------------------------------------- synthetic


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_dataset_deterministic_and_counted(tmp_path):
    a = write_shapes_dataset(tmp_path / "a", train_per_class=3, val_per_class=2, img_size=48,
                             seed=5)
    write_shapes_dataset(tmp_path / "b", train_per_class=3, val_per_class=2, img_size=48, seed=5)
    write_shapes_dataset(tmp_path / "c", train_per_class=3, val_per_class=2, img_size=48, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert len(a.classes) >= 10 and a.counts == {"train": 30, "val": 20}
    for split, n in (("train", 3), ("val", 2)):
        for c in a.classes:
            files = list((tmp_path / "a" / split / c).iterdir())
            assert len(files) == n
    assert load_rgb(files[0]).size == (48, 48)
    train, val = classification_datasets(a.root)
    assert train.classes == sorted(a.classes) and len(train) == 30 and len(val) == 20


def test_shapes_dataset_reuse_and_refuse(tmp_path):
    write_shapes_dataset(tmp_path / "d", num_classes=10, train_per_class=2, val_per_class=1)
    before = _digest(tmp_path / "d")
    write_shapes_dataset(tmp_path / "d", num_classes=10, train_per_class=2, val_per_class=1)
    assert _digest(tmp_path / "d") == before
    small = write_shapes_dataset(tmp_path / "d", num_classes=3, train_per_class=1,
                                 val_per_class=1, image_format="jpeg")
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == sorted(small.classes)
    assert all(p.suffix == ".jpg" for p in (tmp_path / "d" / "train").rglob("*.*"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError):
        write_shapes_dataset(tmp_path / "user")
