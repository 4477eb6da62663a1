"""TensorFlow's checkpoint format (TensorBundle), decoded without TensorFlow or protobuf.

``PREFIX.index`` is a LevelDB-style sorted table (SSTable). Each key is a tensor name and
each value a serialized ``BundleEntryProto`` (dtype, shape, shard, offset, size, crc32c).
The empty key holds a ``BundleHeaderProto`` (number of shards, endianness, version). The few
protobuf fields are decoded by hand; every table block is checked against its stored
(masked) crc32c. ``tf_checkpoint.TFCheckpoint`` reads checkpoints with these pieces.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moat.errors import InvalidInputError, MoatError

try:
    import google_crc32c
except ImportError as err:  # pragma: no cover - it is a base dependency
    raise ImportError(
        "reading TensorFlow checkpoints needs the 'google-crc32c' package: "
        "pip install google-crc32c"
    ) from err

__all__ = ["CheckpointError", "TensorInfo", "masked_crc32c"]


class CheckpointError(MoatError, ValueError):
    """A checkpoint file is truncated, corrupted or not in the TensorBundle format."""


# --- format constants ---------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57  # last 8 bytes of every LevelDB/TF table
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the magic
_TRAILER_SIZE = 5  # after each block: compression type (1 byte) + masked crc32c (4 bytes)
_CRC_MASK_DELTA = 0xA282EAD8
_BUNDLE_VERSION = 1  # kTensorBundleVersion; a file needing a newer reader says so

# TensorFlow DataType enum -> (name, NumPy dtype in little-endian). None: cannot be a weight.
_DTYPES: dict[int, tuple[str, str | None]] = {
    1: ("float32", "<f4"), 2: ("float64", "<f8"), 3: ("int32", "<i4"), 4: ("uint8", "u1"),
    5: ("int16", "<i2"), 6: ("int8", "i1"), 7: ("string", None), 8: ("complex64", "<c8"),
    9: ("int64", "<i8"), 10: ("bool", "?"), 11: ("qint8", None), 12: ("quint8", None),
    13: ("qint32", None), 14: ("bfloat16", "<u2"), 15: ("qint16", None),
    16: ("quint16", None), 17: ("uint16", "<u2"), 18: ("complex128", "<c16"),
    19: ("float16", "<f2"), 20: ("resource", None), 21: ("variant", None),
    22: ("uint32", "<u4"), 23: ("uint64", "<u8"), 24: ("float8_e5m2", None),
    25: ("float8_e4m3fn", None),
}


def masked_crc32c(data: bytes | np.ndarray) -> int:
    """crc32c as TensorFlow stores it (masked, so that a crc of data holding crcs differs)."""
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# --- protobuf and varint decoding -----------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode one base-128 varint at ``pos``; return (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidInputError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) of a serialized protobuf message.

    Varint and fixed-width fields give ints, length-delimited fields give bytes; unknown
    fields are yielded too and simply ignored by the callers, as protobuf does.
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise InvalidInputError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise InvalidInputError("truncated protobuf message")
        yield field, value


def _signed64(value: int) -> int:
    """int32/int64 protobuf fields are two's complement in a 64-bit varint."""
    return value - (1 << 64) if value >= 1 << 63 else value


# --- the SSTable (.index) ---------------------------------------------------------------


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    """Return one table block after checking its trailer (compression byte and crc32c)."""
    end = offset + size
    if end + _TRAILER_SIZE > len(data) - _FOOTER_SIZE:
        raise InvalidInputError(f"{what} block at offset {offset} runs past the end of the file")
    compression = data[end]
    stored = int.from_bytes(data[end + 1:end + 5], "little")
    if masked_crc32c(data[offset:end + 1]) != stored:
        raise InvalidInputError(f"{what} block at offset {offset} fails its crc32c check")
    if compression != 0:
        raise InvalidInputError(f"{what} block at offset {offset} uses compression type "
                                f"{compression}; TensorFlow checkpoints are never compressed")
    return data[offset:end]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of one block. Keys share a prefix with the key before them."""
    if len(block) < 4:
        raise InvalidInputError("block too small")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (num_restarts + 1)
    if num_restarts < 1 or limit < 0:
        raise InvalidInputError("bad restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise InvalidInputError(f"bad entry after key {key!r}")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _read_table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield every (key, value) of an SSTable held in ``data``, in key order."""
    if len(data) < _FOOTER_SIZE:
        raise InvalidInputError(f"file is {len(data)} bytes, too small for a table footer")
    footer = data[-_FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
        raise InvalidInputError("no table magic number at the end (not a TensorFlow .index file, "
                                "or truncated)")
    _, pos = _varint(footer, 0)  # metaindex handle: TensorFlow leaves that block empty
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    index = _read_block(data, index_offset, index_size, "index")
    last = b""
    for _, handle in _block_entries(index):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _block_entries(_read_block(data, offset, size, "data")):
            if key < last:
                raise InvalidInputError(f"keys out of order at {key!r}")
            last = key
            yield key, value


# --- bundle entries ---------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: the decoded ``BundleEntryProto``."""

    name: str
    dtype: str  # TensorFlow dtype name: "float32", "bfloat16", "string", ...
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int  # bytes
    crc32c: int  # masked, as stored
    skip_reason: str | None = None  # why it cannot be read as an array, if it cannot


def _parse_entry(name: str, value: bytes) -> TensorInfo:
    dtype = shard = offset = size = crc = 0
    shape: list[int] = []
    sliced = False
    for field, v in _proto_fields(value):
        if field == 1:
            dtype = v
        elif field == 2:
            for f, dim in _proto_fields(v):
                if f == 2:  # TensorShapeProto.dim
                    shape.append(_signed64(dict(_proto_fields(dim)).get(1, 0)))
                elif f == 3 and dim:  # unknown_rank
                    raise InvalidInputError("tensor of unknown rank")
        elif field == 3:
            shard = v
        elif field == 4:
            offset = _signed64(v)
        elif field == 5:
            size = _signed64(v)
        elif field == 6:
            crc = v
        elif field == 7:
            sliced = True
    dtype_name, np_dtype = _DTYPES.get(dtype, (f"DataType {dtype}", None))
    reason = None
    if sliced:
        reason = "partitioned variable (saved as slices), not supported"
    elif np_dtype is None:
        reason = f"dtype {dtype_name} cannot hold model weights"
    elif any(d < 0 for d in shape) or offset < 0:
        raise InvalidInputError("negative dimension or offset")
    elif math.prod(shape) * np.dtype(np_dtype).itemsize != size:
        raise InvalidInputError(f"size {size} bytes does not match shape {shape} of {dtype_name}")
    return TensorInfo(name, dtype_name, tuple(shape), shard, offset, size, crc, reason)


def _parse_header(value: bytes) -> tuple[int, bool]:
    """Return (number of shards, big endian?) and refuse bundles this reader cannot read."""
    fields = dict(_proto_fields(value))
    num_shards, endianness = fields.get(1, 0), fields.get(2, 0)
    version = fields.get(3, b"")
    min_consumer = dict(_proto_fields(version)).get(2, 0)
    bad = [v for f, v in _proto_fields(version) if f == 3]
    if min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in bad:
        raise InvalidInputError(f"written by a newer TensorFlow (bundle min_consumer "
                                f"{min_consumer}); "
                                "this reader understands version 1")
    if num_shards < 1 or endianness not in (0, 1):
        raise InvalidInputError(f"bad header (num_shards={num_shards}, endianness={endianness})")
    return num_shards, endianness == 1
