"""What kind of label image each mask file is, and the refusals for a dataset whose masks
mix kinds (part of the segmentation pre-flight, `moat.data.preflight`).

Tools export masks in one form per project, and a dataset that mixes forms is nearly always
a merge gone wrong; each mixture below would train without an error and silently wrong:

* colour (RGB) masks among index masks: one of the two is read with the wrong meaning;
* 0/255 binary masks among masks of class ids (0, 1, 2, ...): 255 is the ignore index, so
  their foreground would be lost (`binary=false`), or the class ids above 1 would be turned
  into background (`binary=true`);
* grey masks among palette PNGs holding values the palette masks do not: a palette image
  converted to grey holds its colours' luminance, not the class ids.
"""

from __future__ import annotations

from collections import defaultdict
import numpy as np

from moat.text import shortlist_files as files

COLOUR, BINARY, PALETTE, GREY = "colour (RGB)", "0/255 binary", "palette", "grey"
# a mask holding only 0 and 255 with at least this share of 255 is a binary mask, not an
# index mask with an ignored border (VOC's void outlines cover a few percent)
BINARY_SHARE = 0.1


def mask_kind(raw: np.ndarray, palette: bool, values: np.ndarray) -> str:
    """The kind of a mask from its pixels (`read_mask_pixels`), whether the file is a
    palette PNG, and its distinct values (index masks)."""
    if raw.ndim == 3:
        return COLOUR
    if len(values) == 2 and values[0] == 0 and values[1] == 255 \
            and (raw == 255).mean() >= BINARY_SHARE:
        return BINARY
    return PALETTE if palette else GREY


class MaskKinds:
    """The masks of a split by kind, with the values each kind holds."""

    def __init__(self) -> None:
        self.files: dict[str, list[str]] = defaultdict(list)
        self.values: dict[str, set[int]] = defaultdict(set)
        self.ids_over_one: list[str] = []  # index masks with values 2..127 (class ids)

    def add(self, path: str, kind: str, values: np.ndarray) -> None:
        self.files[kind].append(path)
        if kind != COLOUR:
            self.values[kind].update(values.tolist())
            if len(values) and 2 <= values[-1] <= 127:
                self.ids_over_one.append(path)

    def errors(self, binary: bool) -> list[str]:
        """Messages for the mixtures above."""
        out = []
        counts = {k: len(v) for k, v in self.files.items()}
        index = [k for k in (BINARY, PALETTE, GREY) if counts.get(k)]
        if counts.get(COLOUR) and index:
            others = [p for k in index for p in self.files[k]]
            out.append(f"the masks mix {counts[COLOUR]} colour (RGB) image(s) "
                       f"({files(self.files[COLOUR])}) with {len(others)} index mask(s) "
                       f"({files(others)}): one of the two would be read with the wrong "
                       "meaning. Save all masks one way: as colours with a classes.json colour "
                       "table, or as grey or palette PNGs of class ids")
        if binary and self.ids_over_one and not counts.get(BINARY):
            out.append(f"binary=true reads masks as 0/1 or 0/255, but {len(self.ids_over_one)} "
                       f"mask(s) hold class ids above 1 ({files(self.ids_over_one)}): they "
                       "would become background. Leave binary off for masks of class ids")
        elif counts.get(BINARY) and self.ids_over_one:
            what = ("binary=true would turn their classes above 1 into background" if binary
                    else "255 is the ignore index, so the foreground of the 0/255 masks would "
                    "be lost")
            out.append(f"{counts[BINARY]} mask(s) hold only 0 and 255 "
                       f"({files(self.files[BINARY])}) and {len(self.ids_over_one)} hold class "
                       f"ids above 1 ({files(self.ids_over_one)}): {what}. Re-save the 0/255 "
                       "masks with their class id instead of 255")
        elif counts.get(BINARY) and not binary and len(index) > 1:
            others = [p for k in index if k != BINARY for p in self.files[k]]
            out.append(f"{counts[BINARY]} mask(s) hold only 0 and 255 "
                       f"({files(self.files[BINARY])}) beside 0/1 masks ({files(others)}): "
                       "255 is the ignore index, so their foreground would be lost. If every "
                       "mask is binary, --set task_options.binary=true reads both forms")
        if counts.get(PALETTE) and counts.get(GREY):
            foreign = sorted(self.values[GREY] - self.values[PALETTE])
            if foreign:
                out.append(f"{counts[GREY]} grey mask(s) ({files(self.files[GREY])}) beside "
                           f"{counts[PALETTE]} palette PNG(s) hold values the palette masks do "
                           f"not ({', '.join(map(str, foreign[:8]))}): palette masks converted "
                           "to grey hold their colours' luminance, not class ids. Use the "
                           "original palette PNGs")
        return out
