"""How a message names many things: the first few and how many more, so that a folder of a
million bad files still gives a line the user can read."""

from __future__ import annotations

import os
from collections.abc import Iterable


def shortlist(items: Iterable[str], n: int = 5, sep: str = ", ") -> str:
    """`a, b, c, d, e and 7 more`: the first `n` of `items` and the count of the rest. With
    another `sep` (e.g. "; " between items that hold commas) the count follows it too."""
    items = list(items)
    shown = sep.join(items[:n])
    if len(items) <= n:
        return shown
    return f"{shown}{' ' if sep == ', ' else sep}and {len(items) - n} more"


def shortlist_files(paths: Iterable[str], n: int = 5) -> str:
    """`shortlist` of the paths' file names, for a message that names their folder."""
    return shortlist((os.path.basename(p) for p in paths), n)
