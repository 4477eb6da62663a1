"""Verified files: nothing damaged loaded. Sizes and digests are written with every file we
make (atomically, `moat.atomic`, whose names are importable here too) and checked on load.

Two kinds of record:

* a **tensor digest** in a safetensors file's own metadata (`tensors_xxh3_per_tensor`,
  `tensors_bytes`): the sha256 over every tensor's name, dtype, shape and the XXH3-128
  checksum of its raw bytes, in name order (files written before it hold `tensors_sha256`,
  one sha256 over the names and bytes themselves; both are checked). A file cannot hold the
  digest of its own bytes, but it can hold the digest of its tensors, which is what a flipped
  byte in the data section changes. `verify_safetensors` recomputes it from the bytes the
  tensors are loaded from;
* a **manifest** of a folder, stored in a checkpoint's meta.json: `{name: {"size", "sha256"}}`
  for a file, `{name: {"size", "header_sha256"}}` for a safetensors file (its header's sha256;
  the header holds the tensor digest, which covers the rest). `read_verified` checks a
  listed file on the bytes it returns (`moat.train.checkpoint_folder.Checkpoint`: every file).

Written in one pass: `write_safetensors` shares the tensors of its files among threads (one
a core); each tensor is hashed and written at its offset from the same memory, block by
block while the block is in the CPU's cache, with no serialised copy and no second read
(a checksum per tensor lets every core hash). Verified in one read: every check reads the
file once and works on those bytes, the per-tensor checksums in threads too.

Why XXH3-128 for the tensors' bytes, not sha256: the digest sits in the file (or in the
meta.json beside it), so whoever can change the bytes can change the digest too; what it
guards against is accidental damage (a truncated copy, a flipped bit, a half-synced disk), and
a 128-bit checksum made for that finds it as surely. It runs at about 18 GB/s a core here
against sha256's 1.8 GB/s: a 426 MB checkpoint is hashed in 0.02 s instead of 0.25 s, which
was more than the whole write to the page cache. Digests that identify a file for others (a
release's sha256 in the catalogue, `file_sha256`, a manifest's `header_sha256`) stay sha256.

A check that fails raises `DamagedFileError`, which names the file and says what to do.
Everything here is hashlib and xxhash.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash

# the atomic writes are imported from here too, beside the checks of what they wrote
from moat.atomic import (atomic_output, atomic_write_bytes, atomic_write_text,  # noqa: F401
                         fsync_dir, start_writeback, sync_files, write_synced)
from moat.errors import InvalidInputError, MoatError

# the digest of a weights file's tensors, in its metadata: per tensor (written now) or one
# stream over all of them (written before); their byte count
PER_TENSOR_KEY, DIGEST_KEY, BYTES_KEY = ("tensors_xxh3_per_tensor", "tensors_sha256",
                                         "tensors_bytes")
_tensor_checksum = xxhash.xxh3_128  # of one tensor's bytes (why not sha256: the docstring)
_DIGEST_KEYS = (PER_TENSOR_KEY, DIGEST_KEY)
_CHUNK = 1 << 22


class DamagedFileError(MoatError, ValueError):
    """A file whose content is not what was written: truncated, flipped bytes, unreadable."""

    def __init__(self, path: str | os.PathLike, what: str, advice: str | None = None) -> None:
        self.path = os.fspath(path)
        advice = advice or ("the file is damaged (disk error, interrupted copy or edit); "
                            "restore it from a copy or write it again")
        super().__init__(f"{self.path}: {what}; {advice}")


# --- manifests of files ---------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


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
_JOB_BYTES, _BLOCK_BYTES = 4 << 20, 1 << 20  # work shared between threads; hashed then written


def can_save(t: torch.Tensor) -> bool:
    """Whether `t`'s dtype can be stored in a safetensors file."""
    return t.dtype in _SAFETENSORS_DTYPES


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _tensor_prefix(name: str, dtype: str, shape) -> bytes:
    return f"{name}|{dtype}|{tuple(int(s) for s in shape)}|".encode()


