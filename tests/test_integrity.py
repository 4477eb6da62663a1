"""Verified files: damaged weights files and checkpoints are named or fallen back from, never
loaded; outputs are atomic (moat/integrity.py, moat/train/checkpoint.py, moat/weights/files.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

import moat
from moat.integrity import DamagedFileError, HashingWriter, atomic_output, file_sha256, \
    read_safetensors, read_verified, tensors_digest, write_safetensors
from moat.train.checkpoint import CheckpointManager, read_state, read_weights, \
    resolve_checkpoint
from moat.weights import load_weights, save_weights


def _flip(path: Path, offset: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def _save(manager: CheckpointManager, step: int) -> Path:
    torch.manual_seed(step)
    model = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    return manager.save(step, model=model, ema={k: v * 0.5 for k, v in model.items()},
                        state={"optimizer": {"step": torch.tensor(step)}}, meta={"epoch": step},
                        weights_metadata={"format": "test"})


def test_flipped_bytes_in_weights_file_are_refused(tmp_path):
    model = moat.create_model("tiny_moat_0", num_classes=3)
    path = save_weights(tmp_path / "w.safetensors", model.state_dict())
    load_weights(moat.create_model("tiny_moat_0", num_classes=3), path)  # intact: loads
    _flip(path, path.stat().st_size - 4000)  # 8 bytes inside the tensor data
    with pytest.raises(DamagedFileError, match=r"w\.safetensors.*differs"):
        load_weights(moat.create_model("tiny_moat_0", num_classes=3), path)


def test_truncated_weights_file_names_itself(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", {"x": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DamagedFileError, match=r"w\.safetensors: not a readable safetensors"):
        read_safetensors(path)


def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path)
    first = _save(manager, 1)
    second = _save(manager, 2)
    ema = second / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="moat"):
        assert manager.latest_intact() == first
    assert "step-000000002 is damaged" in caplog.text and "ema.safetensors" in caplog.text
    assert resolve_checkpoint(tmp_path) == first  # a run folder: the previous intact one
    with pytest.raises(DamagedFileError, match="ema.safetensors: size is 100 bytes"):
        resolve_checkpoint(second)  # named explicitly: an error naming the file


@pytest.mark.parametrize("damage", ["empty state", "flipped model", "corrupt meta",
                                    "edited meta", "missing file"])
def test_each_kind_of_damage_is_detected(tmp_path, damage):
    manager = CheckpointManager(tmp_path)
    first = _save(manager, 1)
    second = _save(manager, 2)
    if damage == "empty state":
        (second / "state.pt").write_bytes(b"")
    elif damage == "flipped model":
        _flip(second / "model.safetensors", (second / "model.safetensors").stat().st_size - 64)
    elif damage == "corrupt meta":
        (second / "meta.json").write_text("{not json")
    elif damage == "edited meta":  # valid JSON, one value changed
        meta = json.loads((second / "meta.json").read_text())
        meta["epoch"] = 7
        (second / "meta.json").write_text(json.dumps(meta))
    else:
        (second / "state.pt").unlink()
    assert manager.latest_intact() == first


def test_unreadable_state_is_a_damaged_file_not_a_pickle_hint(tmp_path):
    manager = CheckpointManager(tmp_path)
    ckpt = _save(manager, 1)
    (ckpt / "state.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DamagedFileError, match="state.pt") as info:
        read_state(ckpt)
    assert "weights_only=False" not in str(info.value)


def test_checkpoint_weights_are_verified_on_read(tmp_path):
    ckpt = _save(CheckpointManager(tmp_path), 1)
    path = ckpt / "model.safetensors"
    _flip(path, path.stat().st_size - 32)
    with pytest.raises(DamagedFileError, match="model.safetensors"):
        read_weights(ckpt, "model")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_text("previous")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("exporter failed")
    assert target.read_text() == "previous" and sorted(tmp_path.iterdir()) == [target]
    with atomic_output(tmp_path / "new.txt") as tmp:
        tmp.write_text("done")
    assert (tmp_path / "new.txt").read_text() == "done"


def test_streamed_safetensors_file_is_what_the_library_reads(tmp_path):
    """write_safetensors (one stream, digest patched into the header) writes a file the
    safetensors library reads back exactly, whose digest is the one computed from the tensors
    themselves, and whose manifest record is the sha256 of its header."""
    from safetensors import safe_open

    tensors = {"b.w": torch.randn(5, 3), "a.half": torch.randn(7).half(),
               "c.count": torch.tensor(3), "d.mask": torch.tensor([True, False]),
               "e.bf16": torch.randn(2, 2).bfloat16(), "f.empty": torch.zeros(0, 4)}
    path = tmp_path / "w.safetensors"
    with open(path, "wb") as f:
        record = write_safetensors(f, tensors, {"task": "test"})
    data = path.read_bytes()
    assert record["size"] == len(data)
    n = int.from_bytes(data[:8], "little")
    assert record["header_sha256"] == hashlib.sha256(data[:8 + n]).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"task": "test", **tensors_digest(tensors)}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t) and f.get_tensor(name).dtype == t.dtype
    assert read_verified(path, record) == data


def test_hashing_writer_records_the_file_it_wrote(tmp_path):
    path = tmp_path / "state.pt"
    state = {"big": torch.randn(600_000), "small": torch.tensor([1, 2])}  # one block > 1 MiB
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        torch.save(state, writer)
    assert writer.record() == {"size": path.stat().st_size, "sha256": file_sha256(path)}
    assert torch.equal(torch.load(path, weights_only=True)["big"], state["big"])


def test_flipped_byte_in_a_checkpoint_weights_header_is_detected(tmp_path):
    """The header (metadata such as class names) is covered by the manifest, the tensors by
    the digest in the header: a change in either is refused on load and on verification."""
    manager = CheckpointManager(tmp_path)
    ckpt = manager.save(1, model={"w": torch.ones(4)}, ema=None, state={},
                        meta={}, weights_metadata={"classes": "cat,dog"})
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes().replace(b"cat,dog", b"cat,dug"))
    with pytest.raises(DamagedFileError, match=r"model\.safetensors: header differs"):
        read_weights(ckpt, "model")
    assert manager.latest_intact() is None
