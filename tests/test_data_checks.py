"""Safe folder walking (moat/data/folders.py) and the refusal of data that cannot train
(moat/data/checks.py), on small real PNG files."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moat.data.checks import DataError, check_classification_splits
from moat.data.classification import ImageFolderDataset, classification_datasets
from moat.data.folders import output_names, walk_files
from moat.data.images import BadImageError, load_rgb


def _images(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _split(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        _images(root / name, n)
    return root


def test_link_to_a_parent_inside_a_class_is_not_followed(tmp_path):
    train = _split(tmp_path / "train", {"cat": 3, "dog": 3})
    os.symlink("..", train / "cat" / "up")            # -> train: would relabel every dog
    os.symlink(".", train / "dog" / "self")           # -> dog itself: a loop
    os.symlink(str(tmp_path), train / "cat" / "top")  # -> above the data
    os.symlink("../dog", train / "cat" / "other")     # -> another class's folder
    dataset = ImageFolderDataset(train)
    assert len(dataset) == 6
    assert sorted(dataset.targets) == [0, 0, 0, 1, 1, 1]
    assert all(Path(p).parent.name == dataset.classes[t] for p, t in dataset.samples)
    reasons = {Path(s.path).name: s.reason for s in dataset.skipped}
    assert set(reasons) == {"up", "self", "top", "other"}
    assert "loop" in reasons["self"] and "outside" in reasons["up"]


def test_class_folder_linking_above_the_data_is_skipped(tmp_path):
    train = _split(tmp_path / "train", {"cat": 2, "dog": 2})
    os.symlink("..", train / "zzz")  # a "class" that is the whole split again
    dataset = ImageFolderDataset(train)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4


def test_link_inside_the_class_is_followed_once(tmp_path):
    train = _split(tmp_path / "train", {"cat": 2, "dog": 2})
    _images(train / "cat" / "more", 2, seed=1)
    os.symlink("more", train / "cat" / "alias")
    files, skipped = walk_files(train / "cat")
    assert len(files) == 4 and len(skipped) == 1  # 'more' read once, through one name


def test_output_names_are_unique_among_the_inputs():
    assert output_names(["x/a.jpg", "x/b.png", "y/c"]) == ["a", "b", "c"]  # stems, as before
    paths = ["x/a/cat.jpg", "x/b/cat.jpg", "x/cat-2.png", "x/Cat.png", "x/cat.png", "x/dog.jpg"]
    # the first keeps its stem; 'cat-2' is another input's stem, and case does not make a
    # name distinct (macOS and Windows file systems ignore it)
    assert output_names(paths) == ["cat", "cat-3", "cat-2", "Cat-4", "cat-5", "dog"]
    assert output_names([]) == []


def test_fifo_and_device_named_like_images_are_skipped_and_reported(tmp_path, caplog):
    train = _split(tmp_path / "train", {"cat": 2, "dog": 2})
    os.mkfifo(train / "cat" / "x.png")
    os.symlink("/dev/zero", train / "dog" / "zero.jpg")
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(train)
    assert len(dataset) == 4
    reasons = sorted(s.reason for s in dataset.skipped)
    assert "FIFO" in reasons[0] and "device" in reasons[1]
    assert "x.png" in caplog.text and "zero.jpg" in caplog.text
    # and the reader itself never blocks on one (e.g. `moat predict x.png`)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("err", _read(train / "cat" / "x.png")))
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and "not a regular file" in result["err"]


def _read(path: Path) -> str:
    try:
        load_rgb(path)
    except BadImageError as err:
        return str(err)
    return "read"


def _datasets(root: Path):
    return classification_datasets(root)


def test_one_class_is_refused(tmp_path):
    _split(tmp_path / "train", {"cat": 4})
    _split(tmp_path / "val", {"cat": 2})
    with pytest.raises(DataError, match="one class .'cat'.*at least two"):
        check_classification_splits(*_datasets(tmp_path))


def test_split_without_a_readable_image_is_refused(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / name / f"{i}.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"no file of the training split .* can be read.*6 tried"):
        check_classification_splits(*_datasets(tmp_path))
    _split(tmp_path / "train", {"cat": 1, "dog": 1})  # training fine now, val still not
    with pytest.raises(DataError, match="no file of the validation split"):
        check_classification_splits(*_datasets(tmp_path))


def test_classes_missing_from_either_split_are_named(tmp_path):
    _split(tmp_path / "train", {"cat": 2, "dog": 2, "owl": 2})
    _split(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="validation split .* no images of class.*'owl'"):
        check_classification_splits(*_datasets(tmp_path))
    _split(tmp_path / "val", {"owl": 1, "yak": 1})
    with pytest.raises(ValueError, match="class folders the training set does not have: 'yak'"):
        _datasets(tmp_path)


def test_empty_training_class_is_refused(tmp_path):
    _split(tmp_path / "train", {"cat": 2, "dog": 2})
    (tmp_path / "train" / "owl").mkdir()
    with pytest.raises(FileNotFoundError, match="owl' has no image files"):
        classification_datasets(tmp_path / "train")
    # CSV labels given as indices can leave a class without images too
    csv = tmp_path / "train.csv"
    csv.write_text("path,label\ntrain/cat/0.png,0\ntrain/dog/0.png,2\n")
    with pytest.raises(DataError, match="no images of class.*'1'"):
        check_classification_splits(classification_datasets(csv)[0])


def test_strong_imbalance_warns(tmp_path, caplog):
    _split(tmp_path / "train", {"cat": 20, "dog": 2})
    with caplog.at_level(logging.WARNING, logger="moat"):
        check_classification_splits(classification_datasets(tmp_path / "train")[0])
    assert "strongly unbalanced" in caplog.text and "'cat' has 20" in caplog.text
    caplog.clear()
    _split(tmp_path / "even", {"cat": 5, "dog": 4})
    with caplog.at_level(logging.WARNING, logger="moat"):
        check_classification_splits(classification_datasets(tmp_path / "even")[0])
    assert "unbalanced" not in caplog.text
