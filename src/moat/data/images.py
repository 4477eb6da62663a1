"""Loading real-world image files as RGB, with one clear error for every way a file can be bad.

Pillow reports broken files with many exception types (UnidentifiedImageError, OSError,
SyntaxError, EOFError, ValueError, DecompressionBombError, ...); callers should not have to know
them, so `load_rgb` turns them all into `BadImageError`, which names the file.

Truncated files are only detected while `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is False (Pillow's
default). This module does not touch that global; if some other library sets it to True, truncated
JPEGs load silently with a grey bottom instead of being reported.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from moat.errors import MoatError

# File suffixes taken for images where a folder is searched for them (prediction inputs,
# calibration images, segmentation images); torchvision's list for classification folders.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

# Modes whose alpha channel must be composited rather than dropped: dropping it exposes whatever
# colour the encoder left under transparent pixels (often black, sometimes garbage).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class BadImageError(MoatError, ValueError):
    """A file that cannot be used as an image: corrupt, truncated, empty, missing or not an image.

    The message always names the file. `path` is None only when the error was re-created from its
    message in another process (DataLoader workers do that).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


def load_rgb(
    path: str | os.PathLike,
    background: tuple[int, int, int] = WHITE,
    exif_transpose: bool = True,
) -> Image.Image:
    """Open an image file fully decoded as 8-bit RGB.

    Conversions: grey (1, L, I;16, I, F) is replicated to three channels, with high bit depths
    scaled to 0..255 (see `_to_8bit`); palette images are expanded (with their transparency);
    CMYK and YCbCr use Pillow's conversion; images with alpha (RGBA, LA, PA, or P/L/RGB
    with a transparent colour key) are composited on `background`, white by default, which is how
    viewers and web pages show transparent images (logos, product photos). Multi-frame files (GIF, TIFF) give
    their first frame. With `exif_transpose`, camera photos are rotated upright as viewers show
    them; pass False to match pipelines that ignore EXIF orientation.

    Raises BadImageError naming the file for anything that cannot be decoded completely.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        # a FIFO named x.png would block open() forever; a device or folder is no image
        raise BadImageError(f"cannot read image {path!r} (not a regular file); "
                            "replace or delete it", path)
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode now, inside the try: Image.open only reads the header
    except _DECODE_ERRORS as err:
        raise BadImageError(
            f"cannot read image {path!r} ({_reason(path, err)}); replace or delete this file", path
        ) from err
    return _finish(img, path, background, exif_transpose)


def decode_rgb(data: bytes, name: str, background: tuple[int, int, int] = WHITE,
               exif_transpose: bool = True) -> Image.Image:
    """`load_rgb` for an image held in memory (a sample of a shard or a dataset row); `name`
    (e.g. 'train-000003.tar:sample42.jpg') is what a BadImageError names."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except _DECODE_ERRORS as err:
        reason = "empty" if not data else ("not in an image format Pillow can read"
                                           if isinstance(err, UnidentifiedImageError)
                                           else f"{type(err).__name__}: {err}")
        raise BadImageError(f"cannot read image {name!r} ({reason})", name) from err
    return _finish(img, name, background, exif_transpose)


# OSError covers missing files, UnidentifiedImageError (empty or non-image content) and
# "image file is truncated"; SyntaxError/EOFError/ValueError are raised by broken headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _finish(img: Image.Image, path: str, background: tuple[int, int, int],
            exif_transpose: bool) -> Image.Image:
    if exif_transpose:
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not discard good pixels
            pass
    try:
        return _to_rgb(img, background)
    except (ValueError, OSError) as err:
        raise BadImageError(
            f"cannot convert image {path!r} in mode {img.mode} to RGB ({err}); "
            "convert it to an 8-bit RGB PNG or JPEG", path,
        ) from err


def _reason(path: str, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, UnidentifiedImageError):
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        return "file is empty" if empty else "not in an image format Pillow can read"
    return f"{type(err).__name__}: {err}"


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    elif "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        # A transparent palette index or colour key must become alpha, or those pixels keep
        # their arbitrary underlying colour.
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a high-bit-depth grey image to mode L.

    Pillow's own convert("L") clips these modes to 255 rather than scaling, which turns most
    16-bit images white. Integer images (I;16*, and I, which Pillow uses for 16-bit PNG/TIFF)
    are taken as 16-bit: divided by 257 so 65535 maps to 255. Float images (F) are taken as 0..1
    when their values fit in that range, else stretched from their min to their max.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        else:
            arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))



def median_short_side(paths, limit: int = 64) -> int | None:
    """The median shorter side of the first `limit` readable images of `paths` (their
    headers only); None if none is readable."""
    sides = []
    for path in list(paths)[:limit]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, UnidentifiedImageError):
            continue
    return int(np.median(sides)) if sides else None
