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
from moat.integrity import DamagedFileError, atomic_output, read_safetensors, read_verified, \
    seal_json, tensors_digest, write_safetensors
from moat.train.checkpoint import Checkpoint, CheckpointManager, read_state, read_weights, \
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


def test_threaded_safetensors_files_are_what_the_library_reads(tmp_path):
    """write_safetensors (tensors hashed and written by threads, the digest in the header
    written last) writes files the safetensors library reads back exactly, whose digest is
    the one computed from the tensors themselves, and whose manifest record is the sha256 of
    the header. The large tensors span several blocks and jobs, shared by the threads."""
    from safetensors import safe_open

    torch.manual_seed(0)
    first = {"b.w": torch.randn(5, 3), "a.half": torch.randn(7).half(),
             "c.count": torch.tensor(3), "d.mask": torch.tensor([True, False]),
             "e.bf16": torch.randn(2, 2).bfloat16(), "f.empty": torch.zeros(0, 4),
             "g.big": torch.randn(1_500_000), "h.t": torch.randn(300, 2000).t()}
    second = {"x": torch.arange(2_000_000), "y": torch.ones(3)}
    paths = [tmp_path / "first.safetensors", tmp_path / "second.safetensors"]
    records = write_safetensors({paths[0]: (first, {"task": "test"}), paths[1]: (second, None)})
    for path, tensors, metadata in ((paths[0], first, {"task": "test"}), (paths[1], second, {})):
        data = path.read_bytes()
        assert records[path]["size"] == len(data)
        n = int.from_bytes(data[:8], "little")
        assert records[path]["header_sha256"] == hashlib.sha256(data[:8 + n]).hexdigest()
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {**metadata, **tensors_digest(tensors)}
            for name, t in tensors.items():
                assert torch.equal(f.get_tensor(name), t) and f.get_tensor(name).dtype == t.dtype
        assert read_verified(path, records[path]) == data


def test_per_tensor_digest_is_the_sha256_of_the_tensors_checksums(tmp_path):
    """The known answer, computed here with hashlib and xxhash alone: sha256 over each
    tensor's "name|dtype|shape|" and the XXH3-128 of its bytes, in name order."""
    import xxhash

    tensors = {"b": torch.arange(4, dtype=torch.int32), "a": torch.tensor([1.5])}
    expected = hashlib.sha256(
        b"a|torch.float32|(1,)|" + xxhash.xxh3_128(tensors["a"].numpy().tobytes()).digest()
        + b"b|torch.int32|(4,)|" + xxhash.xxh3_128(tensors["b"].numpy().tobytes()).digest())
    assert tensors_digest(tensors) == {"tensors_xxh3_per_tensor": expected.hexdigest(),
                                       "tensors_bytes": "20"}


def _one_stream_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A weights file as moat wrote them before the per-tensor digest: the sha256 of one
    stream over every tensor's name, dtype, shape and bytes (computed here by hand)."""
    from safetensors.torch import save_file

    digest, total = hashlib.sha256(), 0
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + t.numpy().tobytes())
        total += t.numel() * t.element_size()
    save_file(tensors, str(path), {"tensors_sha256": digest.hexdigest(),
                                   "tensors_bytes": str(total), "format": "test"})


def test_weights_file_with_the_older_one_stream_digest_is_verified(tmp_path):
    path = tmp_path / "old.safetensors"
    tensors = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    _one_stream_file(path, tensors)
    loaded, metadata = read_safetensors(path)
    assert torch.equal(loaded["w"], tensors["w"]) and metadata["format"] == "test"
    _flip(path, path.stat().st_size - 100)
    with pytest.raises(DamagedFileError, match=r"old\.safetensors: tensor data differs"):
        read_safetensors(path)


