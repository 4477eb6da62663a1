"""Reading TensorFlow checkpoints (the TensorBundle format) without TensorFlow.

The official MOAT weights are TensorFlow checkpoints. Depending on TensorFlow only to read
them would pull a 500 MB framework into a PyTorch project, so this module reads the format
directly with NumPy:

* ``PREFIX.index`` is a LevelDB-style sorted table (SSTable). Each key is a tensor name and
  each value a serialized ``BundleEntryProto`` (dtype, shape, shard, offset, size, crc32c).
  The empty key holds a ``BundleHeaderProto`` (number of shards, endianness, version).
* ``PREFIX.data-NNNNN-of-MMMMM`` shards hold the raw tensor bytes back to back.

The few protobuf fields are decoded by hand, so no ``protobuf`` package is needed either.
Every table block and every tensor is checked against its stored (masked) crc32c, so a
truncated or corrupted download is an error that names the file and the tensor, never
silently wrong weights. Data shards are memory-mapped: reading one tensor touches only its
bytes, which keeps converting a 2 GB MOAT-4 checkpoint to one copy in memory.

Dtypes: float16/32/64, integers, bool and complex are returned as stored (native byte
order). **bfloat16 is returned as float32** (exact: bfloat16 is the top half of a float32),
because NumPy has no bfloat16 and every consumer here wants float32 anyway; ``dtype(name)``
still reports ``"bfloat16"``. Strings, resources, variants, quantized and float8 tensors and
partitioned variables cannot be weights of this model: they are listed in ``skipped`` with
the reason and never break the listing.

A checkpoint can be opened from its prefix, its ``.index`` or a ``.data-*`` file, a
directory holding one checkpoint, or a released ``.tar.gz`` (extracted safely to a
temporary directory that :meth:`TFCheckpoint.close` removes).
"""

from __future__ import annotations

import errno
import math
import re
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

try:
    import google_crc32c
except ImportError as err:  # pragma: no cover - it is a base dependency
    raise ImportError(
        "reading TensorFlow checkpoints needs the 'google-crc32c' package: "
        "pip install google-crc32c"
    ) from err

__all__ = ["CheckpointError", "TensorInfo", "TFCheckpoint", "read_checkpoint"]


class CheckpointError(ValueError):
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
            raise ValueError("truncated or overlong varint")
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
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value


def _signed64(value: int) -> int:
    """int32/int64 protobuf fields are two's complement in a 64-bit varint."""
    return value - (1 << 64) if value >= 1 << 63 else value


