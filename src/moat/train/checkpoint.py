"""Checkpoints: complete, atomic, safe to load.

Layout of a run directory:

    RUN_DIR/checkpoints/step-000001234/
        model.safetensors   model weights (+ metadata: task, variant, classes, ...)
        ema.safetensors     EMA weights (when EMA is on)
        state.pt            optimiser, schedule, grad scaler, RNG states of every process
                            (python, numpy, torch, cuda); tensors and plain containers only,
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

meta.json lists the size and digest of every other file (a weights file: the sha256 of its
header, which holds its tensors' digest; state.pt: its sha256), all computed while the files
are written, and is sealed with the sha256 of its own content (moat.integrity). Loading
reads each file once and verifies those bytes: `CheckpointManager.latest_intact` skips a
damaged newest checkpoint with a warning and falls back to the previous intact one, and a
checkpoint folder named explicitly that is damaged raises DamagedFileError naming the file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import random
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moat.errors import InvalidInputError
from moat.integrity import DamagedFileError, HashingWriter, atomic_write_text, \
    check_sealed_json, fsync_dir, load_safetensors, read_verified, seal_json, \
    verify_manifest, verify_safetensors, write_safetensors, write_synced
from moat.paths import regular_file
from moat.weights.files import TORCH_SUFFIXES, load_state_dict
from moat.weights.loader import load_file
from moat.weights.metadata import WeightsMetadata

log = logging.getLogger("moat")

STEP_PREFIX = "step-"
DAMAGED_DIR = "damaged"  # checkpoints/damaged/: damaged checkpoints set aside by a resume
MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE = ("model.safetensors", "ema.safetensors",
                                               "state.pt", "meta.json")


def versions() -> dict[str, str]:
    import moat

    return {"moat": moat.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# --- RNG state -----------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (torch.load weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ------------------------------------------------------------------------------------

class CheckpointManager:
    """Writes, finds and prunes the checkpoints of one run directory (call on rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    # .. writing ..
    def save(self, step: int, *, model: Mapping[str, torch.Tensor],
             ema: Mapping[str, torch.Tensor] | None, state: Mapping[str, Any],
             meta: Mapping[str, Any], weights_metadata: Mapping[str, str]) -> Path:
        """Write checkpoint `step` atomically, point `latest` at it, prune old ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        name = f"{STEP_PREFIX}{step:09d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            self._write_files(tmp, name, step, model, ema, state, meta, weights_metadata)
        except BaseException:  # a full disk, Ctrl-C: free the space, keep the previous state
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
        self.prune()
        return final

    @staticmethod
    def _write_files(tmp: Path, name: str, step: int, model: Mapping[str, torch.Tensor],
                     ema: Mapping[str, torch.Tensor] | None, state: Mapping[str, Any],
                     meta: Mapping[str, Any], weights_metadata: Mapping[str, str]) -> None:
        weights = {MODEL_FILE: (model, weights_metadata)}
        if ema is not None:  # weights files carry their tensors' digest (see read_weights)
            weights[EMA_FILE] = (ema, {**weights_metadata, "weights": "ema"})
        # Each file is hashed while it is written (no copy in memory, no second read), and
        # the files are written at the same time, each in a thread of its own: sha256 runs at
        # about 1 GB/s on one core, so hashing them one after the other would take longer
        # than writing them (hashlib, file writes and fsync release the GIL).
        def weights_file(file: str, tensors: Mapping[str, torch.Tensor],
                         header: Mapping[str, str]) -> dict[str, Any]:
            with open(tmp / file, "wb") as f:
                record = write_safetensors(f, tensors, header)
                _sync(f)
            return record

        def state_file() -> dict[str, Any]:
            with open(tmp / STATE_FILE, "wb") as f:
                writer = HashingWriter(f)
                torch.save(dict(state), writer)
                _sync(f)
            return writer.record()

        with ThreadPoolExecutor(len(weights) + 1, thread_name_prefix="moat-save") as pool:
            pending = {file: pool.submit(weights_file, file, *args)
                       for file, args in weights.items()}
            pending[STATE_FILE] = pool.submit(state_file)
            files = {file: job.result() for file, job in pending.items()}
        meta = seal_json({**meta, "step": step, "name": name, "saved_at": time.time(),
                          "versions": versions(), "files": dict(sorted(files.items()))})
        write_synced(tmp / META_FILE, json.dumps(meta, indent=1).encode("utf-8"))
        fsync_dir(tmp)

    def mark_best(self, checkpoint: Path, metric: str, value: float, weights: str) -> None:
        atomic_write_text(self.dir / "best.json", json.dumps(
            {"name": checkpoint.name, "metric": metric, "value": value, "weights": weights},
            indent=1) + "\n")

    def best(self) -> dict[str, Any] | None:
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
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.name.startswith(STEP_PREFIX) and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (`latest` if it is complete), not verified."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            candidate = self.dir / pointer.read_text(errors="replace").strip()
            if candidate.name.startswith(STEP_PREFIX) and is_complete(candidate):
                return candidate
        done = self.complete()
        return done[-1] if done else None

    def folders(self) -> list[Path]:
        """Every checkpoint folder, complete, damaged or not, newest first."""
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
        return intact

    def newest_intact(self, warn: bool = True) -> tuple[Path | None, dict[Path, str]]:
        """(the newest checkpoint whose files verify, {newer damaged folder: what is wrong})."""
        damaged: dict[Path, str] = {}
        folders = self.folders()
        for i, path in enumerate(folders):
            try:
                verify_checkpoint(path)
                return path, damaged
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
        done = self.complete()
        best = self.best()
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


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


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
    if not (path / META_FILE).is_file():
        raise DamagedFileError(path / META_FILE, "missing: the checkpoint is incomplete")
    meta = check_sealed_json(path / META_FILE)
    files = meta.get("files")
    if isinstance(files, list):  # written before manifests: existence only
        files = dict.fromkeys(files)
    if not isinstance(files, dict):
        raise DamagedFileError(path / META_FILE, "has no list of files")
    verify_manifest(path, {k: v for k, v in files.items() if k != META_FILE})
    return meta


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
    """The optimiser/RNG state, loaded with weights_only=True (no arbitrary code), from the
    bytes its manifest record was checked on (one read)."""
    path = checkpoint / STATE_FILE
    data = read_verified(path, _record(checkpoint, STATE_FILE))
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except MemoryError:  # the machine, not the file's content
        raise
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types, all "damaged"
        # not its own text: it suggests weights_only=False, never right for a damaged file
        raise DamagedFileError(path, f"cannot be read as training state "
                               f"({type(err).__name__})") from None


def read_weights(path: Path, which: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, 'model'|'ema') from a checkpoint folder; `which` = model, ema or auto
    (the weights that scored better on validation, else EMA if present). The file is read
    once and verified on those bytes (its manifest record and the tensors' digest)."""
    if path.is_file():
        return _read_weights_file(path), "model"
    meta = read_meta(path)
    if which == "auto":
        which = meta.get("preferred_weights") or ("ema" if (path / EMA_FILE).is_file() else "model")
    if which not in ("model", "ema"):
        raise InvalidInputError(f"weights must be model, ema or auto, got {which!r}")
    file = path / (EMA_FILE if which == "ema" else MODEL_FILE)
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {which} weights ({file.name})")
    record = _record(path, file.name, meta)
    data = read_verified(file, record)
    if not isinstance(record, Mapping):  # a checkpoint older than manifests: the digest only
        verify_safetensors(file, data)
    return load_safetensors(file, data), which


def _record(checkpoint: Path, name: str, meta: Mapping[str, Any] | None = None) -> Any:
    """The manifest record of file `name` in a checkpoint (None: not listed or no record)."""
    files = (meta if meta is not None else read_meta(checkpoint)).get("files")
    return files.get(name) if isinstance(files, dict) else None


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_state_dict(path)[0])


