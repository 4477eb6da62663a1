"""File systems for fault tests: a small one that fills up, a read-only one (tmpfs mounts as
root; without root, permissions stand in for read-only and ENOSPC is simulated)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int, monkeypatch) -> Iterator[Path]:
    """A `size_mb` MiB file system at `path`; where mounting is impossible, every write of
    more than `size_mb` MiB in total under `path` fails with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    if _mount(path, f"size={size_mb}m"):
        try:
            yield path
        finally:
            _unmount(path)
        return
    import moat.atomic as atomic

    written = {"bytes": 0}
    original = atomic.write_synced

    def limited(target, data, mode=0o644, **kwargs):
        if str(target).startswith(str(path)):
            written["bytes"] += len(data)
            if written["bytes"] > size_mb << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return original(target, data, mode, **kwargs)

    monkeypatch.setattr(atomic, "write_synced", limited)
    import moat.train.checkpoint_folder as checkpoint

    monkeypatch.setattr(checkpoint, "write_synced", limited)
    streamed = checkpoint.write_safetensors  # checkpoint tensors are written by threads

    def limited_stream(files, *args):
        records = streamed(files, *args)
        for target, record in records.items():
            if str(target).startswith(str(path)):
                written["bytes"] += record["size"]
                if written["bytes"] > size_mb << 20:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return records

    monkeypatch.setattr(checkpoint, "write_safetensors", limited_stream)
    yield path


@contextlib.contextmanager
def read_only(path: Path, fill) -> Iterator[Path]:
    """`path` filled by `fill(path)`, then made read-only (a read-only tmpfs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    if _mount(path, "size=64m"):
        try:
            fill(path)
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
            yield path
        finally:
            _unmount(path)
        return
    fill(path)
    for folder, dirs, _ in os.walk(path):
        os.chmod(folder, 0o555)
    try:
        yield path
    finally:
        for folder, dirs, _ in os.walk(path):
            os.chmod(folder, 0o755)
