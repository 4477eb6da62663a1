"""Reading TensorFlow checkpoints (the TensorBundle format) without TensorFlow.

The official MOAT weights are TensorFlow checkpoints. Depending on TensorFlow only to read
them would pull a 500 MB framework into a PyTorch project, so this module reads the format
directly with NumPy:

* ``PREFIX.index`` is a sorted table of ``BundleEntryProto`` records, decoded by
  ``tf_format.py`` (by hand, so no ``protobuf`` package is needed either).
* ``PREFIX.data-NNNNN-of-MMMMM`` shards hold the raw tensor bytes back to back.

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
import re
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from moat.errors import InvalidInputError, NotFoundError
from moat.paths import regular_file
from moat.weights.tf_format import (_DTYPES, CheckpointError, TensorInfo, _parse_entry,
                                    _parse_header, _read_table, _varint, masked_crc32c)

__all__ = ["CheckpointError", "CheckpointView", "TensorInfo", "TFCheckpoint", "masked_crc32c",
           "read_checkpoint", "_varint"]


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
            regular_file(self.archive, "checkpoint archive")  # a FIFO would block tarfile
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
                        raise InvalidInputError(f"entry of tensor {name!r} is corrupted ({err})") from err
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
            raise NotFoundError(f"{name!r} is not in checkpoint {self.path}") from None

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
            raise NotFoundError(f"{name!r} in {self.path} cannot be read: {info.skip_reason}")
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


class CheckpointView(Mapping[str, np.ndarray]):
    """Chosen tensors of a checkpoint under the reader's names (`keys`: name -> the tensor to
    read, e.g. an official name -> its EMA copy), read lazily like the checkpoint itself, so
    that a conversion holds one tensor at a time; `filled`: arrays for names the checkpoint
    lacks."""

    def __init__(self, ckpt: TFCheckpoint, keys: Mapping[str, str],
                 filled: Mapping[str, np.ndarray] | None = None) -> None:
        self._ckpt, self._keys, self.filled = ckpt, dict(keys), dict(filled or {})

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.filled:
            return self.filled[name]
        return self._ckpt.read(self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter([*self._keys, *self.filled])

    def __len__(self) -> int:
        return len(self._keys) + len(self.filled)


def read_checkpoint(path: str | Path, names: list[str] | None = None, *,
                    verify: bool = True) -> dict[str, np.ndarray]:
    """Read a whole checkpoint (or only ``names``) into a dict of arrays.

    Convenient for small models; for large ones prefer :class:`TFCheckpoint`, which reads
    one tensor at a time.
    """
    with TFCheckpoint(path, verify=verify) as ckpt:
        return {name: ckpt.read(name) for name in (ckpt if names is None else names)}
