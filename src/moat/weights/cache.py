"""Released weights on first use: download, verify, convert once, load from a cache after.

``pretrained_file(tag)`` returns the cached ``.safetensors`` file of a release, making it
first if needed:

1. download ``<base URL>/<official file name>`` (``MOAT_WEIGHTS_URL`` replaces the official
   base: a mirror, ``http(s)://`` or ``file://``), checking the byte count against the
   server's Content-Length and the catalogue's size, and the sha256 where the catalogue
   knows it;
2. convert it (``convert.convert_checkpoint``: every tensor's crc32c is checked, every name
   and shape matched against the variant), written under a temporary name and renamed, so
   the cache only ever holds complete, verified files;
3. delete the archive.

Several processes at once (torchrun ranks, jobs on one node) take a file lock per release:
one downloads and converts, the others wait and then read the cache. An interrupted,
truncated or corrupt download raises ``DownloadError`` and leaves nothing behind.

Environment: ``MOAT_HOME`` (cache root, default ``<torch.hub.get_dir()>/moat``),
``MOAT_WEIGHTS_URL``, ``MOAT_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` (no network: only the
cache and ``file://`` mirrors are used). Cache layout: ``$MOAT_HOME/weights/<tag>.safetensors``
(+ ``.lock``), and ``$MOAT_HOME/downloads/`` for archives being fetched.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError
from tqdm.auto import tqdm

from moat.errors import InvalidInputError, MoatError
from moat.weights.catalogue import BASE_URL, PretrainedWeights, release
from moat.weights.convert import convert_checkpoint
from moat.weights.files import verify_sha256
from moat.weights.metadata import WeightsMetadata
from moat.weights.tf_checkpoint import CheckpointError

log = logging.getLogger("moat")

HOME_ENV, URL_ENV, OFFLINE_ENVS = "MOAT_HOME", "MOAT_WEIGHTS_URL", ("MOAT_OFFLINE", "HF_HUB_OFFLINE")
_CHUNK = 1 << 20

__all__ = ["DownloadError", "cached_file", "moat_home", "offline", "pretrained_file",
           "weights_url"]


class DownloadError(MoatError, RuntimeError):
    """Released weights could not be fetched or verified; nothing was cached."""


def moat_home() -> Path:
    """The cache root: $MOAT_HOME, else a `moat` folder in PyTorch's hub directory. A path
    that exists as something else than a folder (or under a file) is refused, naming it."""
    default = Path(torch.hub.get_dir()) / "moat"
    home = Path(os.environ.get(HOME_ENV) or default).expanduser()
    for path in (home, *home.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == home else f"lies under {str(path)!r}, which is"
                named = f"${HOME_ENV}" if os.environ.get(HOME_ENV) else "the default"
                raise InvalidInputError(
                    f"the weights cache {str(home)!r} ({named}) {where} a file, not a folder: set {HOME_ENV} to a folder (created if "
                    f"missing), e.g. export {HOME_ENV}=~/.cache/moat, or move that file away")
            break
    return home


def offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in OFFLINE_ENVS)


def weights_url(entry: PretrainedWeights) -> str:
    """Where a release is fetched from: $MOAT_WEIGHTS_URL (a base) or the official URL."""
    base = os.environ.get(URL_ENV) or BASE_URL
    return base.rstrip("/") + "/" + entry.file


def cached_file(entry: PretrainedWeights) -> Path:
    return moat_home() / "weights" / f"{entry.tag}.safetensors"


def _is_cached(path: Path, entry: PretrainedWeights) -> bool:
    """A complete cache file of this release (files are renamed into place when complete)."""
    if not path.is_file():
        return False
    try:
        meta = WeightsMetadata.read(path)
    except (SafetensorError, OSError, ValueError) as err:
        log.warning("%s is damaged (%s); fetching it again", path, err)
        return False
    return meta.pretrained_tag == entry.tag


def pretrained_file(name: str, *, progress: bool | None = None) -> Path:
    """The cached, converted weights of a release (tag or variant name), made on first use.

    ``progress``: a progress bar on stderr; None shows one only on a terminal.
    """
    entry = release(name)
    target = cached_file(entry)
    if _is_cached(target, entry):
        return target
    url = weights_url(entry)
    if offline() and not url.startswith("file:"):
        raise FileNotFoundError(
            f"{entry.tag} is not in the cache ({target}) and MOAT_OFFLINE/HF_HUB_OFFLINE forbid "
            f"downloading it. Put the official archive {entry.file} in a folder DIR and set "
            f"MOAT_WEIGHTS_URL=file:///DIR, or convert it yourself: moat convert {entry.file} "
            f"{target} --model {entry.tag}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not _is_cached(target, entry):  # another process may have made it meanwhile
            _fetch_and_convert(entry, url, target, progress)
    return target


def _fetch_and_convert(entry: PretrainedWeights, url: str, target: Path,
                       progress: bool | None) -> None:
    work = moat_home() / "downloads" / f"{entry.tag}-{os.getpid()}"
    archive = work / entry.file  # the official name: it is recorded as the source
    work.mkdir(parents=True, exist_ok=True)
    try:
        _download(url, archive, entry.size, progress)
        if entry.sha256:
            try:
                verify_sha256(archive, entry.sha256)
            except ValueError as err:
                raise DownloadError(f"{url}: {err}") from err
        try:
            convert_checkpoint(archive, target, model=entry.tag)
        except (CheckpointError, FileNotFoundError, ValueError) as err:  # not the release
            raise DownloadError(
                f"{url} is not a readable {entry.tag} checkpoint ({err}). Nothing was cached; "
                f"run again to download it anew, or check the mirror ({URL_ENV}) if it "
                "happens again") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("cached %s at %s", entry.tag, target)


def _download(url: str, dest: Path, expected: int | None, progress: bool | None) -> None:
    """Fetch `url` to `dest`, refusing a short or over-long download."""
    retry = (f"Nothing was cached; run again, set {URL_ENV} to a mirror (http(s):// or "
             f"file:// of a folder holding {dest.name}), or {OFFLINE_ENVS[0]}=1 with the "
             "weights already cached")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced else expected
            bar = _progress_bar(total, dest.name, progress)
            received = 0
            while block := response.read(_CHUNK):
                f.write(block)
                received += len(block)
                bar.update(len(block))
            bar.close()
    except (urllib.error.URLError, OSError) as err:  # HTTPError and timeouts included
        raise DownloadError(f"cannot download {url} ({err}). {retry}") from err
    for what, size in (("the server announced", announced), ("the release has", expected)):
        if size is not None and int(size) != received:
            raise DownloadError(f"{url}: received {received} bytes but {what} {size} "
                                f"(interrupted or truncated). {retry}")


def _progress_bar(total: int | None, name: str, progress: bool | None) -> tqdm:
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not show, leave=False)