def _combine(prefixes: list[bytes], digests: list[bytes]) -> str:
    """The per-tensor digest of a file: sha256 over each tensor's prefix and checksum."""
    return hashlib.sha256(b"".join(p + d for p, d in zip(prefixes, digests))).hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{"tensors_xxh3_per_tensor", "tensors_bytes"} of `tensors`, as a weights file written
    by `write_safetensors` records them in its metadata."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    return {PER_TENSOR_KEY: _combine(
        [_tensor_prefix(k, str(t.dtype), t.shape) for k, t in plain.items()],
        [_tensor_checksum(_raw(t)).digest() for t in plain.values()]),
        BYTES_KEY: str(sum(t.numel() * t.element_size() for t in plain.values()))}


_POOL: dict[int, ThreadPoolExecutor] = {}  # {process id: its threads}


def _workers() -> ThreadPoolExecutor:
    """Threads that hash and write (or verify) files: one per usable core, at most 8
    (xxhash, hashlib and file writes release the GIL). A forked
    process gets its own (the parent's threads do not exist in it)."""
    if os.getpid() not in _POOL:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        _POOL.clear()
        _POOL[os.getpid()] = ThreadPoolExecutor(max(1, min(cores, 8)),
                                                thread_name_prefix="moat-io")
    return _POOL[os.getpid()]


def _jobs(*files: list[tuple[Any, int, int]]) -> list[list[tuple[Any, int, int]]]:
    """The (item, start, end) spans of each file, in file order, grouped into runs of at
    least _JOB_BYTES within one file, largest first: the threads finish together."""
    jobs: list[list[tuple[Any, int, int]]] = []
    for spans in files:
        jobs.append([])
        for span in spans:
            if sum(e - s for _, s, e in jobs[-1]) >= _JOB_BYTES:
                jobs.append([])
            jobs[-1].append(span)
    return sorted((job for job in jobs if job), key=lambda job: -sum(e - s for _, s, e in job))


def _run_all(fn, jobs: list) -> list:
    """fn(job) for every job in the worker threads; the first error is raised once every
    job has stopped (none still writes to a file the caller is about to close)."""
    pending = [_workers().submit(fn, job) for job in jobs]
    for job in pending:
        job.exception()  # waits
    return [job.result() for job in pending]


