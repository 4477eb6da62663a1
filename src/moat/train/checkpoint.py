"""Checkpoints: complete, atomic, safe to load.

Layout of a run directory:

    RUN_DIR/checkpoints/step-000001234/
        model.safetensors   model weights (+ metadata: task, variant, classes, ...)
        ema.safetensors     EMA weights (when EMA is on)
        state.safetensors   the tensors of the training state (the optimiser's moments, ...)
        state.pt            the rest of it: optimiser settings, schedule, grad scaler, RNG
                            states of every process (python, numpy, torch, cuda), and where
                            each tensor of state.safetensors goes; plain containers only,
                            loaded with torch.load(weights_only=True), never arbitrary pickle
        meta.json           epoch, step, position in the epoch, metrics, config, versions,
                            task metadata; written last
    RUN_DIR/checkpoints/latest      name of the newest complete checkpoint
    RUN_DIR/checkpoints/best.json   the checkpoint with the best task.main_metric

A checkpoint is written into a hidden temporary directory, every file is fsync'ed, and the
directory is renamed into place (atomic on POSIX), then the `latest` pointer is replaced
atomically. A process killed at any moment leaves either the previous state or the new one,
never a half-written checkpoint; leftovers of an interrupted write are removed on the next
save (and at once when the write fails, e.g. on a full disk). Only the last `keep_last`
checkpoints are kept, plus the best one.

In training, `save(background=True)` returns once the files are written (hashed, in the page
cache); making them durable (fsync, which waits for the disk) and renaming them into place
happen in a background thread while training goes on, as PyTorch's distributed checkpoint
does with `async_save`. Nothing
is visible under the checkpoint's name before it is on the disk, so the promise above holds
for a kill at any moment, including during that commit. The next `save`, and everything that
reads the checkpoints folder (`latest`, `newest_intact`, `mark_best`, ...), first waits for
it (`wait`), and raises its error if it failed (a full disk at fsync); so does the end of
training, and Python joins the thread before the process exits.

meta.json lists the size and digest of every other file (a safetensors file: the sha256 of
its header, which holds its tensors' digest; state.pt: its sha256), all computed while the
files are written (the tensors hashed and written in threads, `moat.integrity`), and is
sealed with the sha256 of its own content. A `Checkpoint` reads each file once and verifies
those bytes, which its weights and state then come from: `CheckpointManager.newest_intact`
skips a damaged newest checkpoint (with a warning) and returns the previous intact one, read
and verified, which a resume loads without reading it again; a checkpoint folder named
explicitly that is damaged raises DamagedFileError naming the file. Checkpoints written
before state.safetensors (all the state in state.pt) or before manifests still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moat.errors import InvalidInputError
from moat.integrity import DamagedFileError, atomic_write_text, can_save, check_sealed_json, \
    fsync_dir, load_safetensors, read_verified, seal_json, sync_files, verify_safetensors, \
    write_safetensors, write_synced
from moat.paths import regular_file
from moat.weights.files import load_state_dict
from moat.weights.metadata import WeightsMetadata

log = logging.getLogger("moat")

STEP_PREFIX = "step-"
DAMAGED_DIR = "damaged"  # checkpoints/damaged/: damaged checkpoints set aside by a resume
MODEL_FILE, EMA_FILE, STATE_FILE, STATE_TENSORS_FILE, META_FILE = (
    "model.safetensors", "ema.safetensors", "state.pt", "state.safetensors", "meta.json")


def versions() -> dict[str, str]:
    import moat

    return {"moat": moat.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# --- writing ------------------------------------------------------------------------------------

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
            self._write_files(tmp, name, step, model, ema, state, meta, weights_metadata,
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

    @staticmethod
    def _write_files(tmp: Path, name: str, step: int, model: Mapping[str, torch.Tensor],
                     ema: Mapping[str, torch.Tensor] | None, state: Mapping[str, Any],
                     meta: Mapping[str, Any], weights_metadata: Mapping[str, str],
                     durable: bool) -> None:
        skeleton, tensors, paths = split_tensors(state)
        files = {tmp / MODEL_FILE: (model, weights_metadata)}
        if ema is not None:  # weights files carry their tensors' digest (see read_weights)
            files[tmp / EMA_FILE] = (ema, {**weights_metadata, "weights": "ema"})
        files[tmp / STATE_TENSORS_FILE] = (tensors, {"format": "moat-train-state"})
        # every tensor hashed while written, in threads (moat.integrity)
        records = {path.name: record
                   for path, record in write_safetensors(files, durable).items()}
        buffer = io.BytesIO()  # the rest of the state: small (lists, numbers, RNG states)
        torch.save({"state": skeleton, "tensors": paths}, buffer)
        write_synced(tmp / STATE_FILE, buffer.getvalue(), durable=durable)
        records[STATE_FILE] = {"size": buffer.tell(),
                               "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
        meta = seal_json({**meta, "step": step, "name": name, "saved_at": time.time(),
                          "versions": versions(), "files": dict(sorted(records.items()))})
        write_synced(tmp / META_FILE, json.dumps(meta, indent=1).encode("utf-8"),
                     durable=durable)

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


def is_complete(path: Path) -> bool:
    """Cheap test that a checkpoint was written completely (files exist; no hashing)."""
    meta = path / META_FILE
    if not meta.is_file():
        return False
    try:
        files = json.loads(meta.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return False
    return all((path / f).is_file() for f in files)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder after checking its seal and every file's size and
    sha256; DamagedFileError names the first damaged file."""
    return Checkpoint(path).verify().meta


