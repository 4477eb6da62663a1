"""Atomic and verified files: nothing half-written under a user's name, nothing damaged loaded.

Atomic: every output is written to a hidden temp file in the same folder, fsync'ed and renamed
over its name (`atomic_write_bytes`, or `atomic_output` for libraries that write a path
themselves); a failure (a full disk, Ctrl-C, an invalid ONNX model) removes the temp file and
leaves the previous file, if any, untouched.

Verified: sizes and sha256 digests are written with every file we make and checked on load.

Two kinds of record:

* a **tensor digest** in a safetensors file's own metadata (`tensors_sha256`, `tensors_bytes`):
  the sha256 of every tensor's name, dtype, shape and raw bytes, in name order. A file cannot
  hold the digest of its own bytes, but it can hold the digest of its tensors, which is what a
  flipped byte in the data section changes. `verify_safetensors` recomputes it from the bytes
  the tensors are loaded from;
* a **manifest** of a folder, stored in a checkpoint's meta.json: `{name: {"size", "sha256"}}`
  for a file, `{name: {"size", "header_sha256"}}` for a safetensors file (its header's sha256;
  the header holds the tensor digest, which covers the rest). `verify_manifest` checks every
  listed file, `read_verified` one file on the bytes it returns.

Written in one stream: `write_safetensors` and `HashingWriter` hash the data while writing it
(in a second thread: the cost is about the slower of the two, about 0.8 GB/s for sha256 here),
with no serialised copy in memory and no second read. Verified in one read: every check reads
the file once and works on those bytes.

A check that fails raises `DamagedFileError`, which names the file and says what to do.
Everything here is plain hashlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from moat.errors import MoatError

DIGEST_KEY, BYTES_KEY = "tensors_sha256", "tensors_bytes"
_CHUNK = 1 << 22


class DamagedFileError(MoatError, ValueError):
    """A file whose content is not what was written: truncated, flipped bytes, unreadable."""

    def __init__(self, path: str | os.PathLike, what: str, advice: str | None = None) -> None:
        self.path = os.fspath(path)
        advice = advice or ("the file is damaged (disk error, interrupted copy or edit); "
                            "restore it from a copy or write it again")
        super().__init__(f"{self.path}: {what}; {advice}")


# --- atomic writes ----------------------------------------------------------------------------

def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix) to write; on success it replaces `path`,
    on any exception it is deleted and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is not None and os.fspath(err.filename) == os.fspath(tmp):
            raise OSError(err.errno, err.strerror, os.fspath(path)) from None  # the user's name
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    with atomic_output(path) as tmp:
        write_synced(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- manifests of files ---------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(folder: Path, records: Mapping[str, Any]) -> None:
    """Raise DamagedFileError naming the first file that is missing, of another size or
    whose digest differs (`read_verified`). Entries without a record (older checkpoints) are
    only checked to exist."""
    for name, record in sorted(records.items()):
        read_verified(folder / name, record)


# --- JSON documents that carry their own digest ---------------------------------------------------

def seal_json(values: Mapping[str, Any], key: str = "sha256") -> dict[str, Any]:
    """`values` plus `key`: the sha256 of the canonical JSON of everything else."""
    body = {k: v for k, v in values.items() if k != key}
    return {**body, key: _json_digest(body)}


def check_sealed_json(path: Path, key: str = "sha256") -> dict[str, Any]:
    """Parse a JSON file written with `seal_json`; a document without `key` is accepted as is
    (written by an older version)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DamagedFileError(path, f"not text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise DamagedFileError(path, f"invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(values, dict):
        raise DamagedFileError(path, "not a JSON object")
    if key in values:
        body = {k: v for k, v in values.items() if k != key}
        if _json_digest(body) != values[key]:
            raise DamagedFileError(path, "content differs from the sha256 it was sealed with")
    return values


def _json_digest(values: Mapping[str, Any]) -> str:
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- tensors in safetensors files -------------------------------------------------------------

# safetensors' dtype names; the digest names a tensor's dtype as torch prints it
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_PLACEHOLDER = "0" * 64


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _tensor_prefix(name: str, dtype: str, shape) -> bytes:
    return f"{name}|{dtype}|{tuple(int(s) for s in shape)}|".encode()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{"tensors_sha256", "tensors_bytes"} for a weights file's metadata."""
    digest, total = hashlib.sha256(), 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(_tensor_prefix(name, str(t.dtype), t.shape))
        raw = _raw(t)
        digest.update(raw)
        total += raw.nbytes
    return {DIGEST_KEY: digest.hexdigest(), BYTES_KEY: str(total)}


class HashingWriter:
    """A binary file that feeds everything written to it into `digest`.

    A large block is hashed in a second thread while it is being written (hashlib and file
    writes release the GIL), so writing and hashing take the time of the slower of the two,
    and the data is read from memory once: no serialised copy, no second read of the file.
    `torch.save` accepts it as its file."""

    def __init__(self, file: Any, digest: Any = None) -> None:
        self.file, self.digest, self.size = file, digest or hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _PARALLEL_BYTES:
            pending = _hasher().submit(self.digest.update, view)
            self.file.write(view)
            pending.result()  # `data` may be a buffer that is reused when write returns
        else:
            self.digest.update(view)
            self.file.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.file.flush()

    def record(self) -> dict[str, Any]:
        """The manifest record of the file written through this writer."""
        return {"size": self.size, "sha256": self.digest.hexdigest()}


_PARALLEL_BYTES = 1 << 20
_POOL: list[ThreadPoolExecutor] = []


def _hasher() -> ThreadPoolExecutor:
    """Threads that hash while writers write: as many as cores, shared by files written at
    the same time."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="moat-hash"))
    return _POOL[0]


def write_safetensors(file: Any, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write `tensors` as a safetensors file into the open binary `file` (seekable), in one
    stream, with their digest in the metadata; return the file's manifest record
    {"size", "header_sha256"}.

    The header goes first with a placeholder for the digest, the tensors follow in name order
    while they are hashed (`HashingWriter`), then the digest is written over the placeholder.
    Every byte of the file is then covered: the header by `header_sha256`, the data by the
    tensors' digest the header holds (`verify_safetensors`)."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    names = sorted(plain)
    entries, offset = {}, 0
    for name in names:
        t = plain[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be saved")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    meta = {**{k: str(v) for k, v in (metadata or {}).items()},
            DIGEST_KEY: _PLACEHOLDER, BYTES_KEY: str(offset)}
    text = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":"))
    text += " " * (-len(text) % 8)  # the data starts 8-byte aligned
    marker = f'"{DIGEST_KEY}":"{_PLACEHOLDER}"'
    at = 8 + text.index(marker) + len(marker) - 65
    header = bytearray(struct.pack("<Q", len(text)) + text.encode("utf-8"))
    start = file.tell()
    file.write(header)
    writer = HashingWriter(file)
    for name in names:
        t = plain[name]
        writer.digest.update(_tensor_prefix(name, str(t.dtype), t.shape))
        writer.write(_raw(t))
    digest = writer.digest.hexdigest().encode()
    header[at:at + 64] = digest
    file.seek(start + at)
    file.write(digest)
    file.seek(start + len(header) + offset)
    return {"size": len(header) + offset, "header_sha256": hashlib.sha256(header).hexdigest()}


def verify_safetensors(path: str | os.PathLike, data: bytes | bytearray | memoryview,
                       header_sha256: str | None = None) -> dict[str, str]:
    """Check a safetensors file's bytes against the tensors' digest in its metadata (files
    without one, e.g. written by other tools, pass unchecked) and, when given, the sha256 of
    its header (the manifest record of `write_safetensors`); return the metadata."""
    view = memoryview(data)
    try:
        n = struct.unpack("<Q", view[:8])[0]
        if 8 + n > len(view):
            raise ValueError("header longer than the file")
        header = json.loads(bytes(view[8:8 + n]))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    if header_sha256 is not None and hashlib.sha256(view[:8 + n]).hexdigest() != header_sha256:
        raise DamagedFileError(path, "header differs from the sha256 recorded when it was "
                               "written (flipped or overwritten bytes)")
    metadata = header.pop("__metadata__", None) or {}
    if DIGEST_KEY not in metadata:
        if header_sha256 is not None:
            raise DamagedFileError(path, "has no tensor digest in its metadata")
        return metadata
    digest, total, base = hashlib.sha256(), 0, 8 + n
    try:
        for name in sorted(header):
            entry = header[name]
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= len(view) - base:
                raise ValueError(f"tensor {name!r} lies outside the file")
            digest.update(_tensor_prefix(name, str(_TORCH_DTYPES[entry["dtype"]]),
                                         entry["shape"]))
            digest.update(view[base + start:base + end])
            total += end - start
    except (KeyError, TypeError, ValueError) as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    if str(total) != metadata.get(BYTES_KEY):
        raise DamagedFileError(path, f"holds {total} bytes of tensors, "
                               f"{metadata.get(BYTES_KEY)} were written")
    if digest.hexdigest() != metadata[DIGEST_KEY]:
        raise DamagedFileError(path, "tensor data differs from the sha256 recorded when it was "
                               "written (flipped bytes)")
    return metadata


def load_safetensors(path: str | os.PathLike, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes (already verified), in name order;
    DamagedFileError if the library cannot read them."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    return {name: tensors[name] for name in sorted(tensors)}  # in name order, as safe_open


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, verified; DamagedFileError if unreadable.
    The file is read once: the digest is checked on the bytes the tensors are made from."""
    data = Path(path).read_bytes()
    metadata = verify_safetensors(path, data)
    return load_safetensors(path, data), metadata


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write a safetensors file atomically (`write_safetensors`); its manifest record."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            record = write_safetensors(f, tensors, metadata)
    return record


# --- verified reads of manifest entries -------------------------------------------------------

def read_verified(path: str | os.PathLike, record: Any) -> bytes:
    """The bytes of `path`, read once and checked against its manifest `record` ({"size",
    "sha256"} or {"size", "header_sha256"} of a safetensors file; a record that is not a
    mapping, from an older checkpoint, checks existence only)."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(path, "missing (listed in the checkpoint's manifest)")
    data = path.read_bytes()
    if not isinstance(record, Mapping):
        return data
    if len(data) != record.get("size"):
        raise DamagedFileError(path, f"size is {len(data)} bytes, {record.get('size')} were "
                               "written (truncated or overwritten)")
    if "header_sha256" in record:
        verify_safetensors(path, data, record["header_sha256"])
    elif hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise DamagedFileError(path, "content differs from the sha256 recorded when it was "
                               "written (flipped or overwritten bytes)")
    return data
