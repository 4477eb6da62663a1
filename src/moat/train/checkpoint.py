"""The checkpoints of a run: `CheckpointManager` saves them, finds the newest intact one and
keeps the last few; `resolve_checkpoint` finds the one a path names. What one checkpoint
folder holds, and how it is read back verified, is `moat.train.checkpoint_folder`'s (its
names are importable here too).

    RUN_DIR/checkpoints/step-000001234/   one checkpoint (moat.train.checkpoint_folder)
    RUN_DIR/checkpoints/latest            name of the newest complete checkpoint
    RUN_DIR/checkpoints/best.json         the checkpoint with the best task.main_metric
    RUN_DIR/checkpoints/damaged/          damaged checkpoints a resume set aside

A checkpoint is written into a hidden temporary directory, every file is fsync'ed, and the
directory is renamed into place (atomic on POSIX), then the `latest` pointer is replaced
atomically. A process killed at any moment leaves either the previous state or the new one,
never a half-written checkpoint; leftovers of an interrupted write are removed on the next
save (and at once when the write fails, e.g. on a full disk). Only the last `keep_last`
checkpoints are kept, plus the best one.

In training, `save(background=True)` returns once the files are written (hashed, in the page
cache); making them durable (fsync, which waits for the disk) and renaming them into place
happen in a background thread while training goes on, as PyTorch's distributed checkpoint
does with `async_save`. Nothing is visible under the checkpoint's name before it is on the
disk, so the promise above holds for a kill at any moment, including during that commit. The
next `save`, and everything that reads the checkpoints folder (`latest`, `newest_intact`,
`mark_best`, ...), first waits for it (`wait`), and raises its error if it failed (a full
disk at fsync); so does the end of training, and Python joins the thread before the process
exits.

`newest_intact` skips a damaged newest checkpoint (with a warning) and returns the previous
intact one, read and verified, which a resume loads without reading it again; a checkpoint
folder named explicitly that is damaged raises DamagedFileError naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from moat.atomic import atomic_write_text, fsync_dir, sync_files
from moat.integrity import DamagedFileError
from moat.paths import regular_file
from moat.train.checkpoint_folder import META_FILE, STATE_FILE, Checkpoint, is_complete, \
    verify_checkpoint, write_checkpoint
# a checkpoint's readers, importable beside the manager that finds the checkpoint
from moat.train.checkpoint_folder import read_meta, read_state, read_weights  # noqa: F401
from moat.train.checkpoint_folder import split_tensors  # noqa: F401

log = logging.getLogger("moat")

STEP_PREFIX = "step-"
DAMAGED_DIR = "damaged"  # checkpoints/damaged/: damaged checkpoints set aside by a resume


class CheckpointManager:
    """Writes, finds and prunes the checkpoints of one run directory (call on rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self._committer: ThreadPoolExecutor | None = None  # one thread: commits in order
        self._queued: list[Future] = []

    # .. writing ..
    def save(self, step: int, *, model: Mapping[str, torch.Tensor],
             ema: Mapping[str, torch.Tensor] | None, state: Mapping[str, Any],
             meta: Mapping[str, Any], weights_metadata: Mapping[str, str],
             background: bool = False) -> Path:
        """Write checkpoint `step`, make it durable, rename it into place, point `latest` at
        it and prune old ones. With `background`, return once the files are written and do the
        rest in the background (see the module's docstring): the path exists once `wait` has
        returned."""
        self.wait()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        name = f"{STEP_PREFIX}{step:09d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            # synced as written when the caller waits anyway (writeback overlaps the writes);
            # in the background, written to the page cache only, synced by _commit
            write_checkpoint(tmp, name, step, model, ema, state, meta, weights_metadata,
                             durable=not background)
        except BaseException:  # a full disk, Ctrl-C: free the space, keep the previous state
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._queue(self._commit, tmp, name)
        if not background:
            self.wait()
        return self.dir / name

    def _commit(self, tmp: Path, name: str) -> None:
        """The written files onto the disk, then the folder under its name, then `latest`."""
        try:
            sync_files(sorted(p for p in tmp.iterdir()))
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.dir / name
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = self.dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.dir)
        atomic_write_text(self.dir / "latest", name + "\n")
        self._prune()

    def _queue(self, fn, *args) -> None:
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="moat-checkpoint")
        self._queued.append(self._committer.submit(fn, *args))

    def wait(self) -> None:
        """Until every save and mark so far is on the disk and in place; the first error of
        one that failed is raised here."""
        queued, self._queued = self._queued, []
        for job in queued:
            job.exception()  # waits
        for job in queued:
            job.result()

    def mark_best(self, checkpoint: Path, metric: str, value: float, weights: str) -> None:
        """Record `checkpoint` as the best one, after the saves before it (in the background),
        and prune."""
        self._queue(atomic_write_text, self.dir / "best.json", json.dumps(
            {"name": checkpoint.name, "metric": metric, "value": value, "weights": weights},
            indent=1) + "\n")
        self._queue(self._prune)

    def best(self) -> dict[str, Any] | None:
        self.wait()
        return self._best()

    def _best(self) -> dict[str, Any] | None:
        path = self.dir / "best.json"
        if not path.is_file():
            return None
        try:
            best = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return best if is_complete(self.dir / best.get("name", "")) else None

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        self.wait()
        return self._complete()

    def _complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.name.startswith(STEP_PREFIX) and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (`latest` if it is complete), not verified."""
        self.wait()
        pointer = self.dir / "latest"
        if pointer.is_file():
            candidate = self.dir / pointer.read_text(errors="replace").strip()
            if candidate.name.startswith(STEP_PREFIX) and is_complete(candidate):
                return candidate
        done = self.complete()
        return done[-1] if done else None

    def folders(self) -> list[Path]:
        """Every checkpoint folder, complete, damaged or not, newest first."""
        self.wait()
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir()
                       if p.name.startswith(STEP_PREFIX) and p.is_dir()),
                      key=lambda p: p.name, reverse=True)

    def latest_intact(self, warn: bool = True) -> Path | None:
        """The checkpoint to resume from or evaluate: the newest one whose files verify.

        A damaged newer checkpoint (a flipped byte, a truncated or missing file, a corrupt
        meta.json) is skipped with a warning that names the damaged file."""
        intact, _ = self.newest_intact(warn)
        return intact.path if intact is not None else None

    def newest_intact(self, warn: bool = True) -> tuple[Checkpoint | None, dict[Path, str]]:
        """(the newest checkpoint whose files verify, its files read and held, {newer damaged
        folder: what is wrong})."""
        damaged: dict[Path, str] = {}
        folders = self.folders()
        for i, path in enumerate(folders):
            try:
                return Checkpoint(path).verify(), damaged
            except DamagedFileError as err:
                damaged[path] = str(err)
                if warn:
                    older = "the previous one" if i + 1 < len(folders) else "none left"
                    log.warning("checkpoint %s is damaged, falling back to %s: %s", path.name,
                                older, err)
        return None, damaged

    def set_aside(self, path: Path) -> Path:
        """Move a damaged checkpoint folder to checkpoints/damaged/ (never deleted: a user
        may recover its weights); a resumed run would otherwise save the same step over it."""
        self.wait()
        target_dir = self.dir / DAMAGED_DIR
        target_dir.mkdir(exist_ok=True)
        target, n = target_dir / path.name, 1
        while target.exists():
            n += 1
            target = target_dir / f"{path.name}-{n}"
        os.replace(path, target)
        fsync_dir(self.dir)
        return target

    def prune(self) -> None:
        self.wait()
        self._prune()

    def _prune(self) -> None:  # in the commit thread: no wait
        done = self._complete()
        best = self._best()
        keep = {p.name for p in done[-self.keep_last:]}
        if best:
            keep.add(best["name"])
        for path in done:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        for path in self.dir.iterdir():
            if path.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                    missing_ok=True)



def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory, its checkpoints/ folder or one checkpoint folder -> checkpoint folder.
    A weights file is returned as is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        regular_file(path, "checkpoint")  # a FIFO or device: refused, never opened
    if path.is_file():
        if path.name in (META_FILE, STATE_FILE):
            return path.parent
        return path
    if path.name.startswith(STEP_PREFIX) or (path / META_FILE).exists():
        verify_checkpoint(path)  # named explicitly: damage is an error, not a fallback
        return path
    for manager in (CheckpointManager(path), CheckpointManager(path.parent)):
        if manager.dir.resolve() == path.resolve() or manager.run_dir.resolve() == path.resolve():
            latest = manager.latest_intact()
            if latest is not None:
                return latest
    raise FileNotFoundError(f"no complete checkpoint in {str(path)!r} (expected RUN_DIR, "
                            "RUN_DIR/checkpoints/step-N, or a .safetensors file)")