# --- the SSTable (.index) ---------------------------------------------------------------


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    """Return one table block after checking its trailer (compression byte and crc32c)."""
    end = offset + size
    if end + _TRAILER_SIZE > len(data) - _FOOTER_SIZE:
        raise ValueError(f"{what} block at offset {offset} runs past the end of the file")
    compression = data[end]
    stored = int.from_bytes(data[end + 1:end + 5], "little")
    if masked_crc32c(data[offset:end + 1]) != stored:
        raise ValueError(f"{what} block at offset {offset} fails its crc32c check")
    if compression != 0:
        raise ValueError(f"{what} block at offset {offset} uses compression type "
                         f"{compression}; TensorFlow checkpoints are never compressed")
    return data[offset:end]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of one block. Keys share a prefix with the key before them."""
    if len(block) < 4:
        raise ValueError("block too small")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (num_restarts + 1)
    if num_restarts < 1 or limit < 0:
        raise ValueError("bad restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise ValueError(f"bad entry after key {key!r}")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _read_table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield every (key, value) of an SSTable held in ``data``, in key order."""
    if len(data) < _FOOTER_SIZE:
        raise ValueError(f"file is {len(data)} bytes, too small for a table footer")
    footer = data[-_FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
        raise ValueError("no table magic number at the end (not a TensorFlow .index file, "
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
                raise ValueError(f"keys out of order at {key!r}")
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
                    raise ValueError("tensor of unknown rank")
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
        raise ValueError("negative dimension or offset")
    elif math.prod(shape) * np.dtype(np_dtype).itemsize != size:
        raise ValueError(f"size {size} bytes does not match shape {shape} of {dtype_name}")
    return TensorInfo(name, dtype_name, tuple(shape), shard, offset, size, crc, reason)


def _parse_header(value: bytes) -> tuple[int, bool]:
    """Return (number of shards, big endian?) and refuse bundles this reader cannot read."""
    fields = dict(_proto_fields(value))
    num_shards, endianness = fields.get(1, 0), fields.get(2, 0)
    version = fields.get(3, b"")
    min_consumer = dict(_proto_fields(version)).get(2, 0)
    bad = [v for f, v in _proto_fields(version) if f == 3]
    if min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in bad:
        raise ValueError(f"written by a newer TensorFlow (bundle min_consumer {min_consumer}); "
                         "this reader understands version 1")
    if num_shards < 1 or endianness not in (0, 1):
        raise ValueError(f"bad header (num_shards={num_shards}, endianness={endianness})")
    return num_shards, endianness == 1


# --- finding the checkpoint -----------------------------------------------------------------

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why an archive member must not be extracted, or None when it is a plain file/dir."""
    name = member.name
    if (name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute()
            or PureWindowsPath(name).drive):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "path with '..'"
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return "device, FIFO or other special file"
    return None


def _extract_archive(archive: Path, target: Path) -> None:
    """Extract a released archive, refusing anything that could land outside ``target``.

    Members are checked before anything is written, so a hostile archive leaves nothing
    behind. Only plain files and directories are accepted: a checkpoint needs nothing else.
    Python's own 'data' filter (where available) is applied on top as a second guard.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe_member(member)
                if reason:
                    raise CheckpointError(
                        f"{archive}: refusing to extract member {member.name!r} ({reason}); "
                        "a checkpoint archive holds only plain files. Download the official "
                        "archive again or extract it yourself after inspecting it")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706 backport
                tar.extractall(target, members=members)
    except (tarfile.TarError, EOFError, OSError) as err:
        # the archive's own file missing, or writing the extracted files failed (a full disk,
        # a read-only temp folder): the archive is fine, say what really happened
        if isinstance(err, FileNotFoundError) or (isinstance(err, OSError) and err.errno in (
                errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)):
            raise
        raise CheckpointError(f"{archive}: cannot read the archive ({err}); it is probably "
                              "truncated or corrupted: download it again") from err


def _prefix_in_directory(directory: Path) -> Path:
    """The one checkpoint in ``directory`` (searched recursively, as archives nest folders).

    A TensorFlow ``checkpoint`` state file decides between several; its recorded path is
    often absolute on the training machine, so only its file name is trusted.
    """
    indexes = sorted(directory.rglob("*.index"))
    prefixes = [p.with_suffix("") for p in indexes]
    if len(prefixes) == 1:
        return prefixes[0]
    for state in sorted(p for p in directory.rglob("checkpoint") if p.is_file()):
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(errors="replace"),
                          re.MULTILINE)
        if match:
            chosen = state.parent / PurePosixPath(match.group(1).replace("\\", "/")).name
            if chosen in prefixes:
                return chosen
    if not prefixes:
        raise FileNotFoundError(f"no TensorFlow checkpoint (*.index file) in {directory}")
    listing = ", ".join(str(p) for p in prefixes)
    raise FileNotFoundError(f"{directory} holds {len(prefixes)} checkpoints ({listing}); "
                            "pass the prefix of the one you want")


def _resolve_prefix(path: Path) -> Path:
    """Turn whatever the user passed (prefix, .index, .data-*, directory) into the prefix."""
    if path.is_dir():
        return _prefix_in_directory(path)
    if path.name.endswith(".index"):
        return path.with_suffix("")
    if _DATA_SUFFIX.search(path.name):
        return path.with_name(_DATA_SUFFIX.sub("", path.name))
    return path


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_ARCHIVE_SUFFIXES)


