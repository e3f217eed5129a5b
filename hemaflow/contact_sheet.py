"""Contact sheets: a grid of labelled image tiles saved as one PNG, for a person to look at.

Used for segmentation (fields with predicted and true boxes) and augmentation (augmented
crops next to their sources). Tiles are BGR uint8 arrays of any size; each is fitted into
a square cell with its caption underneath.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

BG = (255, 255, 255)
INK = (40, 40, 40)


def fit_tile(image: np.ndarray, size: int) -> np.ndarray:
    """Scale to fit a size x size square (aspect kept), centred on white."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.full((size, size, 3), BG, np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out


def _caption(text: str, width: int, height: int) -> np.ndarray:
    strip = np.full((height, width, 3), BG, np.uint8)
    scale = 0.4
    while scale > 0.25 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 4:
        scale -= 0.05
    cv2.putText(strip, text, (2, height - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, INK, 1, cv2.LINE_AA)
    return strip


def grid(tiles: Sequence[np.ndarray], captions: Sequence[str], cols: int, tile_size: int = 160,
         title: str = "") -> np.ndarray:
    """Tiles in rows of `cols`, each with its caption, an optional title line on top."""
    if len(tiles) != len(captions):
        raise ValueError("one caption per tile")
    cols = max(1, min(cols, len(tiles) or 1))
    cap_h, pad = 18, 4
    cell_h, cell_w = tile_size + cap_h, tile_size
    rows = max(1, -(-len(tiles) // cols))
    top = 26 if title else 0
    width = cols * (cell_w + pad) + pad
    if title:  # a sheet of one or two tiles is widened so that its title is not cut off
        width = max(width, cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1)[0][0] + 2 * pad)
    sheet = np.full((top + rows * (cell_h + pad) + pad, width, 3), BG, np.uint8)
    if title:
        cv2.putText(sheet, title, (pad, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, INK, 1, cv2.LINE_AA)
    for i, (tile, cap) in enumerate(zip(tiles, captions)):
        r, c = divmod(i, cols)
        y, x = top + pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        sheet[y:y + tile_size, x:x + tile_size] = fit_tile(tile, tile_size)
        sheet[y + tile_size:y + cell_h, x:x + cell_w] = _caption(cap, cell_w, cap_h)
    return sheet


def save_grid(path: str | Path, tiles: Sequence[np.ndarray], captions: Sequence[str], cols: int,
              tile_size: int = 160, title: str = "") -> Path:
    """Write grid(...) as a PNG; raises OutputWriteError if it cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from hemaflow.errors import write_image

    write_image(path, grid(tiles, captions, cols, tile_size, title), "contact sheet")
    return path


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]], colour: tuple[int, int, int],
               thickness: int = 2) -> np.ndarray:
    """Copy of image with (xmin, ymin, xmax, ymax) boxes outlined in a BGR colour."""
    out = image.copy()
    for b in boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in b[:4])
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, thickness)
    return out