class _Layout:
    """One safetensors file being written: its header and where each tensor goes."""

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None, durable: bool) -> None:
        self.path, self.durable = path, durable
        self.tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
        entries, offset = {}, 0
        for name, t in self.tensors.items():
            if not can_save(t):
                raise InvalidInputError(f"tensor {name!r}: dtype {t.dtype} cannot be saved")
            size = t.numel() * t.element_size()
            entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + size]}
            offset += size
        meta = {k: str(v) for k, v in (metadata or {}).items() if k not in _DIGEST_KEYS}
        meta.update({PER_TENSOR_KEY: _PLACEHOLDER, BYTES_KEY: str(offset)})
        text = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":"))
        text += " " * (-len(text) % 8)  # the data starts 8-byte aligned
        marker = f'"{PER_TENSOR_KEY}":"{_PLACEHOLDER}"'
        self.at = 8 + text.index(marker) + len(marker) - 65
        self.header = bytearray(struct.pack("<Q", len(text)) + text.encode("utf-8"))
        self.size = len(self.header) + offset
        self.spans = [((self, name), len(self.header) + e["data_offsets"][0],
                       len(self.header) + e["data_offsets"][1]) for name, e in entries.items()]
        self.digests: dict[str, bytes] = {}
        self.fd = -1

    def finish(self) -> dict[str, Any]:
        """Write the header with the tensors' digest, fsync; the file's manifest record."""
        self.header[self.at:self.at + 64] = _combine(
            [_tensor_prefix(n, str(t.dtype), t.shape) for n, t in self.tensors.items()],
            [self.digests[n] for n in self.tensors]).encode()
        _pwrite(self.fd, memoryview(self.header), 0)
        if self.durable:
            (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(self.fd)
        return {"size": self.size, "header_sha256": hashlib.sha256(self.header).hexdigest()}


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _write_job(job: list[tuple[Any, int, int]]) -> None:
    for (layout, name), start, end in job:
        view, digest = _raw(layout.tensors[name]), _tensor_checksum()
        for block in range(0, view.nbytes, _BLOCK_BYTES):  # hashed while in the CPU's cache
            part = view[block:block + _BLOCK_BYTES]
            digest.update(part)
            _pwrite(layout.fd, part, start + block)
        layout.digests[name] = digest.digest()
    (layout, _), start, _ = job[0]
    if layout.durable:
        start_writeback(layout.fd, start, job[-1][2] - start)


def write_safetensors(files: Mapping[Path, tuple[Mapping[str, torch.Tensor],
                                                 Mapping[str, str] | None]],
                      durable: bool = True) -> dict[Path, dict[str, Any]]:
    """Write safetensors files {path: (tensors, metadata)}, each with its tensors' digest in
    its metadata, synced to the disk (unless `durable` is False: then `sync_files` later);
    return {path: manifest record {"size", "header_sha256"}}.

    One pass over the tensors' memory, no copy: the tensors of every file are shared among
    threads in runs of a few MB; a thread hashes each tensor (its own checksum) and writes it
    at its offset in the file; the header, written last, holds the digest of the
    tensors' digests (`PER_TENSOR_KEY`). Every byte of a file is then covered: the header by
    `header_sha256`, the data by the digest in the header (`verify_safetensors`)."""
    layouts = [_Layout(Path(path), *args, durable) for path, args in files.items()]
    try:
        for layout in layouts:
            layout.fd = os.open(layout.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        _run_all(_write_job, _jobs(*([s for s in layout.spans if s[2] > s[1]]
                                     for layout in layouts)))
        for layout in layouts:  # tensors without bytes
            for (_, name), start, end in layout.spans:
                layout.digests.setdefault(name, _tensor_checksum().digest())
        records = _run_all(_Layout.finish, layouts)
    finally:
        for layout in layouts:
            if layout.fd >= 0:
                os.close(layout.fd)
    return {layout.path: record for layout, record in zip(layouts, records)}


def _verify_job(job: list[tuple[Any, int, int]]) -> list[tuple[Any, bytes]]:
    return [(item, _tensor_checksum(view[start:end]).digest())
            for (item, view), start, end in job]


def verify_safetensors(path: str | os.PathLike, data: bytes | bytearray | memoryview,
                       header_sha256: str | None = None) -> dict[str, str]:
    """Check a safetensors file's bytes against the tensors' digest in its metadata (files
    without one, e.g. written by other tools, pass unchecked) and, when given, the sha256 of
    its header (the manifest record of `write_safetensors`); return the metadata. Both
    digests are understood: per tensor (hashed in threads) and, in files written before
    it, one stream over every tensor."""
    view = memoryview(data)
    try:
        n = struct.unpack("<Q", view[:8])[0]
        if 8 + n > len(view):
            raise InvalidInputError("header longer than the file")
        header = json.loads(bytes(view[8:8 + n]))
        if not isinstance(header, dict):
            raise InvalidInputError("header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    if header_sha256 is not None and hashlib.sha256(view[:8 + n]).hexdigest() != header_sha256:
        raise DamagedFileError(path, "header differs from the sha256 recorded when it was "
                               "written (flipped or overwritten bytes)")
    metadata = header.pop("__metadata__", None) or {}
    key = next((k for k in _DIGEST_KEYS if k in metadata), None)
    if key is None:
        if header_sha256 is not None:
            raise DamagedFileError(path, "has no tensor digest in its metadata")
        return metadata
    prefixes, spans, base = [], [], 8 + n
    try:
        for name in sorted(header):
            entry = header[name]
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= len(view) - base:
                raise InvalidInputError(f"tensor {name!r} lies outside the file")
            prefixes.append(_tensor_prefix(name, str(_TORCH_DTYPES[entry["dtype"]]),
                                           entry["shape"]))
            spans.append(((len(spans), view), base + start, base + end))
    except (KeyError, TypeError, ValueError) as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    total = sum(end - start for _, start, end in spans)
    if str(total) != metadata.get(BYTES_KEY):
        raise DamagedFileError(path, f"holds {total} bytes of tensors, "
                               f"{metadata.get(BYTES_KEY)} were written")
    if key == PER_TENSOR_KEY:
        digests = dict(d for job in _run_all(_verify_job, _jobs(spans)) for d in job)
        found = _combine(prefixes, [digests[i] for i in range(len(spans))])
    else:  # DIGEST_KEY: one stream, as moat wrote files before the per-tensor digest
        stream = hashlib.sha256()
        for prefix, (_, start, end) in zip(prefixes, spans):
            stream.update(prefix)
            stream.update(view[start:end])
        found = stream.hexdigest()
    if found != metadata[key]:
        raise DamagedFileError(path, "tensor data differs from the digest recorded when it was "
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
        record = write_safetensors({tmp: (tensors, metadata)})[tmp]
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
