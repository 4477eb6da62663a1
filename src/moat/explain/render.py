"""Pictures of an `Explanation`: heat-map overlays, tiles per attention head, masks, boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from moat.explain.explainer import Explanation


def heatmap(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """[H, W] -> uint8 RGB [H, W, 3], scaled to the map's own range (display only)."""
    from matplotlib import colormaps

    low, span = float(values.min()), float(values.max() - values.min())
    scaled = (values - low) / span if span > 0 else np.zeros_like(values)
    return (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heat map of `values` blended over `image` (uint8 RGB, same height and width)."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * heatmap(values)
    return blended.round().astype(np.uint8)


def labelled(image: np.ndarray, text: str) -> Image.Image:
    """`image` with `text` on a dark band above it."""
    tile = Image.fromarray(image)
    band = 14
    out = Image.new("RGB", (tile.width, tile.height + band), (20, 20, 20))
    out.paste(tile, (0, band))
    ImageDraw.Draw(out).text((2, 1), text, fill=(255, 255, 255))
    return out


def row(tiles: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Tiles side by side on a white background."""
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    out = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for tile in tiles:
        out.paste(tile, (x, 0))
        x += tile.width + gap
    return out


def cam_row(expl: Explanation) -> Image.Image:
    """The image, then one overlay per stage."""
    return row([labelled(expl.image, "input")] + [
        labelled(overlay(expl.image, m), name) for name, m in expl.cams.items()])


def attention_row(expl: Explanation, block: str) -> Image.Image:
    """Mean over heads, then each head, of one block's received attention (the block is
    in the file name)."""
    maps = expl.attention[block]
    return row([labelled(overlay(expl.image, maps.mean(0)), "mean")] + [
        labelled(overlay(expl.image, m), f"head {i}") for i, m in enumerate(maps)])


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Segmentation classes in distinct colours blended over the image."""
    from matplotlib import colormaps

    colours = (colormaps["tab20"](np.arange(20))[:, :3] * 255).astype(np.float32)
    painted = colours[mask % 20]
    return ((1 - alpha) * image + alpha * painted).round().astype(np.uint8)


def boxes_image(image: np.ndarray, detections: Sequence[dict], threshold: float = 0.5,
                highlight: int | None = None) -> np.ndarray:
    """Detections scoring >= threshold drawn as labelled boxes; `highlight` in red."""
    out = Image.fromarray(image)
    draw = ImageDraw.Draw(out)
    for i, det in enumerate(detections):
        if det["score"] < threshold and i != highlight:
            continue
        colour = (255, 40, 40) if i == highlight else (40, 200, 255)
        draw.rectangle(det["box"], outline=colour, width=2)
        draw.text((det["box"][0] + 2, det["box"][1] + 1), f"{det['label']} {det['score']:.2f}",
                  fill=colour)
    return np.asarray(out)
