"""A small writer of TensorFlow's checkpoint format (TensorBundle), for tests only.

It writes what TensorFlow's ``SaveV2`` writes: data shards with the tensors back to back in
name order, and a ``.index`` SSTable (prefix-compressed keys, a restart point every 16
entries, 256 KiB blocks, masked-crc32c block trailers, shortened index keys, an empty
metaindex block and the 48-byte footer). With the defaults its output is byte-identical to
TensorFlow's for the reference checkpoint (tested), so checkpoints built here stand in for
the official releases, which are not downloadable in tests: several shards, bfloat16, EMA
copies, optimizer slots, strings and deliberately corrupted files.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moat.weights.tf_checkpoint import masked_crc32c

_DTYPE_ENUM = {
    "float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6, "string": 7,
    "complex64": 8, "int64": 9, "bool": 10, "bfloat16": 14, "uint16": 17, "complex128": 18,
    "float16": 19, "resource": 20, "variant": 21, "uint32": 22, "uint64": 23,
}
_MAGIC = 0xDB4775248B80FB57


@dataclass
class Raw:
    """A tensor given as stored bytes, for dtypes NumPy lacks (string, variant, bfloat16)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    """One protobuf field: ints as varints, bytes as length-delimited."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def entry_proto(dtype: str, shape: tuple[int, ...], shard: int, offset: int, size: int,
                crc: int) -> bytes:
    """Serialized BundleEntryProto, fields in order and defaults omitted as protobuf does."""
    shape_proto = b"".join(_field(2, _field(1, d)) for d in shape)
    out = _field(1, _DTYPE_ENUM[dtype]) + _field(2, shape_proto)
    if shard:
        out += _field(3, shard)
    if offset:
        out += _field(4, offset)
    if size:
        out += _field(5, size)
    return out + _varint(6 << 3 | 5) + crc.to_bytes(4, "little")


def header_proto(num_shards: int, big_endian: bool = False) -> bytes:
    out = _field(1, num_shards) + (_field(2, 1) if big_endian else b"")
    return out + _field(3, _field(1, 1))  # VersionDef{producer: 1}


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """TensorFlow's table_builder FindShortestSeparator."""
    n = 0
    while n < min(len(start), len(limit)) and start[n] == limit[n]:
        n += 1
    if n < min(len(start), len(limit)) and start[n] < 0xFF and start[n] + 1 < limit[n]:
        return start[:n] + bytes([start[n] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


class _Block:
    def __init__(self, restart_interval: int) -> None:
        self.interval, self.buf, self.restarts = restart_interval, bytearray(), [0]
        self.count, self.last = 0, b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.interval:
            while shared < min(len(key), len(self.last)) and key[shared] == self.last[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.count = 0
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        self.buf += key[shared:] + value
        self.last, self.count = key, self.count + 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buf) + b"".join(r.to_bytes(4, "little") for r in self.restarts) + \
            len(self.restarts).to_bytes(4, "little")

    def empty(self) -> bool:
        return not self.buf


def write_table(items: list[tuple[bytes, bytes]], *, block_size: int = 262144,
                restart_interval: int = 16) -> bytes:
    """An SSTable of sorted (key, value) pairs, as TensorFlow's TableBuilder writes it."""
    out, index = bytearray(), _Block(1)
    block, pending = _Block(restart_interval), None

    def write_block(b: _Block) -> tuple[int, int]:
        contents = b.finish() + b"\x00"
        offset = len(out)
        out.extend(contents + masked_crc32c(contents).to_bytes(4, "little"))
        return offset, len(contents) - 1

    for key, value in items:
        if pending is not None:
            index.add(_shortest_separator(block_last, key), pending)
            pending = None
        block.add(key, value)
        block_last = key
        if block.size_estimate() >= block_size:
            offset, size = write_block(block)
            pending, block = _varint(offset) + _varint(size), _Block(restart_interval)
    if not block.empty():
        offset, size = write_block(block)
        pending = _varint(offset) + _varint(size)
    if pending is not None:
        index.add(_short_successor(block_last), pending)
    meta = write_block(_Block(restart_interval))
    index_handle = write_block(index)
    footer = b"".join(_varint(v) for v in (*meta, *index_handle))
    out += footer.ljust(40, b"\x00") + _MAGIC.to_bytes(8, "little")
    return bytes(out)


def _to_bytes(value: np.ndarray | Raw, dtype: str | None, big_endian: bool) -> Raw:
    if isinstance(value, Raw):
        return value
    array = np.asarray(value)
    if (dtype or "") == "bfloat16":  # round to nearest even, as tf.cast does
        bits = array.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        array = bits.astype(">u2" if big_endian else "<u2")
        return Raw("bfloat16", array.shape, array.tobytes())
    if dtype:
        array = array.astype(dtype)
    name = array.dtype.name
    array = array.astype(array.dtype.newbyteorder(">" if big_endian else "<"))
    return Raw(name, array.shape, array.tobytes())


def write_checkpoint(prefix: str | Path, tensors: Mapping[str, np.ndarray | Raw], *,
                     num_shards: int = 1, dtypes: Mapping[str, str] | None = None,
                     big_endian: bool = False, block_size: int = 262144,
                     restart_interval: int = 16) -> Path:
    """Write ``tensors`` as a TensorFlow checkpoint at ``prefix``; return the prefix.

    Tensors are spread round-robin over ``num_shards`` data files in name order.
    ``dtypes`` casts single tensors on the way (e.g. ``{"w": "bfloat16"}``).
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    shards = [bytearray() for _ in range(num_shards)]
    entries = [(b"", header_proto(num_shards, big_endian))]
    for i, name in enumerate(sorted(tensors)):
        raw = _to_bytes(tensors[name], (dtypes or {}).get(name), big_endian)
        shard = i % num_shards
        entries.append((name.encode(), entry_proto(raw.dtype, tuple(raw.shape), shard,
                                                   len(shards[shard]), len(raw.data),
                                                   masked_crc32c(raw.data))))
        shards[shard] += raw.data
    for i, data in enumerate(shards):
        prefix.with_name(f"{prefix.name}.data-{i:05d}-of-{num_shards:05d}").write_bytes(data)
    index = write_table(entries, block_size=block_size, restart_interval=restart_interval)
    prefix.with_name(prefix.name + ".index").write_bytes(index)
    return prefix


def make_archive(archive: str | Path, prefix: str | Path, arcdir: str = "",
                 extra: list[tarfile.TarInfo] | None = None) -> Path:
    """Pack a checkpoint like a release: ``arcdir/NAME.index`` and ``.data-*`` in a .tar.gz.

    ``extra`` members (hostile ones, in tests) are added with empty contents.
    """
    prefix = Path(prefix)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(prefix.parent.glob(prefix.name + ".*")):
            tar.add(path, arcname=f"{arcdir}/{path.name}" if arcdir else path.name)
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"") if member.isfile() else None)
    return Path(archive)