# --- the reader -----------------------------------------------------------------------------


class TFCheckpoint(Mapping[str, np.ndarray]):
    """A TensorFlow checkpoint, read lazily: a read-only mapping from tensor name to array.

    Use it as a context manager (it may own a temporary extraction directory and open
    memory maps)::

        with TFCheckpoint("moat0_imagenet_1k_224_w_position_embedding.tar.gz") as ckpt:
            kernel = ckpt["moat/stem/conv_0/kernel"]

    Only readable tensors are keys; ``skipped`` maps the others to the reason. Each
    ``read`` returns a fresh array owned by the caller (valid after ``close``), verified
    against the stored crc32c unless ``verify=False``.

    Args:
        path: checkpoint prefix, ``.index`` or ``.data-*`` file, a directory holding one
            checkpoint, or a ``.tar.gz``/``.tgz``/``.tar`` archive of one.
        verify: check each tensor's crc32c when it is read (about 10+ GB/s; keep it on).
        tmp_dir: where archives are extracted (default: the system temporary directory);
            a MOAT-4 archive needs about 2 GB there.
    """

    def __init__(self, path: str | Path, *, verify: bool = True,
                 tmp_dir: str | Path | None = None) -> None:
        self.source = Path(path)
        self.archive: Path | None = None  # the archive this was extracted from, if any
        self.verify = verify
        self._maps: dict[int, np.ndarray] = {}
        self._cleanup: weakref.finalize | None = None  # removes the extraction directory
        try:
            self._open(tmp_dir)
        except BaseException:
            self.close()
            raise

    def _open(self, tmp_dir: str | Path | None) -> None:
        source = self.source
        self.archive = source if _is_archive(source) else None
        if self.archive:
            source = Path(tempfile.mkdtemp(prefix="moat-ckpt-", dir=tmp_dir))
            self._cleanup = weakref.finalize(self, shutil.rmtree, source, True)
            _extract_archive(self.archive, source)
        self.path = _resolve_prefix(source)
        index = self.path.with_name(self.path.name + ".index")
        if not index.is_file():
            where = f"archive {self.source}" if self.archive else str(self.source)
            if not self.archive and not self.source.exists():
                where += " (which does not exist)"
            raise FileNotFoundError(
                f"no TensorFlow checkpoint at {where}: {index.name} is missing. A checkpoint is "
                "PREFIX.index plus PREFIX.data-00000-of-0000N; pass the prefix, the .index "
                "file, the directory holding them or the released .tar.gz archive")
        self._entries: dict[str, TensorInfo] = {}
        num_shards, big_endian = self._read_index(index)
        self.num_shards = num_shards
        self._byteorder = ">" if big_endian else "<"
        self.shard_paths = [self.path.with_name(f"{self.path.name}.data-{i:05d}-of-"
                                                f"{num_shards:05d}") for i in range(num_shards)]
        self._check_shards()

    def _read_index(self, index: Path) -> tuple[int, bool]:
        data = index.read_bytes()
        header = None
        try:
            for key, value in _read_table(data):
                if key == b"":
                    header = _parse_header(value)
                elif key.startswith(b"\x00"):
                    continue  # data of one slice of a partitioned variable (listed by name)
                else:
                    name = key.decode("utf-8", errors="replace")
                    try:
                        self._entries[name] = _parse_entry(name, value)
                    except ValueError as err:
                        raise ValueError(f"entry of tensor {name!r} is corrupted ({err})") from err
        except ValueError as err:
            raise CheckpointError(f"{index}: {err}. The file is truncated or corrupted: "
                                  "download or copy the checkpoint again") from err
        if header is None:
            raise CheckpointError(f"{index}: no bundle header (empty key); this is not a "
                                  "TensorFlow V2 checkpoint index")
        num_shards, _ = header
        for info in self._entries.values():
            if info.skip_reason is None and info.shard >= num_shards:
                raise CheckpointError(f"{index}: tensor {info.name!r} names shard {info.shard} "
                                      f"of {num_shards}; the index is corrupted")
        return header

    def _check_shards(self) -> None:
        """Fail now, not halfway through a conversion, on missing or truncated shards."""
        missing = [p for p in self.shard_paths if not p.is_file()]
        if missing:
            names = ", ".join(p.name for p in missing)
            raise FileNotFoundError(
                f"{self.path}: missing data shard(s) {names}. Every PREFIX.data-* file must sit "
                "next to PREFIX.index; copy or extract the complete checkpoint")
        ends = [0] * self.num_shards
        last = [""] * self.num_shards
        for info in self._entries.values():
            if info.skip_reason is None and info.offset + info.size > ends[info.shard]:
                ends[info.shard], last[info.shard] = info.offset + info.size, info.name
        for shard, path in enumerate(self.shard_paths):
            size = path.stat().st_size
            if size < ends[shard]:
                raise CheckpointError(
                    f"{path}: file is truncated ({size} bytes, but tensor {last[shard]!r} ends "
                    f"at byte {ends[shard]}); download or copy the checkpoint again")

    # --- lookup ---

    @property
    def skipped(self) -> dict[str, str]:
        """Tensors that are listed in the index but cannot be read as arrays, with why."""
        return {n: i.skip_reason for n, i in self._entries.items() if i.skip_reason}

    def info(self, name: str) -> TensorInfo:
        """Index entry of any listed tensor, readable or skipped."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """Stored dtype name; note that ``read`` widens "bfloat16" to float32."""
        return self.info(name).dtype

    def __iter__(self) -> Iterator[str]:
        return (n for n, i in sorted(self._entries.items()) if i.skip_reason is None)

    def __len__(self) -> int:
        return sum(i.skip_reason is None for i in self._entries.values())

    def __contains__(self, name: object) -> bool:
        info = self._entries.get(name) if isinstance(name, str) else None
        return info is not None and info.skip_reason is None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    # --- reading ---

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.shard_paths[shard], dtype=np.uint8, mode="r")
        return self._maps[shard]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new NumPy array (bfloat16 widened to float32)."""
        info = self.info(name)
        if info.skip_reason:
            raise KeyError(f"{name!r} in {self.path} cannot be read: {info.skip_reason}")
        if info.size:
            raw = self._map(info.shard)[info.offset:info.offset + info.size]
        else:  # np.memmap cannot map an empty file, and there is nothing to map
            raw = np.empty(0, np.uint8)
            raw.flags.writeable = False
        if self.verify and masked_crc32c(raw) != info.crc32c:
            raise CheckpointError(
                f"{self.shard_paths[info.shard]}: tensor {name!r} is corrupted (crc32c "
                "mismatch); download or copy the checkpoint again")
        np_dtype = np.dtype(_DTYPES_BY_NAME[info.dtype]).newbyteorder(self._byteorder)
        array = raw.view(np_dtype).reshape(info.shape)
        if info.dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np_dtype.newbyteorder("="))  # a copy, in native byte order

    # --- lifetime ---

    def close(self) -> None:
        """Drop the memory maps and delete the extraction directory, if any."""
        self._maps.clear()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> TFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TFCheckpoint({str(getattr(self, 'path', self.source))!r}, {len(self)} tensors, "
                f"{len(self.skipped)} skipped)")


_DTYPES_BY_NAME = {name: np_dtype for name, np_dtype in _DTYPES.values() if np_dtype}


def read_checkpoint(path: str | Path, names: list[str] | None = None, *,
                    verify: bool = True) -> dict[str, np.ndarray]:
    """Read a whole checkpoint (or only ``names``) into a dict of arrays.

    Convenient for small models; for large ones prefer :class:`TFCheckpoint`, which reads
    one tensor at a time.
    """
    with TFCheckpoint(path, verify=verify) as ckpt:
        return {name: ckpt.read(name) for name in (ckpt if names is None else names)}
