"""Segment stage: find each white cell in a smear field and cut a square crop around it.

Method (OpenCV colour thresholds, no learning, so it needs no labelled boxes), on a copy
reduced by cfg.detect_downscale (cells are >= 60 px across in BCCD and PBC, so 1/4 keeps
every decision and makes detection a few ms per field):
1. Nucleus = strongly saturated blue/purple pixels (hue, saturation); red cells are red/pink
   and pale, platelets are purple but small, so nucleus groups below cfg.min_nucleus_frac
   of the field are dropped. A closing joins the lobes of a neutrophil nucleus.
2. Cell = pixels bluer than the background (CIELAB b* below the brightest pixels' b*),
   which takes the pale lilac cytoplasm and leaves red cells (yellower) out; each nucleus
   keeps the connected cell region around it, split between nuclei by nearest nucleus
   when two white cells touch.
3. Box = the cell mask's box grown by cfg.box_pad_x / box_pad_y (fitted on the BCCD train
   list: hand-drawn boxes are looser than the stained cell), clipped to the field.
Measured on BCCD (benchmarks/segment.py): recall 0.99, precision 0.98, mean IoU 0.86.

cfg.method "optical_density" selects the first detector instead (optical density against a
fitted lamp, distance-transform discs, see _od_cell_masks): it was tuned on the embedded
synthetic fields, whose cells are smaller and paler than real ones and whose eosinophil
cytoplasm is orange, where the colour method misses cells.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from hemaflow.batches import BatchRunner, run_serial, split_batches, work_batches
from hemaflow.config import SegmentParams
from hemaflow.errors import read_table, write_image
from hemaflow.imageio import read_image, safe_relpath
from hemaflow.progress import Progress, track
from hemaflow.review import ReviewItem, write_review
from hemaflow.schema import CLEAN_COLUMNS, CROP_COLUMNS

STAGE = "segment"
REASONS = ("no_cell_found", "cell_cut_by_border", "implausible_area", "unreadable_image", "secondary_cell",
           "centre_crop_fallback")
# measured (benchmarks/segment.py): PBC 663 images/s of 0.13 MP, BCCD 405 fields/s of 0.31 MP, one core
SECONDS_PER_MEGAPIXEL = 0.012
# readers whose images are smear fields with many cells; every other reader gives one centred cell per image
FIELD_SOURCES = frozenset({"voc_fields"})


# method "optical_density" (the first detector, kept for the embedded synthetic fields it was tuned on:
# there it scores recall 1.00, mean IoU 0.92; on BCCD only recall 0.96, precision 0.80, mean IoU 0.78).
# Thresholds are unitless, -ln(I / lamp).
NUCLEUS_MIN_RED_OD = 0.20      # nuclear stain absorbs red light ...
NUCLEUS_MIN_RED_MINUS_BLUE = 0.18  # ... much more than blue light
FOREGROUND_MIN_OD = 0.20       # summed over channels: anything stained at all
CYTOPLASM_MIN_OD = 0.07        # green absorbance (and its excess over blue) of pale lilac cytoplasm
CYTOPLASM_REACH_PX = 25        # ... counted only this close to a nucleus
PEAK_HEIGHT = 2.0              # px; distance-map bumps lower than this are not separate cells
MIN_NUCLEUS_VS_RBC = 0.15      # smallest white-cell nucleus, as a fraction of a red cell's area
LOBE_JOIN_VS_RBC = 0.12        # nucleus pieces closer than 2x this x red-cell radius are one nucleus
ROUND_SLACK = 1.2              # cell pixels farther than this x equivalent radius from its centre are trimmed
OWN_DISC_REACH = 0.35          # a disc is a white cell's own if a nucleus lies within this fraction of its radius


@dataclass(frozen=True, eq=False)
class Detection:
    """One white cell: box (xmin, ymin, xmax, ymax; max exclusive) and its mask inside the box."""

    box: tuple[int, int, int, int]
    mask_area: int
    touches_border: bool  # cut by the field edge (see find_white_cells), not merely touching it
    mask: np.ndarray = field(repr=False)  # bool, (ymax - ymin) x (xmax - xmin)


@dataclass
class SegmentResult:
    images: int = 0
    crops: int = 0
    flagged: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    crops_path: Path | None = None
    review_path: Path | None = None
    box_eval: dict | None = None  # crops vs annotated boxes, when the source has boxes
    yield_per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> images, crops

    def summary(self) -> dict:
        out = {"images": self.images, "crops": self.crops, "flagged": dict(self.flagged),
               "flagged_total": sum(self.flagged.values())}
        if self.yield_per_class:
            out["crop yield"] = ", ".join(f"{k} {v['crops']}/{v['images']}" for k, v in self.yield_per_class.items())
        if self.box_eval and self.box_eval.get("truth_boxes"):
            out.update({f"boxes {k}": round(self.box_eval[k], 4) for k in ("recall", "precision", "mean_iou")})
        return out


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def estimate_lamp(image: np.ndarray) -> np.ndarray:
    """Per-channel background brightness: a quadratic surface fitted to the bright pixels.

    Handles gradients and vignetting; iteratively drops pixels darker than the fit (cells).
    """
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(w // 8, 8), max(h // 8, 8)), interpolation=cv2.INTER_AREA).astype(np.float64)
    sh, sw = small.shape[:2]
    yy, xx = np.mgrid[0:sh, 0:sw] / max(sh, sw)
    design = np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], -1).reshape(-1, 6)
    gray = small.mean(-1).reshape(-1)
    keep0 = gray >= np.percentile(gray, 70)
    lamp = np.empty_like(small)
    for c in range(3):
        v = small[..., c].reshape(-1)
        keep = keep0
        for _ in range(3):
            coef, *_ = np.linalg.lstsq(design[keep], v[keep], rcond=None)
            fit = design @ coef
            res = v - fit
            keep = res > -2 * (res[keep].std() + 1e-6)
        lamp[..., c] = fit.reshape(sh, sw)
    return cv2.resize(lamp.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def optical_density(image_bgr: np.ndarray) -> np.ndarray:
    """-ln(I / lamp) per BGR channel after a light blur; 0 on background, grows with stain."""
    f = cv2.GaussianBlur(image_bgr.astype(np.float32) + 1.0, (0, 0), 1.5)
    lamp = np.maximum(estimate_lamp(f), 1.0)
    return -np.log(np.clip(f / lamp, 1e-3, 1.0))


def _regional_maxima(dist: np.ndarray, height: float) -> np.ndarray:
    """Peaks of the distance map standing at least `height` above their surroundings (h-maxima)."""
    kernel = np.ones((3, 3), np.uint8)
    rec = dist - height
    for _ in range(2 * int(dist.max()) + 10):  # morphological reconstruction by dilation
        nxt = np.minimum(cv2.dilate(rec, kernel), dist)
        if np.array_equal(nxt, rec):
            break
        rec = nxt
    return ((dist - rec) > height - 0.05) & (dist > 3)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _od_cell_masks(od: np.ndarray, min_nucleus_px: int) -> list[np.ndarray]:
    """Full-size boolean mask of every white cell (nucleus + cytoplasm)."""
    od_b, od_r = od[..., 0], od[..., 2]
    nucleus = ((od_r > NUCLEUS_MIN_RED_OD) & (od_r - od_b > NUCLEUS_MIN_RED_MINUS_BLUE)).astype(np.uint8)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disk(1))
    if nucleus.sum() < min_nucleus_px:
        return []
    fg = cv2.GaussianBlur(od.sum(-1), (0, 0), 2.0) > FOREGROUND_MIN_OD
    # pale lilac cytoplasm (absorbs green, not blue) next to a nucleus is cell, however faint
    od_g = cv2.GaussianBlur(od[..., 1], (0, 0), 2.0)
    lilac = (od_g > CYTOPLASM_MIN_OD) & (od_g - cv2.GaussianBlur(od_b, (0, 0), 2.0) > CYTOPLASM_MIN_OD)
    near = cv2.dilate(nucleus, _disk(CYTOPLASM_REACH_PX)) > 0
    fg = ndi.binary_fill_holes(fg | (nucleus > 0) | (lilac & near)).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, _disk(2))
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    dist = cv2.GaussianBlur(dist, (0, 0), 1.0) * (fg > 0)

    # One disc per distance peak. A disc is a white cell's own when a nucleus lies well inside
    # it; a touching red cell's disc may graze a nucleus, hence OWN_DISC_REACH < 1.
    to_nucleus, (iy, ix) = ndi.distance_transform_edt(nucleus == 0, return_indices=True)
    n_peak, peak_lab = cv2.connectedComponents(_regional_maxima(dist, PEAK_HEIGHT).astype(np.uint8))
    peaks = []
    for j, sl in enumerate(ndi.find_objects(peak_lab), start=1):
        ys, xs = np.nonzero(peak_lab[sl] == j)
        k = int(np.argmax(dist[sl][ys, xs]))
        y, x = ys[k] + sl[0].start, xs[k] + sl[1].start
        peaks.append((y, x, float(dist[y, x]), bool(to_nucleus[y, x] < OWN_DISC_REACH * dist[y, x])))
    # Red-cell radius sets the scale: nucleus lobes closer than a quarter of it are one cell,
    # stained specks much smaller than a red cell (platelets, debris) are not white cells.
    rbc_r = [r for _, _, r, own in peaks if not own]
    scale = float(np.median(rbc_r)) if len(rbc_r) >= 3 else None
    if scale:
        min_nucleus_px = max(min_nucleus_px, int(MIN_NUCLEUS_VS_RBC * np.pi * scale * scale))
    join = max(2, int(round(LOBE_JOIN_VS_RBC * scale))) if scale else 2
    n_frag, frag = cv2.connectedComponents(cv2.dilate(nucleus, _disk(join)))
    frag = np.where(nucleus > 0, frag, 0)
    discs = [(float(y), float(x), r, int(frag[iy[y, x], ix[y, x]]) if own else 0) for y, x, r, own in peaks]
    uf = _UnionFind(n_frag)
    yy, xx = np.mgrid[0:od.shape[0], 0:od.shape[1]]
    for y, x, r, f in discs:
        if f:
            y0, y1, x0, x1 = int(max(y - r, 0)), int(y + r + 1), int(max(x - r, 0)), int(x + r + 1)
            inside = np.hypot(yy[y0:y1, x0:x1] - y, xx[y0:y1, x0:x1] - x) < r
            for g in np.unique(frag[y0:y1, x0:x1][inside]):
                if g:
                    uf.union(int(g), f)
    cell_of = np.array([uf.find(i) for i in range(n_frag)])
    cell_of[0] = 0
    cells = cell_of[frag]
    sizes = np.bincount(cells.ravel(), minlength=n_frag)
    keep_cells = [c for c in range(1, n_frag) if sizes[c] >= min_nucleus_px]
    if not keep_cells:
        return []

    n_blob, blob = cv2.connectedComponents(fg)
    owner = np.zeros(fg.shape, np.int32)
    disc_cell = [(y, x, r, int(cell_of[f]) if f else -1) for y, x, r, f in discs]
    for b in np.unique(blob[np.isin(cells, keep_cells)]):
        if b == 0:
            continue
        ys, xs = np.nonzero(blob == b)
        here = [d for d in disc_cell if blob[int(d[0]), int(d[1])] == b]
        for c in np.unique(cells[ys, xs]):
            if c and not any(d[3] == c for d in here):  # a white cell with no disc of its own
                cy, cx = np.nonzero(cells == c)
                here.append((cy.mean(), cx.mean(), 0.0, int(c)))
        gap = np.stack([np.hypot(ys - y, xs - x) - r for y, x, r, _ in here])
        owner[ys, xs] = np.array([d[3] for d in here])[np.argmin(gap, 0)]
    owner[cells > 0] = cells[cells > 0]

    masks = []
    for c in keep_cells:
        m = cv2.morphologyEx((owner == c).astype(np.uint8), cv2.MORPH_OPEN, _disk(2))
        n, lab = cv2.connectedComponents(m)
        touching = np.unique(lab[(cells == c) & (m > 0)])
        m = np.isin(lab, touching[touching > 0])
        m = ndi.binary_fill_holes(m | (cells == c))
        # white cells are round: trim protrusions (a leaked neighbour) beyond a circle of
        # ROUND_SLACK x the equivalent radius around the mask's centroid
        ys, xs = np.nonzero(m)
        r_eq = np.sqrt(len(ys) / np.pi)
        far = np.hypot(ys - ys.mean(), xs - xs.mean()) > ROUND_SLACK * r_eq
        m[ys[far], xs[far]] = False
        masks.append(m | (cells == c))
    return masks


def _colour_masks(small: np.ndarray, cfg: SegmentParams) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus, cell) uint8 masks of a reduced, blurred BGR field.

    The background reference is the median b* of the brightest 30% of pixels, so the cell
    threshold follows each field's illumination and stain tint.
    """
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hue, sat = hsv[..., 0], hsv[..., 1]
    lo, hi = cfg.nucleus_hue
    nucleus = ((hue >= lo) & (hue <= hi) & (sat > cfg.nucleus_min_saturation)).astype(np.uint8)
    lab = cv2.cvtColor(small, cv2.COLOR_BGR2LAB)
    light, blue_yellow = lab[..., 0].ravel(), lab[..., 2]
    k = int(0.7 * (light.size - 1))
    bright = blue_yellow.ravel()[light >= np.partition(light, k)[k]]
    background_b = float(np.partition(bright, bright.size // 2)[bright.size // 2])
    cell = (blue_yellow.astype(np.float32) < background_b - cfg.cell_min_blue_shift).astype(np.uint8)
    return nucleus, cell


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Mask with its holes filled (pale vacuoles are cell too), via its outer contours."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out > 0


def _cell_masks(small: np.ndarray, cfg: SegmentParams, scale: int) -> list[np.ndarray]:
    """Boolean mask (at the reduced size) of every white cell: its nucleus plus its cytoplasm."""
    nucleus, cell = _colour_masks(small, cfg)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disk(1))
    join = int(round(cfg.lobe_join_px / scale))
    if join:
        nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_CLOSE, _disk(join))
    n, groups, stats, _ = cv2.connectedComponentsWithStats(nucleus)
    min_px = cfg.min_nucleus_frac * small.shape[0] * small.shape[1]
    keep = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= max(min_px, 4)]
    if not keep:
        return []
    opening = int(round(cfg.cell_open_px / scale))
    if opening:
        cell = cv2.morphologyEx(cell, cv2.MORPH_OPEN, _disk(opening))
    cell |= nucleus
    n_regions, regions = cv2.connectedComponents(cell)
    kept = np.zeros(n, np.int32)
    kept[keep] = keep
    seeds = kept[groups]
    # distance to, and label of, the nearest nucleus: touching cells split along the middle,
    # and cytoplasm reaches at most cfg.cell_reach x sqrt(nucleus area) from its nucleus, so a
    # bluish neighbour (PBC red cells are lilac) cannot stretch the cell.
    background = (seeds == 0).astype(np.uint8)
    if len(keep) == 1:
        dist, nearest = cv2.distanceTransform(background, cv2.DIST_L2, 5), None
    else:
        dist, nearest = cv2.distanceTransformWithLabels(background, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
        owner = np.zeros(nearest.max() + 1, np.int32)
        owner[nearest[seeds > 0]] = seeds[seeds > 0]  # Voronoi label -> nucleus group
        nearest = owner[nearest]
    masks = []
    for k in keep:
        own = seeds == k
        touched = np.zeros(n_regions, bool)
        touched[regions[own]] = True
        m = touched[regions] & (dist <= cfg.cell_reach * np.sqrt(stats[k, cv2.CC_STAT_AREA]))
        if nearest is not None:
            m &= nearest == k
        masks.append(_fill_holes(m | own))
    return masks


def _full_size(mask: np.ndarray, scale: int, shape: tuple[int, int]) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A reduced-size mask brought back to the field: (its box, the smooth full-size mask inside it)."""
    h, w = shape
    ys, xs = np.nonzero(mask)
    if scale == 1:
        return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), \
            mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    y0, y1, x0, x1 = max(ys.min() - 1, 0), ys.max() + 2, max(xs.min() - 1, 0), xs.max() + 2
    roi = cv2.resize(mask[y0:y1, x0:x1].astype(np.uint8) * 255, ((x1 - x0) * scale, (y1 - y0) * scale),
                     interpolation=cv2.INTER_LINEAR)[: h - y0 * scale, : w - x0 * scale] > 127
    ry, rx = np.nonzero(roi)
    if len(ry) == 0:  # a one-pixel mask vanishes when smoothed: keep its blocky form
        roi = np.kron(mask[y0:y1, x0:x1], np.ones((scale, scale), bool))[: h - y0 * scale, : w - x0 * scale]
        ry, rx = np.nonzero(roi)
    box = (int(x0 * scale + rx.min()), int(y0 * scale + ry.min()), int(x0 * scale + rx.max() + 1),
           int(y0 * scale + ry.max() + 1))
    return box, roi[ry.min():ry.max() + 1, rx.min():rx.max() + 1]


def find_white_cells(image_bgr: np.ndarray, cfg: SegmentParams) -> list[Detection]:
    """Every white cell at least cfg.min_area_frac of the field, ordered top-to-bottom, left-to-right.

    Too-large cells are returned too (the caller flags them); touches_border marks cells the
    field edge cuts so that less than cfg.border_min_visible of their (round) area shows --
    a crop would show only part of the cell. A cell merely grazing the edge is kept: BCCD
    annotates such cells, and their crops are whole enough to classify.
    """
    if image_bgr is None or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError("expected a BGR image of shape (height, width, 3)")
    h, w = image_bgr.shape[:2]
    if cfg.method == "optical_density":
        scale = 1
        masks = _od_cell_masks(optical_density(image_bgr), min_nucleus_px=max(int(cfg.min_area_frac * h * w / 4), 10))
    else:
        scale = max(1, min(cfg.detect_downscale, h // 16, w // 16))
        # a whole number of scale x scale blocks: INTER_AREA then takes its fast integer path (4x faster)
        small = image_bgr[: h // scale * scale, : w // scale * scale]
        if scale > 1:
            small = cv2.resize(small, (w // scale, h // scale), interpolation=cv2.INTER_AREA)
        masks = _cell_masks(cv2.GaussianBlur(small, (5, 5), 1.0), cfg, scale)
    dets = []
    for low in masks:
        (x0, y0, x1, y1), m = _full_size(low, scale, (h, w))
        area = int(m.sum())
        if area < cfg.min_area_frac * h * w:
            continue
        diameter = max(x1 - x0, y1 - y0)
        at_edge = x0 <= 1 or y0 <= 1 or x1 >= w - 1 or y1 >= h - 1
        cut = at_edge and area < cfg.border_min_visible * np.pi / 4 * diameter * diameter
        px, py = int(round(cfg.box_pad_x * (x1 - x0))), int(round(cfg.box_pad_y * (y1 - y0)))
        bx0, by0, bx1, by1 = max(x0 - px, 0), max(y0 - py, 0), min(x1 + px, w), min(y1 + py, h)
        full = np.zeros((by1 - by0, bx1 - bx0), bool)
        full[max(y0 - by0, 0):y1 - by0, max(x0 - bx0, 0):x1 - bx0] = m[max(by0 - y0, 0):by1 - y0, max(bx0 - x0, 0):bx1 - x0]
        dets.append(Detection((bx0, by0, bx1, by1), int(full.sum()), bool(cut), full))
    return sorted(dets, key=lambda d: (d.box[1], d.box[0]))


def _shrink(square: np.ndarray, size: int) -> np.ndarray:
    """Resize a square image to size x size, anti-aliased but cheap.

    INTER_AREA at a non-integer ratio costs ~10x INTER_LINEAR; an integer-ratio INTER_AREA
    step (OpenCV's fast path, trimming at most k-1 edge pixels) then INTER_LINEAR for the
    rest keeps the averaging where it matters for a fraction of the time.
    """
    k = square.shape[0] // size
    if k >= 2:
        n = square.shape[0] // k
        square = cv2.resize(square[: n * k, : n * k], (n, n), interpolation=cv2.INTER_AREA)
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)


def crop_cell(image: np.ndarray, det: Detection, cfg: SegmentParams) -> np.ndarray:
    """Square crop centred on the cell, cfg.margin of its size added on each side, resized to cfg.crop_size.

    Parts of the square beyond the field are white; with cfg.mask_background everything
    outside the (2 px grown) cell mask is white too, so neighbours do not leak into the class.
    Masking happens after resizing, on crop_size x crop_size pixels, which keeps it cheap.
    """
    x0, y0, x1, y1 = det.box
    side = int(round(max(x1 - x0, y1 - y0) * (1 + 2 * cfg.margin)))
    sx, sy = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    h, w = image.shape[:2]
    ax0, ay0, ax1, ay1 = max(sx, 0), max(sy, 0), min(sx + side, w), min(sy + side, h)
    pads = (ay0 - sy, sy + side - ay1, ax0 - sx, sx + side - ax1)  # top, bottom, left, right
    canvas = cv2.copyMakeBorder(image[ay0:ay1, ax0:ax1], *pads, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    crop = _shrink(canvas, cfg.crop_size)
    if cfg.mask_background:
        mask = cv2.copyMakeBorder(det.mask.astype(np.uint8) * 255, y0 - sy, sy + side - y1, x0 - sx, sx + side - x1,
                                  cv2.BORDER_CONSTANT, value=0)
        # nearest is enough: the mask is grown by `grow` px below, and 20x cheaper than INTER_AREA
        mask = cv2.resize(mask, (cfg.crop_size, cfg.crop_size), interpolation=cv2.INTER_NEAREST)
        grow = max(1, int(round(2 * cfg.crop_size / side)))
        crop[cv2.dilate(mask, _disk(grow)) == 0] = 255
    return crop


def _review(item: str, path: str, reason: str, detail: str) -> ReviewItem:
    return ReviewItem(stage=STAGE, item=item, path=path, reason=reason, detail=detail)


def crop_file(crop_id: str) -> str:
    """Crop path relative to crops_dir. Ids may hold sub-folders (class_folders: 'basophil/BA_1',
    medmnist: 'bloodmnist/train/00012'): kept as folders, unsafe characters replaced."""
    return f"images/{safe_relpath(crop_id)}.png"


def single_cell_source(source: str, cfg: SegmentParams) -> bool:
    """Does an image of this reader show one labelled cell (vs a smear field of many)?"""
    if cfg.mode == "auto":
        return source not in FIELD_SOURCES
    return cfg.mode == "single_cell"


def centre_detection(image: np.ndarray, cfg: SegmentParams) -> Detection:
    """A square of cfg.fallback_crop_px (capped at the image) in the image centre, no mask."""
    h, w = image.shape[:2]
    side = min(cfg.fallback_crop_px, h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return Detection((x0, y0, x0 + side, y0 + side), side * side, False, np.ones((side, side), bool))


def nearest_centre(dets: list[Detection], shape: tuple[int, int]) -> int:
    """Index of the detection whose box centre is nearest the image centre."""
    cy, cx = shape[0] / 2, shape[1] / 2
    return int(np.argmin([np.hypot((d.box[1] + d.box[3]) / 2 - cy, (d.box[0] + d.box[2]) / 2 - cx) for d in dets]))


def _crop_row(crop_id: str, row, rel: str, det: Detection) -> dict:
    x0, y0, x1, y1 = det.box
    return {"crop_id": crop_id, "path": crop_file(crop_id), "source_id": str(row.image_id),
            "source_sha256": row.sha256, "source_path": rel, "label": row.label,
            "x0": x0, "y0": y0, "x1": x1, "y1": y1, "mask_area": det.mask_area}


@dataclass
class SingleCellCrop:
    """The labelled cell of a single-cell image as training crops it (see single_cell_crop)."""

    det: Detection
    crop: np.ndarray
    secondary: dict[int, Detection]  # the other cells found, by detection index: never given its label
    fallback: str | None        # why the centred window stands in for a detection; None: it did not


def single_cell_crop(image: np.ndarray, cfg: SegmentParams) -> SingleCellCrop:
    """One labelled cell per image: the detection nearest the centre, or the centred
    fallback_crop_px window (always, with single_cell_crop: centre). The segment stage and
    `hemaflow classify` on single-cell images both cut through here, so a model sees at
    classify time exactly the crops it was trained on."""
    dets = [] if cfg.single_cell_crop == "centre" else find_white_cells(image, cfg)
    main = nearest_centre(dets, image.shape[:2]) if dets else None
    secondary = {k: d for k, d in enumerate(dets) if k != main}
    det, fallback = (dets[main] if main is not None else None), None
    field_px = image.shape[0] * image.shape[1]
    if det is not None and det.mask_area / field_px > cfg.max_area_frac:
        fallback = (f"centred cell covers {det.mask_area / field_px:.3f} of the image (max_area_frac "
                    f"{cfg.max_area_frac}): centred crop used instead")
        det = None
    elif det is None and cfg.single_cell_crop == "detection":
        fallback = (f"no stained nucleus found: centred {min(cfg.fallback_crop_px, *image.shape[:2])} px "
                    "crop used (kept, labelled)")
    if det is None:
        det = centre_detection(image, cfg)
        return SingleCellCrop(det, window_crop(image, det, cfg), secondary, fallback)
    return SingleCellCrop(det, crop_cell(image, det, cfg), secondary, fallback)


def window_crop(image: np.ndarray, det: Detection, cfg: SegmentParams) -> np.ndarray:
    """det's box as it is (no margin, no background masking), resized to cfg.crop_size."""
    return crop_cell(image, det, cfg.model_copy(update={"margin": 0.0, "mask_background": False}))


def cell_window(image: np.ndarray, det: Detection, cfg: SegmentParams) -> np.ndarray:
    """A cell found in a smear, cut the way a model trained on centred single-cell crops
    (single_cell_crop: centre, e.g. PBC) saw its cells: a fallback_crop_px square centred on
    the cell, neighbours and background kept, parts beyond the field white. The cell's own
    box with a margin and a masked background (crop_cell) would be another input than the
    one such a model learnt: at that scale and on white it called most PBC cells ig."""
    x0, y0, x1, y1 = det.box
    side = cfg.fallback_crop_px
    sx, sy = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    window = Detection((sx, sy, sx + side, sy + side), side * side, det.touches_border, np.ones((side, side), bool))
    return window_crop(image, window, cfg)


def _segment_single_cell(image: np.ndarray, row, rel: str, crops_dir: Path, cfg: SegmentParams,
                         crop_rows: list[dict], review: list[ReviewItem]) -> None:
    """One labelled cell per image (single_cell_crop); the other cells go to review."""
    image_id = str(row.image_id)
    crop_id = f"{image_id}_c0"
    cut = single_cell_crop(image, cfg)
    for k, det in cut.secondary.items():
        review.append(_review(f"{image_id}_s{k}", rel, "secondary_cell",
                              f"another cell at box {det.box}, not the image's centred cell: not labelled "
                              f"'{row.label}'"))
    if cut.fallback:
        review.append(_review(crop_id, rel, "centre_crop_fallback", cut.fallback))
    write_image(Path(crops_dir) / crop_file(crop_id), cut.crop, "crop")
    crop_rows.append(_crop_row(crop_id, row, rel, cut.det))


def _segment_field(image: np.ndarray, row, rel: str, crops_dir: Path, cfg: SegmentParams,
                   crop_rows: list[dict], review: list[ReviewItem]) -> None:
    """A smear field: every white cell that is whole and of plausible size is a crop."""
    image_id = str(row.image_id)
    dets = find_white_cells(image, cfg)
    if not dets:
        review.append(_review(image_id, rel, "no_cell_found", "no stained nucleus of white-cell size in the field"))
        return
    field_px = image.shape[0] * image.shape[1]
    for k, det in enumerate(dets):
        crop_id = f"{image_id}_c{k}"
        if det.touches_border:
            review.append(_review(crop_id, rel, "cell_cut_by_border", f"cell box {det.box} touches the field edge"))
            continue
        frac = det.mask_area / field_px
        if frac > cfg.max_area_frac:
            review.append(_review(crop_id, rel, "implausible_area",
                                  f"cell covers {frac:.3f} of the field (max_area_frac {cfg.max_area_frac})"))
            continue
        write_image(Path(crops_dir) / crop_file(crop_id), crop_cell(image, det, cfg), "crop")
        crop_rows.append(_crop_row(crop_id, row, rel, det))


def segment_rows(rows: pd.DataFrame, raw_dir: Path, crops_dir: Path, cfg: SegmentParams,
                 progress: Progress | None = None) -> tuple[list[dict], list[ReviewItem]]:
    """Segment a batch of clean rows: write crop PNGs under crops_dir/images, return crop rows and review items.

    Pure per row (no shared state), so batches can run in parallel workers. A file that
    cannot be read at all (SourceReadError) or a crop that cannot be written
    (OutputWriteError) stops the stage; only undecodable content goes to review.
    """
    raw_dir = Path(raw_dir)
    crop_rows: list[dict] = []
    review: list[ReviewItem] = []
    for row in track(rows.itertuples(index=False), len(rows), progress, every=10):
        image_id, rel = str(row.image_id), row.path
        if not isinstance(rel, str) or not rel:
            review.append(_review(image_id, "", "unreadable_image", "row has no image path"))
            continue
        image = read_image(raw_dir, rel, max_pixels=None, max_bytes=None)  # ingest already applied the guard
        if image is None:
            review.append(_review(image_id, rel, "unreadable_image", f"OpenCV cannot decode {raw_dir / rel}"))
            continue
        if single_cell_source(str(row.source), cfg):
            _segment_single_cell(image, row, rel, crops_dir, cfg, crop_rows, review)
        else:
            _segment_field(image, row, rel, crops_dir, cfg, crop_rows, review)
    return crop_rows, review


def _read_clean(clean_path: Path) -> pd.DataFrame:
    return read_table(clean_path, "clean labels table", CLEAN_COLUMNS)


def plan_segment(clean_path: Path, crops_dir: Path) -> pd.DataFrame:
    """Plan: the clean rows to segment (the batch items); clears crops left by earlier runs."""
    df = _read_clean(Path(clean_path))
    shutil.rmtree(Path(crops_dir) / "images", ignore_errors=True)
    (Path(crops_dir) / "images").mkdir(parents=True, exist_ok=True)
    return df.reset_index(drop=True)


def finish_segment(n_images: int, parts: list[tuple[list[dict], list[ReviewItem]]], crops_dir: Path,
                   labels: pd.Series | None = None) -> SegmentResult:
    """Finish: merge the batches' rows into crops.parquet (sorted, so batch order cannot matter) and review.csv."""
    crops_dir = Path(crops_dir)
    crop_rows = [row for rows, _ in parts for row in rows]
    review = [item for _, items in parts for item in items]
    crops = pd.DataFrame(crop_rows, columns=list(CROP_COLUMNS))
    crops = crops.sort_values("crop_id", kind="stable").reset_index(drop=True)
    for col in ("x0", "y0", "x1", "y1", "mask_area"):
        crops[col] = crops[col].astype("int64")
    crops_path, review_path = crops_dir / "crops.parquet", crops_dir / "review.csv"
    crops.to_parquet(crops_path, index=False)
    write_review(review, review_path)
    counts = Counter(item.reason for item in review)
    per_class = {}
    if labels is not None:
        made = crops["label"].value_counts()
        per_class = {str(k): {"images": int(v), "crops": int(made.get(k, 0))}
                     for k, v in labels.value_counts().sort_index().items()}
    (crops_dir / "yield.json").write_text(json.dumps({"per_class": per_class, "flagged": dict(counts)}, indent=2) + "\n")
    return SegmentResult(images=n_images, crops=len(crops), flagged={r: counts.get(r, 0) for r in REASONS},
                         crops_path=crops_path, review_path=review_path, yield_per_class=per_class)


def segment_images(clean_path: Path, raw_dir: Path, crops_dir: Path, cfg: SegmentParams,
                   progress: Progress | None = None, batch_size: int | None = None,
                   run_batches: BatchRunner | None = None, task_seconds: float = 4.0,
                   n_parallel: int = 1) -> SegmentResult:
    """Stage driver: clean.parquet -> crops_dir/{images/*.png, crops.parquet, review.csv}.

    Plan, then segment_rows on batches (about task_seconds of work each, or `batch_size` images) through `run_batches`
    (default: serially in-process; the Prefect flow passes a Dask runner), then finish.
    """
    df = plan_segment(clean_path, crops_dir)
    batch_fn = functools.partial(segment_rows, raw_dir=Path(raw_dir), crops_dir=Path(crops_dir), cfg=cfg)
    if batch_size:
        batches = split_batches(df, batch_size)
    else:  # by work: the pixels of each image (ingest recorded its size)
        pixels = (df["width"].astype("float64") * df["height"].astype("float64")).fillna(0).to_numpy()
        batches = work_batches(df, pixels / 1e6, SECONDS_PER_MEGAPIXEL, task_seconds, n_parallel)
    parts = (run_batches or run_serial)(batch_fn, batches, progress)
    result = finish_segment(len(df), parts, crops_dir, df["label"])
    if df["boxes"].map(lambda b: isinstance(b, str) and b not in ("", "[]")).any():
        from hemaflow.tasks.segment_eval import evaluate_segmentation  # box_eval.json + fields_contact_sheet.png
        result.box_eval = evaluate_segmentation(clean_path, result.crops_path, raw_dir, crops_dir)
    return result
