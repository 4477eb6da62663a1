"""What moat does with bad inputs outside training (issue 25): paths that are not regular
files, a cache folder that is a file, an empty batch, a run lock on a file system without
flock, calibration images that cannot be read, outputs that must never be half-written."""

from __future__ import annotations

import errno
import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import moat
from moat.errors import InvalidInputError
from moat.paths import folder, regular_file


def test_paths_name_what_is_there_instead(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("pipe.csv")
    with pytest.raises(InvalidInputError, match="list 'pipe.csv' is a FIFO .named pipe., not a "
                                                 "regular file"):
        regular_file("pipe.csv", "list")
    with pytest.raises(InvalidInputError, match="is a folder, not a regular file"):
        regular_file(tmp_path, "weights file")
    with pytest.raises(FileNotFoundError, match="images 'nothing' does not exist"):
        folder("nothing", "images")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="is a regular file, not a folder"):
        folder(tmp_path / "f.txt")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(FileNotFoundError, match="broken symbolic link"):
        regular_file(tmp_path / "link")
    assert regular_file(tmp_path / "f.txt") == tmp_path / "f.txt"


def test_moat_home_that_is_a_file_is_named(tmp_path, monkeypatch):
    from moat.weights.cache import moat_home

    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("MOAT_HOME", str(home))
    with pytest.raises(InvalidInputError, match=r"'.*home' \(\$MOAT_HOME\) is a file, not a "
                                                 r"folder: set MOAT_HOME to a folder"):
        moat_home()
    monkeypatch.setenv("MOAT_HOME", str(home / "cache"))
    with pytest.raises(InvalidInputError, match="lies under .*home', which is a file"):
        moat_home()
    monkeypatch.setenv("MOAT_HOME", str(tmp_path / "new" / "cache"))
    assert moat_home() == tmp_path / "new" / "cache"  # missing folders are fine


def test_empty_batch_is_a_message():
    model = moat.create_model("tiny_moat_0", num_classes=3).eval()
    with pytest.raises(InvalidInputError, match=r"empty batch \(shape \[0, 3, 32, 32\]\)"):
        model(torch.zeros(0, 3, 32, 32))


def _lock_without_flock(monkeypatch):
    import moat.train.lock as lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    return lock


def test_lock_of_another_host_is_never_taken_over_without_flock(tmp_path, monkeypatch):
    lock = _lock_without_flock(monkeypatch)
    record = json.dumps({"pid": 4242, "host": "other-host", "started": 0.0,
                         "command": "moat train"}) + "\n"
    (tmp_path / ".lock").write_text(record)
    with pytest.raises(lock.RunLockedError, match="process 4242 on other-host.*no flock.*"
                                                  "delete .*\\.lock"):
        lock.RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == record  # untouched
    # a lock left by a dead process of this host is still taken over; released, it is empty
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345,
                                                "host": socket.gethostname()}))
    with lock.RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_text() == ""


def test_calibration_skips_and_reports_unreadable_images(tmp_path, monkeypatch):
    """quantize reads its calibration images with the loader training uses: a decompression
    bomb or a file that is not an image is skipped and reported, not fatal."""
    from moat.export.quantize import calibration_batches

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2x: a "bomb"
    for name, size in (("a.png", 16), ("b.png", 16), ("c.png", 16), ("bomb.png", 64)):
        Image.new("RGB", (size, size), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "notes.png").write_text("not an image")
    os.mkfifo(tmp_path / "pipe.png")
    config = dict(input_size=[16, 16], mean=[0.5] * 3, std=[0.5] * 3,
                  interpolation="bilinear", crop_pct=1.0)
    skipped: dict[str, str] = {}
    batches = list(calibration_batches(tmp_path, config, batch=2, skipped=skipped))
    assert [b.shape for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    np.testing.assert_allclose(batches[0][0, 0], (200 / 255 - 0.5) / 0.5, atol=1e-6)
    assert sorted(os.path.basename(p) for p in skipped) == ["bomb.png", "notes.png", "pipe.png"]
    assert "DecompressionBomb" in skipped[str(tmp_path / "bomb.png")]
    # --max-images counts readable images: 2 means 2, whatever was skipped before them
    assert sum(len(b) for b in calibration_batches(tmp_path, config, max_images=2)) == 2
    with pytest.raises(InvalidInputError, match="--max-images must be >= 1, got 0"):
        next(calibration_batches(tmp_path, config, max_images=0))
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(InvalidInputError, match="none of the 5 image file.s. under .* could "
                                                 "be read .e.g. cannot read image .*a.png"):
        list(calibration_batches(tmp_path, config))


def test_mask_drawing_is_atomic(tmp_path, monkeypatch):
    from moat.tasks.segmentation.drawing import save_mask_png

    path = tmp_path / "x_mask.png"
    path.write_bytes(b"the previous mask")

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_mask_png(np.zeros((4, 4), dtype=np.int64), path, num_classes=3)
    assert path.read_bytes() == b"the previous mask"
    assert os.listdir(tmp_path) == ["x_mask.png"]


def test_detection_window_and_pool_size_are_the_training_settings():
    from moat.tasks.detection.options import DetectionOptions
    from moat.tasks.detection.task import DetectionTask

    for key in ("window_size", "pool_size"):
        with pytest.raises(InvalidInputError, match=f"{key} is a training setting: set it at "
                                                     "the top level"):
            DetectionOptions.from_dict({key: 3}, "detection")
    assert DetectionTask.config_defaults["pool_size"] == 3