def _old_checkpoint(folder: Path) -> dict:
    """A checkpoint as written before state.safetensors and the per-tensor digest: every
    tensor of the state pickled in state.pt, one-stream digests in the weights files."""
    import io

    folder.mkdir(parents=True)
    model = {"w": torch.randn(8, 8), "b": torch.randn(8)}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.randn(8, 8)}}, "param_groups": []},
             "rng": [{"torch": torch.get_rng_state()}], "best": 0.5}
    files = {}
    for name, tensors in (("model.safetensors", model), ("ema.safetensors", model)):
        _one_stream_file(folder / name, tensors)
        data = (folder / name).read_bytes()
        n = int.from_bytes(data[:8], "little")
        files[name] = {"size": len(data), "header_sha256": hashlib.sha256(data[:8 + n]).hexdigest()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (folder / "state.pt").write_bytes(buffer.getvalue())
    files["state.pt"] = {"size": buffer.tell(),
                         "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    meta = seal_json({"step": 1, "epoch": 1, "name": folder.name, "files": files})
    (folder / "meta.json").write_text(json.dumps(meta))
    return {"model": model, "state": state}


def test_checkpoint_written_before_state_safetensors_still_loads(tmp_path):
    manager = CheckpointManager(tmp_path)
    old = _old_checkpoint(manager.dir / "step-000000001")
    assert manager.latest_intact() == manager.dir / "step-000000001"
    state = read_state(manager.dir / "step-000000001")
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"],
                       old["state"]["optimizer"]["state"][0]["exp_avg"])
    assert state["best"] == 0.5
    weights, which = read_weights(manager.dir / "step-000000001", "model")
    assert which == "model" and torch.equal(weights["w"], old["model"]["w"])
    _flip(manager.dir / "step-000000001" / "ema.safetensors", 200)  # in the tensor data
    assert manager.latest_intact(warn=False) is None


def test_state_tensors_go_to_safetensors_and_come_back_where_they_were(tmp_path):
    """The optimiser's moments are written to state.safetensors (no pickle of them), the
    rest to a small state.pt; read back, every tensor is where it was, the containers and
    plain values as they were; a flipped byte in state.safetensors is refused."""
    manager = CheckpointManager(tmp_path)
    big = torch.randn(200_000)
    state = {"optimizer": {"state": {0: {"exp_avg": big, "step": torch.tensor(3.0)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]},
             "rng": [{"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}],
             "odd": {0: torch.ones(2), "0": torch.zeros(2)}, "best": None}
    ckpt = manager.save(1, model={"w": torch.ones(2)}, ema=None, state=state, meta={},
                        weights_metadata={})
    assert (ckpt / "state.pt").stat().st_size < 20_000 < (ckpt / "state.safetensors").stat().st_size
    loaded = read_state(ckpt)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], big)
    assert loaded["optimizer"]["state"][0]["step"].item() == 3.0
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(loaded["rng"][0]["torch"], state["rng"][0]["torch"])
    assert loaded["rng"][0]["python"] == (3, (1, 2), None) and loaded["best"] is None
    assert torch.equal(loaded["odd"][0], torch.ones(2))
    assert torch.equal(loaded["odd"]["0"], torch.zeros(2))
    _flip(ckpt / "state.safetensors", (ckpt / "state.safetensors").stat().st_size - 400)
    with pytest.raises(DamagedFileError, match=r"state\.safetensors: tensor data differs"):
        read_state(ckpt)
    assert manager.latest_intact(warn=False) is None


def test_a_checkpoint_reads_each_file_once(tmp_path, monkeypatch):
    """Verification, weights and state come from the same bytes: each file read once."""
    import moat.train.checkpoint_folder as checkpoint

    ckpt = _save(CheckpointManager(tmp_path), 1)
    reads: list[str] = []
    original = checkpoint.read_verified
    monkeypatch.setattr(checkpoint, "read_verified", lambda path, record: (
        reads.append(Path(path).name) or original(path, record)))
    opened = Checkpoint(ckpt).verify()
    opened.weights("model"), opened.weights("ema"), opened.state()
    assert sorted(reads) == ["ema.safetensors", "model.safetensors", "state.pt",
                             "state.safetensors"]


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