def file_metadata(path: Path) -> WeightsMetadata:
    return WeightsMetadata.read(path) if path.suffix == ".safetensors" else WeightsMetadata()


# --- fine-tuning: weights from anywhere into a model whose head may differ --------------------------

_PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, a dense task's model


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        out[name] = value
    return out


def load_pretrained(model: nn.Module, path: str | os.PathLike,
                    backbone: nn.Module | None = None) -> str:
    """Load weights for fine-tuning into `backbone` (a MoatNet inside `model`; `model` if None).

    Sources: a run directory or checkpoint folder (its preferred weights), a .safetensors or
    PyTorch state dict (ours, loaded safely), or official weights (TensorFlow checkpoint,
    .tar.gz, .npz). Through `moat.weights.adapt` with a new classifier allowed: one of
    another number of classes stays freshly initialised, tensors the model lacks (another
    task's decoder) are unused, and any other missing tensor is an error (wrong variant).
    Position tables need no resizing: they are resized to the input at forward time.
    """
    target = backbone if backbone is not None else model
    path = Path(path)
    if not path.exists() and not str(path).endswith((".tar.gz", ".index")):
        # a TensorFlow checkpoint prefix (model-ckpt-0) has no file of its own
        if not Path(str(path) + ".index").exists():
            raise FileNotFoundError(f"--init-from {str(path)!r} does not exist")
    ours = path.is_dir() and (is_complete(path) or (path / "checkpoints").is_dir()
                              or path.name == "checkpoints")
    source: Any = path
    if ours:
        state, which = read_weights(resolve_checkpoint(path))
        source, name = _strip_prefixes(state), f"{path} ({which} weights)"
    elif path.suffix in (".safetensors", *TORCH_SUFFIXES):
        source, name = _strip_prefixes(_read_weights_file(path)), str(path)
    else:
        name = f"official weights {path}"
    try:
        adapted = load_file(target, source, classifier="new", extra="ignore")
    except ValueError as err:
        raise InvalidInputError(f"--init-from {name}: {err}\nCheck --model (the variant must "
                                "match the weights).") from None
    head = f", classifier re-initialised ({adapted.replaced[0]})" if adapted.replaced else ""
    unused = len(adapted.unused)
    return (f"initialised {len(adapted.state)} tensors from {name}{head}"
            + (f", {unused} tensors of the source unused" if unused else ""))
