"""The TensorFlow checkpoint reader, against a real TF-written checkpoint and our writer."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from moat.weights.tf_checkpoint import CheckpointError, TFCheckpoint, _varint, read_checkpoint
from tf_writer import Raw, entry_proto, header_proto, make_archive, write_checkpoint, write_table


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _small(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"moat/block_00_{i:02d}/conv/kernel": rng.standard_normal((3, 3, 4, i + 1),
                                                                      dtype=np.float32)
            for i in range(40)}


# --- the real checkpoint and byte-exactness of the writer ---


def test_reads_real_tensorflow_checkpoint(ref_prefix: Path, ref_weights) -> None:
    with TFCheckpoint(ref_prefix) as ckpt:
        assert len(ckpt) == 361 and ckpt.skipped == {} and ckpt.num_shards == 1
        assert ckpt.shape("moat/logits_head/kernel") == (1, 1, 256, 1000)
        assert ckpt.dtype("moat/logits_head/kernel") == "float32"
        _assert_same(dict(ckpt.items()), ref_weights)


def test_writer_is_byte_identical_to_tensorflow(tmp_path: Path, ref_prefix: Path,
                                                ref_weights) -> None:
    prefix = write_checkpoint(tmp_path / "tiny_moat0", ref_weights)
    for suffix in (".index", ".data-00000-of-00001"):
        ours = prefix.with_name(prefix.name + suffix).read_bytes()
        assert ours == ref_prefix.with_name(ref_prefix.name + suffix).read_bytes(), suffix


def test_several_shards_and_blocks(tmp_path: Path) -> None:
    tensors = _small()
    # small blocks and restart interval: many data blocks, restarts and index entries
    prefix = write_checkpoint(tmp_path / "model-ckpt-0", tensors, num_shards=3,
                              block_size=256, restart_interval=3)
    assert len(list(tmp_path.glob("model-ckpt-0.data-*-of-00003"))) == 3
    with TFCheckpoint(prefix) as ckpt:
        assert ckpt.num_shards == 3
        assert {ckpt.info(n).shard for n in ckpt} == {0, 1, 2}
        _assert_same(dict(ckpt.items()), tensors)


@pytest.mark.parametrize("big_endian", [False, True])
def test_dtypes(tmp_path: Path, big_endian: bool) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "f16": rng.standard_normal((5, 3)).astype(np.float16),
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f64": rng.standard_normal(7),
        "i64": np.array([-(2**62), -1, 0, 2**62], np.int64),
        "i32": np.arange(-3, 3, dtype=np.int32),
        "u8": np.arange(10, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "bf16": rng.standard_normal((4, 4)).astype(np.float32),
    }
    prefix = write_checkpoint(tmp_path / "c", tensors, dtypes={"bf16": "bfloat16"},
                              big_endian=big_endian)
    with TFCheckpoint(prefix) as ckpt:
        got = dict(ckpt.items())
        assert ckpt.dtype("bf16") == "bfloat16"
    bf16 = got.pop("bf16")
    assert bf16.dtype == np.float32
    # bfloat16 keeps 8 mantissa bits: round-to-nearest error is at most 2**-9 relative
    np.testing.assert_allclose(bf16, tensors.pop("bf16"), rtol=2**-8)
    assert not (bf16.view(np.uint32) & 0xFFFF).any()
    tensors["scalar"] = np.asarray(tensors["scalar"])
    _assert_same(got, tensors)
    assert all(a.dtype.isnative for a in got.values())


def test_unsupported_dtypes_are_listed_not_fatal(tmp_path: Path) -> None:
    tensors = {"w": np.ones(3, np.float32), "_CHECKPOINTABLE_OBJECT_GRAPH": Raw("string", (), b"x"),
               "iterator": Raw("variant", (1,), b"")}
    with TFCheckpoint(write_checkpoint(tmp_path / "c", tensors)) as ckpt:
        assert list(ckpt) == ["w"] and "iterator" not in ckpt
        assert set(ckpt.skipped) == {"_CHECKPOINTABLE_OBJECT_GRAPH", "iterator"}
        assert "string" in ckpt.skipped["_CHECKPOINTABLE_OBJECT_GRAPH"]
        assert ckpt.dtype("iterator") == "variant"
        with pytest.raises(KeyError, match="variant"):
            ckpt.read("iterator")


# --- corruption and missing files ---


def test_corrupted_data_names_file_and_tensor(tmp_path: Path) -> None:
    tensors = _small()
    prefix = write_checkpoint(tmp_path / "c", tensors)
    with TFCheckpoint(prefix) as ckpt:
        victim = sorted(tensors)[5]
        info = ckpt.info(victim)
    data = prefix.with_name("c.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[info.offset + 7] ^= 0x10  # a single bit flip
    data.write_bytes(bytes(raw))
    with TFCheckpoint(prefix) as ckpt:
        np.testing.assert_array_equal(ckpt[sorted(tensors)[4]], tensors[sorted(tensors)[4]])
        with pytest.raises(CheckpointError, match=f"{data.name}.*{victim}.*corrupted"):
            ckpt.read(victim)
    with TFCheckpoint(prefix, verify=False) as ckpt:  # the escape hatch reads it anyway
        assert ckpt.read(victim).shape == tensors[victim].shape


@pytest.mark.parametrize("where", ["entry", "trailer", "index block", "magic"])
def test_corrupted_index(tmp_path: Path, where: str) -> None:
    prefix = write_checkpoint(tmp_path / "c", _small())
    index = prefix.with_name("c.index")
    raw = bytearray(index.read_bytes())
    metaindex_offset, _ = _varint(bytes(raw[-48:]), 0)  # the data blocks end 5 bytes before
    position = {"entry": 40, "trailer": metaindex_offset - 2,
                "index block": len(raw) - 60, "magic": len(raw) - 3}[where]
    raw[position] ^= 0x01
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="c.index.*(crc32c|magic)"):
        TFCheckpoint(prefix)


def test_inconsistent_entry_names_tensor(tmp_path: Path) -> None:
    """An entry whose checksum is fine but whose contents contradict themselves."""
    bad = entry_proto("float32", (3,), shard=0, offset=0, size=8, crc=0)
    (tmp_path / "c.index").write_bytes(write_table([(b"", header_proto(1)), (b"w", bad)]))
    (tmp_path / "c.data-00000-of-00001").write_bytes(bytes(12))
    with pytest.raises(CheckpointError, match="c.index.*'w'.*size 8 bytes"):
        TFCheckpoint(tmp_path / "c")


def test_truncated_files(tmp_path: Path) -> None:
    tensors = _small()
    prefix = write_checkpoint(tmp_path / "c", tensors)
    data = prefix.with_name("c.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:-10])
    last = sorted(tensors)[-1]
    with pytest.raises(CheckpointError, match=f"{data.name}.*truncated.*{last}"):
        TFCheckpoint(prefix)
    index = prefix.with_name("c.index")
    index.write_bytes(index.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="c.index.*truncated"):
        TFCheckpoint(prefix)


def test_missing_files(tmp_path: Path) -> None:
    prefix = write_checkpoint(tmp_path / "c", _small(), num_shards=2)
    prefix.with_name("c.data-00001-of-00002").unlink()
    with pytest.raises(FileNotFoundError, match="data-00001-of-00002"):
        TFCheckpoint(prefix)
    with pytest.raises(FileNotFoundError, match="does not exist.*missing"):
        TFCheckpoint(tmp_path / "nothing" / "model-ckpt-0")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint"):
        TFCheckpoint(empty)


# --- ways of naming a checkpoint ---


def test_open_from_index_data_file_and_directory(tmp_path: Path) -> None:
    tensors = _small()
    prefix = write_checkpoint(tmp_path / "run" / "model-ckpt-0", tensors)
    for path in (prefix, str(prefix) + ".index", str(prefix) + ".data-00000-of-00001",
                 tmp_path / "run", tmp_path):
        with TFCheckpoint(path) as ckpt:
            assert ckpt.path == prefix
    _assert_same(read_checkpoint(tmp_path), tensors)
    assert list(read_checkpoint(prefix, [sorted(tensors)[0]])) == [sorted(tensors)[0]]


def test_directory_with_several_checkpoints(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "model-ckpt-100", _small(0))
    chosen = write_checkpoint(tmp_path / "model-ckpt-200", _small(1))
    with pytest.raises(FileNotFoundError, match="holds 2 checkpoints"):
        TFCheckpoint(tmp_path)
    # TensorFlow's state file, with the absolute path of the training machine
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/gcs/run/model-ckpt-200"\n'
                                         'all_model_checkpoint_paths: "/gcs/run/model-ckpt-100"\n')
    with TFCheckpoint(tmp_path) as ckpt:
        assert ckpt.path == chosen


# --- archives ---


def test_reads_released_style_archive(tmp_path: Path, ref_prefix: Path, ref_weights) -> None:
    archive = make_archive(tmp_path / "tiny_moat0.tar.gz", ref_prefix, arcdir="ckpt/tiny")
    with TFCheckpoint(archive, tmp_dir=tmp_path) as ckpt:
        extracted = ckpt.path
        assert extracted.name == "tiny_moat0" and extracted.is_relative_to(tmp_path)
        _assert_same(dict(ckpt.items()), ref_weights)
    assert not extracted.exists()  # the temporary directory is gone after close


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("member, reason", [
    (_member("/etc/evil"), "absolute path"),
    (_member("ckpt/../../evil"), r"'\.\.'"),
    (_member("ckpt/model-ckpt-0.data-00000-of-00001", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (_member("ckpt/hard", tarfile.LNKTYPE, "ckpt/model-ckpt-0.index"), "link"),
    (_member("ckpt/dev", tarfile.CHRTYPE), "device"),
])
def test_hostile_archives_are_refused(tmp_path: Path, member: tarfile.TarInfo,
                                      reason: str) -> None:
    prefix = write_checkpoint(tmp_path / "src" / "model-ckpt-0", _small())
    archive = make_archive(tmp_path / "evil.tar.gz", prefix, arcdir="ckpt", extra=[member])
    extract_root = tmp_path / "tmp"
    extract_root.mkdir()
    with pytest.raises(CheckpointError, match=f"evil.tar.gz.*refusing.*{reason}"):
        TFCheckpoint(archive, tmp_dir=extract_root)
    assert list(extract_root.iterdir()) == []  # nothing written, temporary directory removed


def test_truncated_archive(tmp_path: Path) -> None:
    prefix = write_checkpoint(tmp_path / "src" / "model-ckpt-0", _small())
    archive = make_archive(tmp_path / "a.tar.gz", prefix)
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="a.tar.gz.*download it again"):
        TFCheckpoint(archive, tmp_dir=tmp_path)
