"""Segmentation mask files: their pixels, the colour -> class table, and the conventions
that turn pixels into class ids.

Masks are read with Pillow as integer arrays: the pixel values of a grey (L, I) PNG or the
palette *indices* of a palette (P) PNG, never its colours. Colour-coded (RGB) masks need a
colour -> class table (`classes.json` in the dataset root, or the `class_colors` task
option; see `read_class_table`): each colour becomes its class id, colours the table lacks
become `ignore_index` (the pre-flight check, `moat.data.preflight`, refuses them first).
Binary masks (`binary=True`): 0 is class 0, anything else class 1 (0/255 masks: values
above 127 are class 1). Value `ignore_index` (default 255) marks pixels that count for
neither the loss nor the metrics. Order: colours -> binary -> `reduce_zero_label`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from moat.data.images import BadImageError
from moat.errors import InvalidInputError

IGNORE_INDEX = 255
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm")

INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L", "1")
COLOUR_MODES = ("RGB", "RGBA")
Colour = tuple[int, int, int]


def read_mask_pixels(path: str | os.PathLike) -> np.ndarray:
    """A mask file's pixels, unchanged: int64 [H, W] for index masks (grey values, or palette
    indices), uint8 [H, W, 3] for colour masks. Raises BadImageError naming the file."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in INDEX_MODES:
                return np.array(img).astype(np.int64)
            if mode in ("LA", "PA"):  # alpha is no class information: drop it
                return np.array(img)[..., 0].astype(np.int64)
            if mode in COLOUR_MODES:
                return np.array(img)[..., :3]
            raise BadImageError(f"mask {path!r} has the unsupported mode {mode}: save masks "
                                "as grey or palette PNGs of class ids", path)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read mask {path!r} ({type(err).__name__}: {err}); "
                            "replace or delete this file", path) from err


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 colours as int64 codes 0xRRGGBB."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colours_to_ids(rgb: np.ndarray, colours: Sequence[Colour], unknown: int) -> np.ndarray:
    """A colour mask as class ids: colour k of `colours` -> k, other colours -> `unknown`."""
    codes = colour_codes(rgb)
    table = colour_codes(np.asarray(colours, dtype=np.int64).reshape(-1, 3))
    found, inverse = np.unique(codes, return_inverse=True)
    lookup = np.full(len(found), unknown, dtype=np.int64)
    for class_id, code in enumerate(table.tolist()):
        lookup[found == code] = class_id
    return lookup[inverse].reshape(codes.shape)


def binarize(mask: np.ndarray) -> np.ndarray:
    """Binary masks as 0/1: 0/1 masks stay, 0/255 (or 0..255 antialiased) masks -> > 127."""
    return (mask > 127 if mask.max(initial=0) > 1 else mask > 0).astype(np.int64)


def read_mask(path: str | os.PathLike, colours: Sequence[Colour] | None = None,
              ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A class-id mask as an int64 [H, W] array (palette indices for palette PNGs; colour
    masks through `colours`, their unknown colours -> `ignore_index`).

    Raises BadImageError (naming the file) for unreadable files, and for colour masks
    without a colour table.
    """
    path = os.fspath(path)
    arr = read_mask_pixels(path)
    if arr.ndim == 3:
        if not colours:
            raise BadImageError(
                f"mask {path!r} is a colour (RGB) image: give the colour of each class in "
                "classes.json (see `moat data check`) or save the masks as grey or palette "
                "PNGs of class ids", path)
        return colours_to_ids(arr, colours, ignore_index)
    return arr


def reduce_zero_label(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """ADE20K convention: 0 ("other") -> ignore_index, k -> k - 1; ignore stays ignore."""
    out = mask - 1
    out[(mask == 0) | (mask == ignore_index)] = ignore_index
    return out


class ClassTable(NamedTuple):
    """Class names (id = position) and, for colour-coded masks, each class's colour."""

    names: list[str]
    colours: list[Colour] | None
    source: str  # the file they came from


def _colour(value: Any, where: str) -> Colour:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        return tuple(int(value[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    if isinstance(value, (list, tuple)) and len(value) == 3 \
            and all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        return tuple(value)  # type: ignore[return-value]
    raise InvalidInputError(f"{where}: a colour must be [R, G, B] (0..255) or '#rrggbb', got "
                            f"{value!r}")


def parse_class_table(data: Any, source: str) -> ClassTable:
    """`classes.json`'s content: {"classes": [...]} or the list itself, whose items are
    names or {"name": ..., "color": [R, G, B]}; or {name: [R, G, B], ...}."""
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, dict):
        data = [{"name": k, "color": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise InvalidInputError(f"{source}: expected a list of classes, e.g. "
                                '{"classes": [{"name": "background", "color": [0, 0, 0]}, ...]}')
    names, colours = [], []
    for i, item in enumerate(data):
        if isinstance(item, str):
            names.append(item)
            continue
        if not isinstance(item, dict) or "name" not in item:
            raise InvalidInputError(f"{source}: class {i} must be a name or "
                                    f'{{"name": ..., "color": [R, G, B]}}, got {item!r}')
        names.append(str(item["name"]))
        colour = item.get("color", item.get("colour"))
        if colour is not None:
            colours.append(_colour(colour, f"{source}: class {item['name']!r}"))
    if colours and len(colours) != len(names):
        raise InvalidInputError(f"{source}: give a colour to every class or to none")
    if len(set(colours)) != len(colours):
        raise InvalidInputError(f"{source}: two classes have the same colour")
    return ClassTable(names, colours or None, source)


def read_class_table(root: str | os.PathLike) -> ClassTable | None:
    """The class table stored with a dataset: `classes.json` (names and colours, see
    `parse_class_table`), `classes.txt` (one name per line) or the "classes" of
    `segmentation.json` (the synthetic dataset's); None when there is none."""
    root = Path(root)
    if (root / "classes.json").is_file():
        path = root / "classes.json"
        try:
            return parse_class_table(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"{str(path)!r} is not valid JSON: {err}") from err
    if (root / "classes.txt").is_file():
        names = [line.strip() for line in (root / "classes.txt").read_text().splitlines()]
        return ClassTable([n for n in names if n], None, str(root / "classes.txt"))
    if (root / "segmentation.json").is_file():
        names = json.loads((root / "segmentation.json").read_text()).get("classes")
        return ClassTable(list(names), None, str(root / "segmentation.json")) if names else None
    return None
