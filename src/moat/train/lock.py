"""The run-folder lock: one live training run per RUN_DIR.

`moat train` holds an exclusive `flock` on RUN_DIR/.lock for as long as it runs and writes its
process id, host, start time and command line into the file. The kernel releases a flock when
its process dies, however it dies (kill -9, a crash, a power cut), so a lock file left by a
dead process is simply taken over, with a note naming the process that left it. A second
`moat train` into the same folder, or a `--resume` of a run that is still alive, is refused
with `RunLockedError` naming the live process.

On file systems without flock (some network mounts) the lock falls back to the recorded
process id: a lock whose process no longer exists on this host is stale; a lock recorded by
another host is never taken over (its process cannot be looked up from here): the refusal
says to delete the lock file once that run is known to be gone. A run that ends, however it
ends short of a kill, empties the file, which frees it for every host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from moat.errors import InvalidInputError, MoatError
from moat.text import shortlist

log = logging.getLogger("moat")

LOCK_FILE = ".lock"


class RunLockedError(MoatError, RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """`with RunLock(run_dir): ...` holds RUN_DIR/.lock for the duration."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                holder = _read(self.path)
                os.close(fd)
                raise RunLockedError(_refusal(self.run_dir, holder)) from None
            if err.errno != errno.ENOLCK:
                os.close(fd)
                raise
            holder = _read(self.path)  # no flock here: trust a recorded live process
            if holder and holder.get("host") != socket.gethostname():
                # its process cannot be looked up from here: never taken over
                os.close(fd)
                raise RunLockedError(_refusal(self.run_dir, holder) + _NO_FLOCK.format(
                    host=holder.get("host"), lock=self.path)) from None
            if holder and holder.get("pid") != os.getpid() and _alive(holder.get("pid")):
                os.close(fd)
                raise RunLockedError(_refusal(self.run_dir, holder)) from None
        previous = _read(self.path)
        if previous and previous.get("pid") and previous.get("pid") != os.getpid():
            log.info("taking over the lock of %s left by process %s (no longer running)",
                     self.run_dir, previous.get("pid"))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds the run
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# What a run writes into RUN_DIR; anything else there belongs to the user.
RUN_FILES = {LOCK_FILE, "config.yaml", "train.log", "metrics.jsonl", "checkpoints",
             "tensorboard", "eval", "curves.png"}


def check_new_run_folder(run_dir: str | os.PathLike) -> None:
    """Refuse to start a run in a folder holding files a run did not write (`--output .` in
    a project would overwrite its config.yaml)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise InvalidInputError(f"--output {run_dir} already holds files that are not a moat "
                                f"run's ({shortlist(foreign)}); a run writes config.yaml, "
                                "train.log and checkpoints/ there: choose a new or empty folder")


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


_NO_FLOCK = (". This file system has no flock, so whether that run on {host} is still alive "
             "cannot be checked from here: if it is not, delete {lock} and run again")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refusal(run_dir: Path, holder: dict[str, Any]) -> str:
    who = f"process {holder.get('pid', '?')}"
    if holder.get("host") and holder.get("host") != socket.gethostname():
        who += f" on {holder['host']}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) \
        if isinstance(holder.get("started"), (int, float)) else "?"
    command = f" ({holder['command']})" if holder.get("command") else ""
    return (f"{run_dir} is in use by {who}, running since {since}{command}. Wait for it to "
            f"finish, stop it (kill {holder.get('pid', 'PID')}) before --resume, or choose "
            "another --output")
