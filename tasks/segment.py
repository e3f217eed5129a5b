"""Segment stage: find each white cell in a smear field and cut a square crop around it.

Method (OpenCV + scipy, no learning, so it needs no labelled boxes):
1. Convert to optical density against a fitted lamp (background) surface, so stain
   strength, not brightness, drives every threshold whatever the illumination.
2. Nucleus = pixels absorbing red far more than blue (the purple/blue nuclear stain);
   red cells and eosin granules absorb blue and green, not red.
3. Foreground = anything stained (cells of every kind); its distance transform has one
   peak per round cell. A peak whose inscribed disc reaches a nucleus belongs to that white
   cell; this also gathers the separate lobes of a neutrophil nucleus into one cell.
4. Every foreground pixel of a white cell's blob goes to the disc whose edge is nearest
   (additively weighted Voronoi), which splits touching red cells and touching white cells
   along their neck without needing colour edges (eosinophil granules look like red cells).
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from hemaflow.config import SegmentParams
from hemaflow.errors import StageInputError, require_columns, require_file
from hemaflow.progress import Progress, track
from hemaflow.review import ReviewItem, write_review
from hemaflow.schema import CLEAN_COLUMNS, CROP_COLUMNS

STAGE = "segment"
REASONS = ("no_cell_found", "cell_cut_by_border", "implausible_area", "unreadable_image")

# Optical-density thresholds (unitless, -ln(I / lamp)), chosen on synthetic fields and
# checked on the BCCD fields; tests/code/test_segment.py holds the synthetic accuracy floor.
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
    touches_border: bool
    mask: np.ndarray = field(repr=False)  # bool, (ymax - ymin) x (xmax - xmin)


@dataclass
class SegmentResult:
    images: int = 0
    crops: int = 0
    flagged: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    crops_path: Path | None = None
    review_path: Path | None = None

    def summary(self) -> dict:
        return {"images": self.images, "crops": self.crops, "flagged": dict(self.flagged),
                "flagged_total": sum(self.flagged.values())}


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


def _cell_masks(od: np.ndarray, min_nucleus_px: int) -> list[np.ndarray]:
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


def find_white_cells(image_bgr: np.ndarray, cfg: SegmentParams) -> list[Detection]:
    """Every white cell at least cfg.min_area_frac of the field, ordered top-to-bottom, left-to-right.

    Too-large cells are returned too (the caller flags them); touches_border marks cells
    the field edge cuts, whose crop would show only part of the cell.
    """
    if image_bgr is None or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError("expected a BGR image of shape (height, width, 3)")
    h, w = image_bgr.shape[:2]
    field_px = h * w
    od = optical_density(image_bgr)
    dets = []
    for m in _cell_masks(od, min_nucleus_px=max(int(cfg.min_area_frac * field_px / 4), 10)):
        area = int(m.sum())
        if area < cfg.min_area_frac * field_px:
            continue
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        border = x0 <= 1 or y0 <= 1 or x1 >= w - 1 or y1 >= h - 1
        dets.append(Detection((x0, y0, x1, y1), area, bool(border), m[y0:y1, x0:x1].copy()))
    return sorted(dets, key=lambda d: (d.box[1], d.box[0]))


def crop_cell(image: np.ndarray, det: Detection, cfg: SegmentParams) -> np.ndarray:
    """Square crop centred on the cell, cfg.margin of its size added on each side, resized to cfg.crop_size.

    Parts of the square beyond the field are white; with cfg.mask_background everything
    outside the (2 px grown) cell mask is white too, so neighbours do not leak into the class.
    """
    x0, y0, x1, y1 = det.box
    side = int(round(max(x1 - x0, y1 - y0) * (1 + 2 * cfg.margin)))
    sx, sy = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    canvas = np.full((side, side, 3), 255, np.uint8)
    h, w = image.shape[:2]
    ax0, ay0, ax1, ay1 = max(sx, 0), max(sy, 0), min(sx + side, w), min(sy + side, h)
    canvas[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx] = image[ay0:ay1, ax0:ax1]
    if cfg.mask_background:
        mask = np.zeros((side, side), np.uint8)
        mask[y0 - sy:y1 - sy, x0 - sx:x1 - sx] = det.mask
        mask = cv2.dilate(mask, _disk(2))
        canvas[mask == 0] = 255
    interp = cv2.INTER_AREA if side > cfg.crop_size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (cfg.crop_size, cfg.crop_size), interpolation=interp)


def _review(item: str, path: str, reason: str, detail: str) -> ReviewItem:
    return ReviewItem(stage=STAGE, item=item, path=path, reason=reason, detail=detail)


def segment_rows(rows: pd.DataFrame, raw_dir: Path, crops_dir: Path, cfg: SegmentParams,
                 progress: Progress | None = None) -> tuple[list[dict], list[ReviewItem]]:
    """Segment a batch of clean rows: write crop PNGs under crops_dir/images, return crop rows and review items.

    Pure per row (no shared state), so batches can run in parallel workers.
    """
    raw_dir, images_dir = Path(raw_dir), Path(crops_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    crop_rows: list[dict] = []
    review: list[ReviewItem] = []
    for row in track(rows.itertuples(index=False), len(rows), progress, every=10):
        image_id, rel = str(row.image_id), row.path
        if not isinstance(rel, str) or not rel:
            review.append(_review(image_id, "", "unreadable_image", "row has no image path"))
            continue
        image = cv2.imread(str(raw_dir / rel), cv2.IMREAD_COLOR)
        if image is None:
            review.append(_review(image_id, rel, "unreadable_image", f"OpenCV cannot decode {raw_dir / rel}"))
            continue
        dets = find_white_cells(image, cfg)
        if not dets:
            review.append(_review(image_id, rel, "no_cell_found", "no stained nucleus of white-cell size in the field"))
            continue
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
            out_rel = f"images/{crop_id}.png"
            if not cv2.imwrite(str(Path(crops_dir) / out_rel), crop_cell(image, det, cfg)):
                raise OSError(f"{Path(crops_dir) / out_rel}: could not write crop")
            x0, y0, x1, y1 = det.box
            crop_rows.append({"crop_id": crop_id, "path": out_rel, "source_id": image_id,
                              "source_sha256": row.sha256, "source_path": rel, "label": row.label,
                              "x0": x0, "y0": y0, "x1": x1, "y1": y1, "mask_area": det.mask_area})
    return crop_rows, review


def _read_clean(clean_path: Path) -> pd.DataFrame:
    require_file(clean_path, "clean labels table")
    try:
        df = pd.read_parquet(clean_path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise StageInputError(clean_path, f"cannot read as parquet: {exc}") from exc
    require_columns(df, CLEAN_COLUMNS, clean_path)
    return df


def segment_images(clean_path: Path, raw_dir: Path, crops_dir: Path, cfg: SegmentParams,
                   progress: Progress | None = None) -> SegmentResult:
    """Stage driver: clean.parquet -> crops_dir/{images/*.png, crops.parquet, review.csv}."""
    clean_path, crops_dir = Path(clean_path), Path(crops_dir)
    df = _read_clean(clean_path)
    shutil.rmtree(crops_dir / "images", ignore_errors=True)  # no stale crops from earlier runs
    crop_rows, review = segment_rows(df, raw_dir, crops_dir, cfg, progress)
    crops = pd.DataFrame(crop_rows, columns=list(CROP_COLUMNS))
    crops = crops.sort_values("crop_id", kind="stable").reset_index(drop=True)
    for col in ("x0", "y0", "x1", "y1", "mask_area"):
        crops[col] = crops[col].astype("int64")
    crops_path, review_path = crops_dir / "crops.parquet", crops_dir / "review.csv"
    crops.to_parquet(crops_path, index=False)
    write_review(review, review_path)
    counts = Counter(item.reason for item in review)
    return SegmentResult(images=len(df), crops=len(crops), flagged={r: counts.get(r, 0) for r in REASONS},
                         crops_path=crops_path, review_path=review_path)
