"""One checkpoint folder: the files it holds, written once and read back verified.

    step-000001234/
        model.safetensors   model weights (+ metadata: task, variant, classes, ...)
        ema.safetensors     EMA weights (when EMA is on)
        state.safetensors   the tensors of the training state (the optimiser's moments, ...)
        state.pt            the rest of it: optimiser settings, schedule, grad scaler, RNG
                            states of every process (python, numpy, torch, cuda), and where
                            each tensor of state.safetensors goes; plain containers only,
                            loaded with torch.load(weights_only=True), never arbitrary pickle
        meta.json           epoch, step, position in the epoch, metrics, config, versions,
                            task metadata; written last

meta.json lists the size and digest of every other file (a safetensors file: the sha256 of
its header, which holds its tensors' digest; state.pt: its sha256), all computed while the
files are written (the tensors hashed and written in threads, `moat.integrity`), and is
sealed with the sha256 of its own content. A `Checkpoint` reads each file once and verifies
those bytes, which its weights and state then come from; a damaged file raises
DamagedFileError naming it. Checkpoints written before state.safetensors (all the state in
state.pt) or before manifests still load. Where a folder goes and when it counts as saved
is `moat.train.checkpoint`'s (`CheckpointManager`).
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moat.atomic import write_synced
from moat.errors import InvalidInputError
from moat.integrity import DamagedFileError, can_save, check_sealed_json, load_safetensors, \
    read_verified, seal_json, verify_safetensors, write_safetensors
from moat.weights.files import load_state_dict
from moat.weights.metadata import WeightsMetadata

MODEL_FILE, EMA_FILE, STATE_FILE, STATE_TENSORS_FILE, META_FILE = (
    "model.safetensors", "ema.safetensors", "state.pt", "state.safetensors", "meta.json")


def versions() -> dict[str, str]:
    import moat

    return {"moat": moat.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# --- writing ---------------------------------------------------------------------------------

def write_checkpoint(tmp: Path, name: str, step: int, model: Mapping[str, torch.Tensor],
                     ema: Mapping[str, torch.Tensor] | None, state: Mapping[str, Any],
                     meta: Mapping[str, Any], weights_metadata: Mapping[str, str],
                     durable: bool) -> None:
    """Write the files of checkpoint `step` (folder `name`) into `tmp`, meta.json last; synced
    as written unless `durable` is False (then `moat.atomic.sync_files` later)."""
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


# --- reading ---------------------------------------------------------------------------------

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
