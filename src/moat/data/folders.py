"""Walking image folders safely: never out of the folder, never in a loop, regular files only.

`walk_files(folder)` lists the files under `folder` (sorted, hidden names skipped). A symbolic
link to a folder is followed only when its target lies inside `folder` and has not been read
already, so a link to a parent (`cat/loop -> ..`) or to another class's folder can neither
loop nor give images a second, wrong label. A link to a file is followed wherever it points:
datasets are often made of links into a pool of images, and a file cannot loop. Entries that
are not regular files (a FIFO named `x.png` would block the reader forever; devices, sockets,
broken links) are skipped. Every skipped entry is returned with the reason, so that callers
report them instead of losing them silently.

`output_names(paths)` names the output files of each input (its stem), unique among the inputs,
so that `a/cat.jpg` and `b/cat.jpg` (or `cat.jpg` and `cat.png`) never overwrite each other.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from moat.text import shortlist


class Skipped(NamedTuple):
    path: str
    reason: str


def walk_files(folder: str | os.PathLike, suffixes: tuple[str, ...] | None = None,
               ) -> tuple[list[str], list[Skipped]]:
    """(files under `folder` whose names end with one of `suffixes`, in any case (None:
    every file), skipped entries).

    Non-regular files and links are reported as skipped only when their name has one of
    `suffixes` (a FIFO called notes.txt among images is nobody's concern)."""
    def accept(path: str) -> bool:
        return suffixes is None or path.lower().endswith(suffixes)

    scope = os.path.realpath(folder)
    files: list[str] = []
    skipped: list[Skipped] = []
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(folder)]
    while pending:
        current = pending.pop()
        info = os.stat(current)
        if (info.st_dev, info.st_ino) in seen:
            skipped.append(Skipped(current, "a link to a folder already read (a loop); "
                                   "not followed"))
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as err:
            skipped.append(Skipped(current, f"cannot be listed ({err.strerror})"))
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):  # .DS_Store, ._x.jpg (AppleDouble), .ipynb_checkpoints
                continue
            kind = _kind(entry, scope)
            if kind == "folder":
                folders.append(entry.path)
            elif kind == "file":
                if accept(entry.path):
                    files.append(entry.path)
            elif kind.startswith("link to a folder") or accept(entry.path):
                skipped.append(Skipped(entry.path, kind))
        pending.extend(reversed(folders))  # depth first, in name order
    return sorted(files), skipped


def output_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A name for the output files of each of `paths`, unique among them: the file's stem
    (`a/cat.jpg` -> `cat`); when several inputs share a stem (`a/cat.jpg`, `b/cat.jpg`,
    `cat.png`; compared ignoring case, as macOS and Windows file systems do), the first keeps
    it and the others, in input order, get `cat-2`, `cat-3`, ..., skipping any name that is
    another input's stem."""
    stems = [Path(p).stem for p in paths]
    inputs = {s.casefold() for s in stems}
    used: set[str] = set()
    names = []
    for stem in stems:
        name, n = stem, 1
        while name.casefold() in used or (n > 1 and name.casefold() in inputs):
            n += 1
            name = f"{stem}-{n}"
        used.add(name.casefold())
        names.append(name)
    return names


def class_folders(root: str | os.PathLike) -> tuple[list[str], list[Skipped]]:
    """(sorted names of the class folders in `root`, skipped entries).

    Hidden folders (.git, .ipynb_checkpoints) are no class. A class folder may be a link
    (e.g. to another disk), but not to `root` itself or a folder above it: that would read
    the whole dataset again under one label."""
    inside = os.path.realpath(root)
    names, skipped = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        target = os.path.realpath(entry.path)
        if entry.is_symlink() and (inside == target or inside.startswith(target + os.sep)):
            skipped.append(Skipped(entry.path, f"a link to {target}, a folder above the data "
                                   "(a loop); not followed"))
            continue
        names.append(entry.name)
    return names, skipped


def _kind(entry: os.DirEntry, scope: str) -> str:
    """'file', 'folder', or why the entry is skipped."""
    try:
        info = os.stat(entry.path)  # follows links
    except OSError as err:
        return f"a broken link ({err.strerror})" if entry.is_symlink() else \
            f"cannot be read ({err.strerror})"
    if stat.S_ISREG(info.st_mode):
        return "file"
    if stat.S_ISDIR(info.st_mode):
        if not entry.is_symlink():
            return "folder"
        target = os.path.realpath(entry.path)
        if target == scope or target.startswith(scope + os.sep):
            return "folder"  # inside: followed once (a loop is caught by the caller)
        return f"link to a folder outside {scope} ({target}); not followed"
    what = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else
            "a device" if stat.S_ISBLK(info.st_mode) or stat.S_ISCHR(info.st_mode) else
            "a socket" if stat.S_ISSOCK(info.st_mode) else "a special file")
    return f"{what}, not a regular file"


def describe_skipped(skipped: list[Skipped]) -> str:
    return shortlist((f"{s.path}: {s.reason}" for s in skipped), sep="; ")
