"""Atomic and verified files: nothing half-written under a user's name, nothing damaged loaded.

Atomic: every output is written to a hidden temp file in the same folder, fsync'ed and renamed
over its name (`atomic_write_bytes`, or `atomic_output` for libraries that write a path
themselves); a failure (a full disk, Ctrl-C, an invalid ONNX model) removes the temp file and
leaves the previous file, if any, untouched.

Verified: sizes and sha256 digests are written with every file we make and checked on load.

Two kinds of record:

* a **manifest** of a folder (`{name: {"size": bytes, "sha256": hex}}`), stored in a
  checkpoint's meta.json; `verify_manifest` checks every listed file;
* a **tensor digest** in a safetensors file's own metadata (`tensors_sha256`, `tensors_bytes`):
  the sha256 of every tensor's name, dtype, shape and raw bytes, in name order. A file cannot
  hold the digest of its own bytes, but it can hold the digest of its tensors, which is what a
  flipped byte in the data section changes. `verify_tensors` recomputes it after loading.

A check that fails raises `DamagedFileError`, which names the file and says what to do.
Everything here is plain hashlib; the cost is one read of the data (about 1 GB/s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
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


def manifest(contents: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} of files about to be written with these bytes."""
    return {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(contents.items())}


def verify_manifest(folder: Path, records: Mapping[str, Any]) -> None:
    """Raise DamagedFileError naming the first file that is missing, of another size or
    whose sha256 differs. Entries without a record (older checkpoints) are only checked to
    exist."""
    for name, record in sorted(records.items()):
        path = folder / name
        if not path.is_file():
            raise DamagedFileError(path, "missing (listed in the checkpoint's manifest)")
        if not isinstance(record, Mapping):
            continue
        size = path.stat().st_size
        if size != record.get("size"):
            raise DamagedFileError(path, f"size is {size} bytes, {record.get('size')} were "
                                   "written (truncated or overwritten)")
        if file_sha256(path) != record.get("sha256"):
            raise DamagedFileError(path, "content differs from the sha256 recorded when it was "
                                   "written (flipped or overwritten bytes)")


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

def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{"tensors_sha256", "tensors_bytes"} for a weights file's metadata."""
    digest, total = hashlib.sha256(), 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = t.reshape(-1).view(torch.uint8).numpy()
        digest.update(raw)
        total += raw.nbytes
    return {DIGEST_KEY: digest.hexdigest(), BYTES_KEY: str(total)}


def verify_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str]) -> None:
    """Compare loaded tensors with the digest in their file's metadata (files without one,
    e.g. written by other tools, pass unchecked)."""
    if DIGEST_KEY not in metadata:
        return
    actual = tensors_digest(tensors)
    if actual[BYTES_KEY] != metadata.get(BYTES_KEY):
        raise DamagedFileError(path, f"holds {actual[BYTES_KEY]} bytes of tensors, "
                               f"{metadata.get(BYTES_KEY)} were written")
    if actual[DIGEST_KEY] != metadata[DIGEST_KEY]:
        raise DamagedFileError(path, "tensor data differs from the sha256 recorded when it was "
                               "written (flipped bytes)")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, verified; DamagedFileError if unreadable."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as err:
        raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
    verify_tensors(path, tensors, metadata)
    return tensors, metadata


def safetensors_bytes(tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with the tensor digest added to `metadata`.

    Serialised in memory so that the caller writes it with plain file I/O: a full disk is
    then an OSError (ENOSPC) naming the file, not a library error."""
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).contiguous()
             for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return save(plain, metadata={**meta, **tensors_digest(plain)})


def torch_save_bytes(obj: Any) -> bytes:
    """torch.save into memory (see `safetensors_bytes`: I/O errors stay I/O errors)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