class Checkpoint:
    """A checkpoint folder whose files are each read once, when first needed, and verified
    on the bytes read (sizes and sha256 of the manifest in its sealed meta.json): the
    weights and state come from the bytes that were checked, never from a second read.
    `verify()` reads them all; `release()` drops the bytes held."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            raise DamagedFileError(self.path / META_FILE, "missing: the checkpoint is incomplete")
        self.meta = check_sealed_json(self.path / META_FILE)
        files = self.meta.get("files")
        if isinstance(files, list):  # written before manifests: existence only
            files = dict.fromkeys(files)
        if not isinstance(files, dict):
            raise DamagedFileError(self.path / META_FILE, "has no list of files")
        self.records = {k: v for k, v in files.items() if k != META_FILE}
        self._data: dict[str, bytes] = {}

    def verify(self) -> Checkpoint:
        """Read and check every file (DamagedFileError names the first damaged one)."""
        for name in sorted(self.records):
            self._bytes(name)
        return self

    def release(self) -> None:
        self._data.clear()

    def _bytes(self, name: str) -> bytes:
        if name not in self._data:
            path, record = self.path / name, self.records.get(name)
            data = read_verified(path, record)
            if not isinstance(record, Mapping) and name.endswith(".safetensors"):
                verify_safetensors(path, data)  # older than manifests: the digest only
            self._data[name] = data
        return self._data[name]

    def weights(self, which: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
        """(state dict, 'model'|'ema'); `which` = model, ema or auto (the weights that
        scored better on validation, else EMA if present)."""
        if which == "auto":
            which = self.meta.get("preferred_weights") or (
                "ema" if EMA_FILE in self.records or (self.path / EMA_FILE).is_file() else "model")
        if which not in ("model", "ema"):
            raise InvalidInputError(f"weights must be model, ema or auto, got {which!r}")
        file = EMA_FILE if which == "ema" else MODEL_FILE
        if file not in self.records and not (self.path / file).is_file():
            raise FileNotFoundError(f"{self.path} has no {which} weights ({file})")
        return load_safetensors(self.path / file, self._bytes(file)), which

    def state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The optimiser/RNG state: its tensors from state.safetensors, the rest from state.pt
        loaded with weights_only=True (no arbitrary code); a checkpoint written before
        state.safetensors holds all of it in state.pt."""
        path, data = self.path / STATE_FILE, self._bytes(STATE_FILE)
        try:
            loaded = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except MemoryError:  # the machine, not the file's content
            raise
        except Exception as err:  # noqa: BLE001 - the unpickler raises many types, all "damaged"
            # not its own text: it suggests weights_only=False, never right for a damaged file
            raise DamagedFileError(path, f"cannot be read as training state "
                                   f"({type(err).__name__})") from None
        if STATE_TENSORS_FILE not in self.records:
            return loaded
        if not isinstance(loaded, dict) or set(loaded) != {"state", "tensors"}:
            raise DamagedFileError(path, "is not the state of a checkpoint with "
                                   f"{STATE_TENSORS_FILE}")
        tensors = load_safetensors(self.path / STATE_TENSORS_FILE,
                                   self._bytes(STATE_TENSORS_FILE))
        at = {tuple(where): tensors[name].to(map_location) for name, where
              in loaded["tensors"].items() if name in tensors}
        if len(at) != len(loaded["tensors"]):
            raise DamagedFileError(self.path / STATE_TENSORS_FILE, "lacks tensors state.pt "
                                   "refers to")
        return join_tensors(loaded["state"], at)


def split_tensors(state: Any) -> tuple[Any, dict[str, torch.Tensor], dict[str, tuple]]:
    """(`state` with each tensor replaced by None, {name: tensor}, {name: where it was: the
    keys and indices from the top}): the tensors go to a safetensors file (written without
    a copy, hashed in threads), the small rest to state.pt."""
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[str, tuple] = {}

    def walk(value: Any, where: tuple) -> Any:
        if isinstance(value, torch.Tensor) and can_save(value):
            name = "/".join(map(str, where))
            if name not in tensors:  # {0: t, "0": u}: the second stays in state.pt
                tensors[name], paths[name] = value, where
                return None
        elif isinstance(value, dict):
            return {k: walk(v, (*where, k)) for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            items = [walk(v, (*where, i)) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return value

    return walk(state, ()), tensors, paths


def join_tensors(skeleton: Any, at: Mapping[tuple, torch.Tensor], where: tuple = ()) -> Any:
    """The state `split_tensors` split: each tensor put back where it was."""
    if where in at:
        return at[where]
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, at, (*where, k)) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        items = [join_tensors(v, at, (*where, i)) for i, v in enumerate(skeleton)]
        return items if isinstance(skeleton, list) else tuple(items)
    return skeleton


# --- reading ------------------------------------------------------------------------------------

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


def read_meta(checkpoint: Path) -> dict[str, Any]:
    return check_sealed_json(checkpoint / META_FILE)


def read_state(checkpoint: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The optimiser/RNG state of a checkpoint folder (`Checkpoint.state`), its files read
    once and verified."""
    return Checkpoint(checkpoint).state(map_location)


def read_weights(path: Path, which: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, 'model'|'ema') from a checkpoint folder (`Checkpoint.weights`) or a
    weights file; the file is read once and verified on those bytes."""
    if path.is_file():
        return read_weights_file(path), "model"
    return Checkpoint(path).weights(which)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_state_dict(path)[0])


def file_metadata(path: Path) -> WeightsMetadata:
    return WeightsMetadata.read(path) if path.suffix == ".safetensors" else WeightsMetadata()
