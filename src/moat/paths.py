"""Checks of the paths a user gives (arguments, entries of a list, values in a config) before
anything opens them: a FIFO given as a CSV list would block `open()` forever, a folder where
a file is expected fails inside a library with a message about something else.

`regular_file(path, what)` and `folder(path, what)` return the path as a `Path`, or raise:
FileNotFoundError (an OSError: the boundary prints its message) when nothing is there, and
InvalidInputError naming what is there instead (a folder, a FIFO, a device, a socket).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from moat.errors import InvalidInputError

__all__ = ["folder", "regular_file"]


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (or a link to one)."""
    return _require(path, what, stat.S_ISREG, "a regular file", "a file")


def folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """`path` if it is a folder (or a link to one)."""
    return _require(path, what, stat.S_ISDIR, "a folder", "a folder")


def _require(path: str | os.PathLike, what: str, is_kind, kind: str, give: str) -> Path:
    path = Path(path)
    mode = _mode(path, what)
    if not is_kind(mode):
        raise InvalidInputError(f"{what} {str(path)!r} is {_kind(mode)}, not {kind}; "
                                f"give {give}")
    return path


def _mode(path: Path, what: str) -> int:
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if os.path.islink(path) else ""
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{broken}") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (a parent of it is a "
                                "file)") from None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a file or folder"
