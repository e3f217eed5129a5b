"""Deterministic synthetic blood-smear fields: the project's embedded default dataset.

Real smear images cannot be committed, so the pipeline ships with a generator that
draws look-alike fields (640x480, Wright-stained look) with known white-cell boxes.
Images are rendered in optical density (Beer-Lambert): stains add absorbance, so
overlapping red cells darken naturally and a per-field change of stain or lamp
changes every cell consistently, as on a real slide.

Realism that keeps the default classifier below perfect (without label noise):
- per-field stain batch (eosin / azure strength and hue), lamp brightness, white balance,
  gradient and off-centre vignetting; focus that differs per field and drifts across it;
- red cells pressed against or lying on the rim of white cells; a share of two-cell fields
  whose white cells touch; platelets (singles and clumps) and stain-precipitate specks;
- look-alikes: band (C/S nucleus) and 2-5-lobed neutrophils, some with coarse pinkish
  (toxic) granules; eosinophils whose granules range from orange to dull lilac; large
  lymphocytes (round, sometimes notched nucleus, greyer cytoplasm) as big as monocytes whose
  kidney bite can be shallow; basophils whose granules hide more or less of the nucleus,
  some hypogranular.

The written files mimic the BCCD dataset, faults of its hand-made labels file included,
so that ingest and label validation meet the problems they will meet on real data.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np

from hemaflow.progress import Progress, track

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
# Class shares of the single-label fields (BCCD-like imbalance: 40/34/28/26/20 of 148).
CLASS_WEIGHTS = (40, 34, 28, 26, 20)
FIELD_NAME = "SmearField_{:05d}"
JPEG_QUALITY = 90
TWIN_FRACTION = 0.10       # single-label fields holding two cells of the same class
MIN_FIELDS = 12            # below this the labels-file faults cannot all be planted

Box = tuple[int, int, int, int]


def _od(rgb: tuple[float, float, float]) -> np.ndarray:
    """Optical density (per unit thickness) of a stain that looks like `rgb` on white."""
    return -np.log(np.asarray(rgb, np.float32) / 255.0)


# Stain colours as they look at full thickness over a white lamp (RGB).
STAINS = {
    "rbc": _od((210, 146, 142)),
    "nucleus": _od((92, 66, 172)),
    "nucleus_light": _od((128, 102, 188)),
    "neutro_cyto": _od((232, 212, 234)),
    "neutro_gran": _od((196, 160, 196)),
    "lympho_cyto": _od((172, 198, 236)),
    "mono_cyto": _od((186, 186, 214)),
    "eos_cyto": _od((246, 222, 206)),
    "eos_gran": _od((232, 120, 84)),
    "baso_cyto": _od((214, 196, 228)),
    "baso_gran": _od((64, 30, 96)),
    "platelet": _od((150, 110, 190)),
    "debris": _od((120, 96, 150)),
}
# Dyes: eosin stains these (red/orange), the azure/methylene blue the rest; batches drift apart.
EOSIN_STAINS = {"rbc", "eos_gran", "eos_cyto", "neutro_cyto", "neutro_gran"}

# Cell radius ranges in pixels (red cells are 25-35 px). Ranges overlap where real cells do:
# a large lymphocyte is as big as a small monocyte, a neutrophil as big as an eosinophil.
WBC_RADIUS = {
    "neutrophil": (44, 56),
    "lymphocyte": (30, 37),    # small lymphocytes; large ones: LARGE_LYMPHO_RADIUS
    "monocyte": (50, 66),
    "eosinophil": (46, 58),
    "basophil": (40, 52),
}
LARGE_LYMPHO_RADIUS = (40, 52)
LARGE_LYMPHO_FRACTION = 0.35
BAND_FRACTION = 0.25         # neutrophils drawn as bands (C/S nucleus) instead of 2-5 lobes
TOUCHING_PAIR_FRACTION = 0.3  # of two-cell fields, the cells touch each other
RBC_ON_WBC_FRACTION = 0.6     # red cells placed next to a white cell may lie on its edge


@dataclass
class _Field:
    """One field being drawn: OD layers plus the truth kept for annotations."""

    height: int
    width: int
    stains: dict[str, np.ndarray]
    od: np.ndarray = field(init=False)
    wbc_boxes: list[Box] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.od = np.zeros((self.height, self.width, 3), np.float32)

    def add(self, y0: int, x0: int, density: np.ndarray, stain: str | np.ndarray) -> None:
        """Add density (h x w, clipped to the field) of one stain (name or OD vector) at (y0, x0)."""
        h, w = density.shape
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + h, self.height), min(x0 + w, self.width)
        if ya >= yb or xa >= xb:
            return
        d = density[ya - y0:yb - y0, xa - x0:xb - x0]
        vec = self.stains[stain] if isinstance(stain, str) else stain
        self.od[ya:yb, xa:xb] += d[..., None] * vec

    def mix(self, a: str, b: str, w: float) -> np.ndarray:
        """A stain between a (w = 0) and b (w = 1): look-alike granules and cytoplasm."""
        return (1.0 - w) * self.stains[a] + w * self.stains[b]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _polar(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Radius and angle of every pixel of a size x size patch around its centre."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.hypot(xx - c, yy - c), np.arctan2(yy - c, xx - c)


def _wobbly_disc(rng: np.random.Generator, size: int, radius: float, wobble: float) -> np.ndarray:
    """Soft-edged (1 px) mask of a slightly irregular disc centred in a size x size patch."""
    rho, theta = _polar(size)
    edge = np.full_like(theta, radius)
    for k in (2, 3, 4):
        edge += radius * wobble / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return _smoothstep((edge - rho) / 1.5 + 0.5)


def _ellipse(shape: tuple[int, int], cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    """Soft-edged filled ellipse in a patch of the given shape."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / a
    v = (-(xx - cx) * sa + (yy - cy) * ca) / b
    r = np.sqrt(u * u + v * v)
    return _smoothstep((1.0 - r) * min(a, b) / 1.2 + 0.5)


def _blobs(rng: np.random.Generator, shape: tuple[int, int], mask: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """Granules: n random points inside mask, blurred into soft dots with peak ~1."""
    pts = np.zeros(shape, np.float32)
    ys, xs = np.nonzero(mask > 0.5)
    if len(ys) == 0 or n <= 0:
        return pts
    idx = rng.integers(0, len(ys), n)
    np.add.at(pts, (ys[idx], xs[idx]), rng.uniform(0.6, 1.0, n).astype(np.float32))
    out = cv2.GaussianBlur(pts, (0, 0), sigma)
    return out * (2 * np.pi * sigma * sigma)


def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth zero-mean unit-ish noise for chromatin and stain unevenness."""
    t = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return t / (t.std() + 1e-6)


def _tube(size: int, pts: list[tuple[float, float]], radii: list[float]) -> np.ndarray:
    """Soft-edged tube through points (a curved nucleus): union of discs along the path."""
    out = np.zeros((size, size), np.float32)
    for (x, y), r in zip(pts, radii):
        out = np.maximum(out, _ellipse(out.shape, x, y, r, r, 0.0))
    return out


# --- nucleus shapes, drawn in a square patch whose centre is the cell centre ---

def _nucleus_segmented(rng, size, R, n):
    """n lobes along a curved chain, joined by thin strands."""
    lobe = R * rng.uniform(0.23, 0.28) * (1.12 if n == 2 else 1.0)
    c = (size - 1) / 2.0
    start = rng.uniform(0, 2 * np.pi)
    span = rng.uniform(0.28, 0.38) * max(n - 1, 1) * np.pi * (1 if rng.random() < 0.5 else -1)
    ring = R * rng.uniform(0.38, 0.5) * (0.8 if n == 2 else 1.0)
    out = np.zeros((size, size), np.float32)
    centres = []
    for i in range(n):
        ang = start + span * i / (n - 1) + rng.normal(0, 0.12)
        rr = ring * rng.uniform(0.8, 1.05)
        centres.append((c + rr * np.cos(ang), c + rr * np.sin(ang)))
    for (x, y) in centres:
        a = lobe * rng.uniform(0.9, 1.2)
        out = np.maximum(out, _ellipse(out.shape, x, y, a, a * rng.uniform(0.7, 0.95), rng.uniform(0, np.pi)))
    strands = np.zeros_like(out)
    for (xa, ya), (xb, yb) in zip(centres[:-1], centres[1:]):
        cv2.line(strands, (int(round(xa)), int(round(ya))), (int(round(xb)), int(round(yb))), 1.0, 2, cv2.LINE_AA)
    return np.maximum(out, strands * 0.9)


def _nucleus_band(rng, size, R):
    """Band neutrophil: one thick unsegmented nucleus bent into a C or an S."""
    c = (size - 1) / 2.0
    thick = R * rng.uniform(0.15, 0.21)
    ang = rng.uniform(0, 2 * np.pi)
    ca, sa = np.cos(ang), np.sin(ang)
    t = np.linspace(-1, 1, 15)
    if rng.random() < 0.65:       # C: an arc around the cell centre
        ring = R * rng.uniform(0.4, 0.52)
        half = rng.uniform(0.5, 0.8) * np.pi
        u, v = ring * np.cos(t * half), ring * np.sin(t * half)
        u -= u.mean()
    else:                         # S: a sine of one period
        length = R * rng.uniform(0.6, 0.8)
        amp = R * rng.uniform(0.2, 0.3)
        u, v = length * t, amp * np.sin(np.pi * t)
    pts = [(c + a * ca - b * sa, c + a * sa + b * ca) for a, b in zip(u, v)]
    radii = thick * (1.0 + 0.15 * np.sin(np.pi * (t + 1) / 2) + rng.normal(0, 0.05, len(t)))
    return _tube(size, pts, list(radii))


def _nucleus_neutrophil(rng, size, R):
    """Segmented (2-5 lobes, mostly 3-4) or, for BAND_FRACTION of them, a band."""
    if rng.random() < BAND_FRACTION:
        return _nucleus_band(rng, size, R)
    n = int(rng.choice([2, 3, 4, 5], p=[0.15, 0.4, 0.3, 0.15]))
    return _nucleus_segmented(rng, size, R, n)


def _nucleus_lymphocyte(rng, size, R, frac=(0.76, 0.84)):
    """Big round nucleus, slightly off-centre, leaving a rim; some slightly indented."""
    c = (size - 1) / 2.0
    rn = R * rng.uniform(*frac)
    off = (R - rn) * rng.uniform(0.2, 0.6)
    ang = rng.uniform(0, 2 * np.pi)
    cx, cy = c + off * np.cos(ang), c + off * np.sin(ang)
    nuc = _ellipse((size, size), cx, cy, rn, rn * rng.uniform(0.86, 1.0), ang)
    if rng.random() < (0.45 if frac[1] < 0.8 else 0.15):   # a shallow notch: a lymphocyte that looks a little like a monocyte
        br = rn * rng.uniform(0.3, 0.45)
        nuc = np.clip(nuc - _ellipse((size, size), cx + (rn + br * 0.4) * np.cos(ang), cy + (rn + br * 0.4) * np.sin(ang),
                                     br, br, 0.0), 0, 1)
    return nuc


def _nucleus_monocyte(rng, size, R):
    """Kidney / horseshoe: an ellipse with a disc bitten out of one side (shallow or deep)."""
    c = (size - 1) / 2.0
    ang = rng.uniform(0, 2 * np.pi)
    a, b = R * rng.uniform(0.54, 0.66), R * rng.uniform(0.42, 0.54)
    off = R * rng.uniform(0.05, 0.14)
    cx, cy = c - off * np.cos(ang + np.pi / 2), c - off * np.sin(ang + np.pi / 2)
    body = _ellipse((size, size), cx, cy, a, b, ang)
    bite_r = b * (rng.uniform(0.5, 0.9) if rng.random() < 0.8 else rng.uniform(0.25, 0.45))
    bite_d = b * rng.uniform(0.95, 1.3)
    bx, by = cx + bite_d * np.cos(ang + np.pi / 2), cy + bite_d * np.sin(ang + np.pi / 2)
    bite = _ellipse((size, size), bx, by, bite_r * 1.2, bite_r, ang)
    return np.clip(body - bite, 0, 1)


def _nucleus_eosinophil(rng, size, R):
    """Two lobes (spectacles) joined by a band; now and then three lobes like a neutrophil."""
    if rng.random() < 0.15:
        return _nucleus_segmented(rng, size, R, 3)
    c = (size - 1) / 2.0
    ang = rng.uniform(0, 2 * np.pi)
    d = R * rng.uniform(0.26, 0.34)
    lobe = R * rng.uniform(0.27, 0.34)
    out = np.zeros((size, size), np.float32)
    for s in (-1, 1):
        x, y = c + s * d * np.cos(ang), c + s * d * np.sin(ang)
        out = np.maximum(out, _ellipse(out.shape, x, y, lobe, lobe * rng.uniform(0.75, 0.95), ang + rng.normal(0, 0.3)))
    band = np.zeros_like(out)
    p = [(int(round(c + s * d * np.cos(ang))), int(round(c + s * d * np.sin(ang)))) for s in (-1, 1)]
    cv2.line(band, p[0], p[1], 1.0, max(3, int(lobe * 0.5)), cv2.LINE_AA)
    return np.maximum(out, band)


def _nucleus_basophil(rng, size, R):
    """Irregular, partly lobed nucleus (partly hidden under granules)."""
    c = (size - 1) / 2.0
    out = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(2, 4))):
        ang = rng.uniform(0, 2 * np.pi)
        off = R * rng.uniform(0.05, 0.25)
        a = R * rng.uniform(0.3, 0.42)
        out = np.maximum(out, _ellipse(out.shape, c + off * np.cos(ang), c + off * np.sin(ang), a, a * rng.uniform(0.7, 0.9), rng.uniform(0, np.pi)))
    return out


NUCLEUS = {
    "neutrophil": _nucleus_neutrophil,
    "lymphocyte": _nucleus_lymphocyte,
    "monocyte": _nucleus_monocyte,
    "eosinophil": _nucleus_eosinophil,
    "basophil": _nucleus_basophil,
}


def _wbc_radius(rng: np.random.Generator, cls: str) -> float:
    if cls == "lymphocyte" and rng.random() < LARGE_LYMPHO_FRACTION:
        return float(rng.uniform(*LARGE_LYMPHO_RADIUS))
    lo, hi = WBC_RADIUS[cls]
    return float(rng.uniform(lo, hi))


def _draw_wbc(rng: np.random.Generator, f: _Field, cls: str, cx: int, cy: int, R: float) -> Box:
    """Draw one white cell centred at (cx, cy); return its tight box (cytoplasm included)."""
    size = int(2 * R * 1.15) | 1
    y0, x0 = cy - size // 2, cx - size // 2
    cell = _wobbly_disc(rng, size, R, wobble=0.07)
    if cls == "lymphocyte" and R > WBC_RADIUS["lymphocyte"][1]:
        # large lymphocyte: more (and greyer) cytoplasm, a round nucleus -- the monocyte look-alike
        nuc = _nucleus_lymphocyte(rng, size, R, frac=(0.6, 0.74))
    else:
        nuc = NUCLEUS[cls](rng, size, R)
    nuc = nuc * (cell > 0.5)
    shape = cell.shape
    chrom = 1.0 + 0.18 * _texture(rng, shape, 1.6)
    cyto = cell * (1 - nuc)
    if cls == "neutrophil":
        # some neutrophils carry coarse, pinker (toxic) granules: toward the eosinophil look
        w = rng.uniform(0.1, 0.45) if rng.random() < 0.2 else rng.uniform(0.0, 0.08)
        f.add(y0, x0, cyto * rng.uniform(0.8, 1.2), f.mix("neutro_cyto", "eos_cyto", 0.3 * w))
        sigma = rng.uniform(0.8, 1.0 + w)
        gran = _blobs(rng, shape, cyto, int(R * R * rng.uniform(0.28, 0.42)), sigma)
        f.add(y0, x0, gran * rng.uniform(0.3, 0.4 + 0.5 * w) * cyto, f.mix("neutro_gran", "eos_gran", w))
        f.add(y0, x0, nuc * chrom * rng.uniform(0.8, 1.0), "nucleus")
    elif cls == "lymphocyte":
        large = R > WBC_RADIUS["lymphocyte"][1]
        w = rng.uniform(0.25, 0.7) if large else rng.uniform(0.0, 0.2)
        f.add(y0, x0, cyto * rng.uniform(0.75, 1.15), f.mix("lympho_cyto", "mono_cyto", w))
        f.add(y0, x0, nuc * chrom * rng.uniform(0.85, 1.1), f.mix("nucleus", "nucleus_light", w * 0.8))
    elif cls == "monocyte":
        w = rng.uniform(0.0, 0.35)
        f.add(y0, x0, cyto * (1 + 0.12 * _texture(rng, shape, 3.0)) * rng.uniform(0.8, 1.1),
              f.mix("mono_cyto", "lympho_cyto", w))
        vac = _blobs(rng, shape, cyto * (rng.random(shape) < 0.02), int(rng.integers(0, 6)), 2.0)
        f.add(y0, x0, -np.clip(vac, 0, 0.5) * cyto, "mono_cyto")
        lacy = 1.0 + 0.3 * _texture(rng, shape, 1.0) * (1 - w)
        f.add(y0, x0, nuc * lacy * rng.uniform(0.85, 1.05), f.mix("nucleus_light", "nucleus", w))
    elif cls == "eosinophil":
        # granules from bright orange to dull pink-lilac (overlapping a toxic neutrophil's)
        w = rng.uniform(0.0, 0.4)
        f.add(y0, x0, cyto * rng.uniform(0.8, 1.2), f.mix("eos_cyto", "neutro_cyto", w))
        f.add(y0, x0, nuc * chrom * rng.uniform(0.8, 1.0), "nucleus")
        gran = _blobs(rng, shape, cell, int(R * R * rng.uniform(0.28, 0.5)), rng.uniform(1.0, 1.4))
        f.add(y0, x0, np.clip(gran, 0, 1.2) * rng.uniform(0.4, 0.75) * (cell - 0.85 * nuc),
              f.mix("eos_gran", "neutro_gran", w))
    elif cls == "basophil":
        hypo = rng.random() < 0.3   # hypogranular: few granules, the lobed nucleus shows
        f.add(y0, x0, cyto * rng.uniform(0.8, 1.2), f.mix("baso_cyto", "neutro_cyto", 0.6 if hypo else 0.0))
        f.add(y0, x0, nuc * chrom * rng.uniform(0.6, 0.9) * (1.25 if hypo else 1.0), "nucleus")
        # granules cover the nucleus more or less: sometimes hiding it, sometimes leaving it clear
        over = rng.uniform(0.25, 1.0)
        where = cell * (1.0 - (1.0 - over) * (nuc > 0.5))
        n_gran = int(R * R * (rng.uniform(0.04, 0.1) if hypo else rng.uniform(0.12, 0.26)))
        gran = _blobs(rng, shape, where, n_gran, rng.uniform(1.3, 1.9))
        f.add(y0, x0, np.clip(gran, 0, 1.2) * rng.uniform(0.45, 0.7) * cell, "baso_gran")
    else:
        raise ValueError(f"unknown white-cell class {cls!r}; expected one of {', '.join(CLASSES)}")
    ys, xs = np.nonzero(cell > 0.5)
    return (int(x0 + xs.min()), int(y0 + ys.min()), int(x0 + xs.max() + 1), int(y0 + ys.max() + 1))


def _draw_rbc(rng: np.random.Generator, f: _Field, cx: float, cy: float, R: float) -> None:
    """A biconcave disc: thick rim, pale centre (central pallor)."""
    size = int(2 * R + 6) | 1
    x0, y0 = int(round(cx)) - size // 2, int(round(cy)) - size // 2
    a, b = R * rng.uniform(0.96, 1.04), R * rng.uniform(0.88, 0.98)
    ang = rng.uniform(0, np.pi)
    c = (size - 1) / 2.0 + (cx - round(cx)), (size - 1) / 2.0 + (cy - round(cy))
    disc = _ellipse((size, size), c[0], c[1], a, b, ang)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rho = np.hypot(xx - c[0], yy - c[1]) / R
    pr = rng.uniform(0.3, 0.45)
    pallor = rng.uniform(0.4, 0.6) * (1 - _smoothstep((rho - pr) / 0.3))
    rim = 0.15 * np.exp(-((rho - 0.88) / 0.1) ** 2)
    f.add(y0, x0, disc * (1.0 - pallor + rim) * rng.uniform(0.85, 1.1), "rbc")


def _draw_specks(rng: np.random.Generator, f: _Field) -> None:
    """Platelets (single and a clump or two), and stain precipitate: small purple specks, no cells."""
    h, w = f.height, f.width

    def platelet(cx: float, cy: float, pr: float, dens: float) -> None:
        ps = int(4 * pr + 3) | 1
        blob = _ellipse((ps, ps), ps / 2, ps / 2, pr, pr * rng.uniform(0.6, 1), rng.uniform(0, np.pi))
        gran = 1.0 + 0.3 * _texture(rng, (ps, ps), 0.8)
        f.add(int(cy) - ps // 2, int(cx) - ps // 2, blob * gran * dens, "platelet")

    for _ in range(int(rng.integers(2, 12))):
        platelet(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 3.5), rng.uniform(0.5, 0.9))
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):   # clumps: 3-6 platelets within ~10 px
        cx, cy = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
        for _ in range(int(rng.integers(3, 7))):
            platelet(cx + rng.normal(0, 4.5), cy + rng.normal(0, 4.5), rng.uniform(1.5, 3.0), rng.uniform(0.4, 0.8))
    # stain precipitate: tiny dark specks, and a faint smudge now and then
    for _ in range(int(rng.integers(0, 25))):
        platelet(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.2))
    if rng.random() < 0.3:
        sz = int(rng.uniform(20, 40)) | 1
        smudge = _wobbly_disc(rng, sz, sz * 0.35, 0.3) * (1 + 0.4 * _texture(rng, (sz, sz), 2.0))
        f.add(int(rng.uniform(0, h - sz)), int(rng.uniform(0, w - sz)), np.clip(smudge, 0, None) * 0.12, "debris")


def _place_wbcs(rng: np.random.Generator, classes: list[str], width: int, height: int) -> list[tuple[str, int, int, float]]:
    """Centres and radii of the white cells: inside the field; a pair touches now and then."""
    placed: list[tuple[str, int, int, float]] = []
    margin = 12
    radii = [_wbc_radius(rng, cls) for cls in classes]
    # basophils (rare: ~0.5% of white cells) never touch another white cell here: granules
    # cover them to the rim, so a detector could not tell where the neighbour begins
    touch = len(classes) == 2 and rng.random() < TOUCHING_PAIR_FRACTION and "basophil" not in classes
    for cls, R in zip(classes, radii):
        for _ in range(500):
            if touch and placed:
                _, px, py, pr = placed[0]
                ang = rng.uniform(0, 2 * np.pi)
                d = R + pr + rng.uniform(1.0, 6.0)   # cytoplasm to cytoplasm, blurred into one
                cx, cy = int(px + d * np.cos(ang)), int(py + d * np.sin(ang))
                if not (R * 1.1 + margin <= cx <= width - R * 1.1 - margin
                        and R * 1.1 + margin <= cy <= height - R * 1.1 - margin):
                    continue
                placed.append((cls, cx, cy, R))
                break
            if _try_apart(rng, cls, R, placed, width, height, margin):
                break
        else:
            if touch:   # no room for a touching pair here: fall back to apart
                return _place_apart(rng, classes, radii, width, height, margin)
            raise ValueError(f"cannot fit {len(classes)} white cells in a {width}x{height} field")
    return placed


def _try_apart(rng, cls, R, placed, width, height, margin) -> bool:
    """Draw one spot for a cell of radius R; keep it (append to placed) if it clears every placed cell."""
    cx = int(rng.uniform(R * 1.1 + margin, width - R * 1.1 - margin))
    cy = int(rng.uniform(R * 1.1 + margin, height - R * 1.1 - margin))
    if all(np.hypot(cx - x, cy - y) > (R + r) * 1.1 + 14 for _, x, y, r in placed):
        placed.append((cls, cx, cy, R))
        return True
    return False


def _place_apart(rng, classes, radii, width, height, margin):
    placed = []
    for cls, R in zip(classes, radii):
        for _ in range(500):
            if _try_apart(rng, cls, R, placed, width, height, margin):
                break
        else:
            raise ValueError(f"cannot fit {len(classes)} white cells in a {width}x{height} field")
    return placed


def _jitter_stains(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-field stain batch: each dye's strength and hue drift (staining time, pH, dye lot)."""
    red = np.exp(rng.normal(0, 0.09, 3)).astype(np.float32) * rng.uniform(0.8, 1.2)
    blue = np.exp(rng.normal(0, 0.09, 3)).astype(np.float32) * rng.uniform(0.8, 1.2)
    return {k: (v * (red if k in EOSIN_STAINS else blue)).astype(np.float32) for k, v in STAINS.items()}


def _focus(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Optics: blur whose strength drifts across the field (tilted slide, uneven smear)."""
    h, w = img.shape[:2]
    base = rng.uniform(1.0, 1.8) if rng.random() < 0.85 else rng.uniform(1.8, 3.0)
    far = base + rng.uniform(0.0, 1.2)
    sharp = cv2.GaussianBlur(img, (0, 0), base)
    soft = cv2.GaussianBlur(img, (0, 0), far)
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    k = float(0.5 / (0.5 * np.hypot(w, h)))
    ramp = (xx - w / 2) * float(np.cos(ang) * k) + (yy - h / 2) * float(np.sin(ang) * k) + 0.5
    ramp = ramp + 0.25 * cv2.resize(_texture(rng, (h // 8 + 1, w // 8 + 1), 3.0), (w, h), interpolation=cv2.INTER_LINEAR)
    wgt = np.clip(ramp, 0, 1)[..., None]
    soft -= sharp
    soft *= wgt
    soft += sharp
    return soft


def _render(rng: np.random.Generator, cell_classes: list[str], size: tuple[int, int]) -> tuple[np.ndarray, list[Box]]:
    width, height = size
    f = _Field(height, width, _jitter_stains(rng))
    wbcs = _place_wbcs(rng, list(cell_classes), width, height)
    # Red cells: random discs, some overlapping each other; next to a white cell some lie on its edge.
    target = rng.uniform(0.26, 0.48) * width * height
    on_edge = rng.uniform(0.3, 1.0) * RBC_ON_WBC_FRACTION
    covered, attempts, rbcs = 0.0, 0, []
    for _, x, y, r in wbcs:   # red cells pressed against (or lying on the rim of) the white cell
        for _ in range(int(rng.integers(0, 4)) if rng.random() < RBC_ON_WBC_FRACTION + 0.3 else 0):
            R = float(rng.uniform(25, 35))
            ang, d = rng.uniform(0, 2 * np.pi), r + R * rng.uniform(0.82, 1.0)
            cx, cy = x + d * np.cos(ang), y + d * np.sin(ang)
            if min((np.hypot(cx - a, cy - b) / (R + q) for a, b, q in rbcs), default=9.0) > 0.9:
                rbcs.append((cx, cy, R))
                covered += np.pi * R * R
    while covered < target and attempts < 4000:
        attempts += 1
        R = float(rng.uniform(25, 35))
        cx, cy = rng.uniform(-R * 0.6, width + R * 0.6), rng.uniform(-R * 0.6, height + R * 0.6)
        near = min((np.hypot(cx - x, cy - y) - r - R for _, x, y, r in wbcs), default=99.0)
        if near < -2 and not (near > -0.18 * R and rng.random() < on_edge):
            continue
        overlap = min((np.hypot(cx - x, cy - y) / (R + r) for x, y, r in rbcs), default=9.0)
        if overlap < (0.72 if rng.random() < 0.25 else 0.98):
            continue
        rbcs.append((cx, cy, R))
        covered += np.pi * R * R
    for cx, cy, R in rbcs:
        _draw_rbc(rng, f, cx, cy, R)
    _draw_specks(rng, f)
    for cls, cx, cy, R in wbcs:
        f.wbc_boxes.append(_draw_wbc(rng, f, cls, cx, cy, R))

    # Lamp: white balance and brightness drift per field, a linear gradient and vignetting.
    yy, xx = np.ogrid[0:height, 0:width]
    nx, ny = (xx.astype(np.float32) - width / 2) / (width / 2), (yy.astype(np.float32) - height / 2) / (height / 2)
    g = [float(v) for v in rng.normal(0, 0.05, 2)]
    vig = rng.uniform(0.04, 0.22)
    vcx, vcy = (float(v) for v in rng.normal(0, 0.15, 2))
    lamp = (1.0 + g[0] * nx + g[1] * ny) * (1.0 - vig * ((nx - vcx) ** 2 + (ny - vcy) ** 2) / 2)
    bright = rng.uniform(228, 250)
    balance = np.exp(rng.normal(0, 0.035, 3)) * np.array([1.0, 0.96, 0.98])
    tint = np.clip(bright * balance / balance.max(), 0, 252).astype(np.float32)
    stain_tex = 1.0 + 0.06 * cv2.resize(_texture(rng, (height // 4 + 1, width // 4 + 1), 3.0), (width, height),
                                        interpolation=cv2.INTER_LINEAR)
    img = f.od
    img *= -stain_tex[..., None]
    np.exp(img, out=img)
    img *= lamp.astype(np.float32)[..., None]
    img *= tint
    img = _focus(rng, img)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(1.0, 2.2))
    img += noise
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img += 0.5
    bgr = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(bgr), f.wbc_boxes


def render_field(rng: np.random.Generator, cell_classes: list[str], size: tuple[int, int] = (640, 480)) -> tuple[np.ndarray, list[Box]]:
    """Draw one field holding one white cell per entry of cell_classes (may be empty).

    Returns the BGR uint8 image (height x width x 3) and the white-cell boxes
    (xmin, ymin, xmax, ymax; xmax/ymax exclusive), tight around cytoplasm, in cell_classes order.
    """
    bad = [c for c in cell_classes if c not in WBC_RADIUS]
    if bad:
        raise ValueError(f"unknown white-cell class(es) {bad}; expected one of {', '.join(CLASSES)}")
    return _render(rng, cell_classes, size)


def _voc_xml(filename: str, size: tuple[int, int], wbc: list[Box]) -> str:
    """BCCD-style Pascal VOC annotation (white cells only: red-cell boxes would double the dataset size)."""
    width, height = size
    objs = "".join(
        f"\t<object>\n\t\t<name>WBC</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
        f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
        f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for x0, y0, x1, y1 in wbc)
    return (f"<annotation>\n\t<folder>fields</folder>\n\t<filename>{escape(filename)}</filename>\n"
            f"\t<source>\n\t\t<database>hemaflow synthetic</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{objs}</annotation>\n")


def _class_counts(n_single: int) -> list[int]:
    """Split n_single fields over the classes in CLASS_WEIGHTS proportions (largest remainder)."""
    w = np.asarray(CLASS_WEIGHTS, float)
    exact = n_single * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_single - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def plan_dataset(n_fields: int, seed: int) -> dict:
    """Decide, before drawing, each field's cells and the labels-file rows with their faults.

    Field classes are shuffled; one field holds a neutrophil and a lymphocyte (multi-label row),
    one field gets no row, three get a blank category, a few get odd case/plural, and one
    row names an image that does not exist.
    """
    if n_fields < MIN_FIELDS:
        raise ValueError(f"n_fields must be at least {MIN_FIELDS} to plant every labels-file fault, got {n_fields}")
    rng = np.random.default_rng([seed, 0xF1E1D])
    single = [c for c, n in zip(CLASSES, _class_counts(n_fields - 2)) for _ in range(n)]
    order = rng.permutation(n_fields)
    multi_id, unlabelled_id = int(order[0]), int(order[1])
    cells: dict[int, list[str]] = {multi_id: ["neutrophil", "lymphocyte"]}
    singles = sorted(int(i) for i in order[2:])
    for fid, cls in zip(singles, rng.permutation(single)):
        cells[fid] = [str(cls)]
    cells[unlabelled_id] = [str(CLASSES[int(rng.integers(0, len(CLASSES)))])]
    singles_twins = rng.choice(singles, size=max(1, round(TWIN_FRACTION * len(singles))), replace=False)
    for fid in singles_twins:
        cells[int(fid)] = cells[int(fid)] * 2
    picks = [int(i) for i in rng.choice(singles, size=6, replace=False)]
    blank_ids = picks[:3]
    variant = {"lymphocyte": "lymphocyte", "monocyte": "Monocyte", "neutrophil": "Neutrophils"}
    variant_ids: list[int] = []
    for cls, text in variant.items():  # one odd spelling per class, on a field of that class
        cands = [i for i in singles if cells[i][0] == cls and i not in blank_ids and i not in variant_ids]
        if cands:
            variant_ids.append(int(rng.choice(cands)))
    rows: list[tuple[int, str]] = []
    for fid in range(n_fields):
        if fid == unlabelled_id:
            continue
        if fid == multi_id:
            text = "NEUTROPHIL, LYMPHOCYTE"
        elif fid in blank_ids:
            text = ""
        elif fid in variant_ids:
            text = variant[cells[fid][0]]
        else:
            text = cells[fid][0].upper()
        rows.append((fid, text))
    missing_id = n_fields + int(rng.integers(1, 20))
    rows.append((missing_id, CLASSES[int(rng.integers(0, len(CLASSES)))].upper()))
    return {
        "cells": {i: cells[i] for i in range(n_fields)},
        "rows": rows,
        "faults": {
            "blank_ids": sorted(blank_ids),
            "multi_label_id": multi_id,
            "variant_ids": sorted(variant_ids),
            "missing_image_id": missing_id,
            "unlabelled_id": unlabelled_id,
        },
    }


def _labels_csv(rows: list[tuple[int, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Image", "Category"])
    w.writerows(rows)
    return buf.getvalue()


def generate_dataset(out_dir: Path, n_fields: int = 150, seed: int = 0, progress: Progress | None = None) -> dict:
    """Write fields/*.jpg, annotations/*.xml and labels.csv under out_dir; return a summary.

    Byte-for-byte reproducible for a given (n_fields, seed) and OpenCV build: each field
    draws from its own seeded stream, so fields do not depend on each other.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_dataset(n_fields, seed)
    (out_dir / "fields").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    size = (640, 480)
    n_cells = 0
    for fid in track(range(n_fields), n_fields, progress, every=10):
        name = FIELD_NAME.format(fid)
        img, wbc = render_field(np.random.default_rng([seed, fid]), plan["cells"][fid], size)
        if not cv2.imwrite(str(out_dir / "fields" / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_OPTIMIZE, 1]):
            raise OSError(f"{out_dir / 'fields' / name}.jpg: could not write image")
        (out_dir / "annotations" / f"{name}.xml").write_text(_voc_xml(f"{name}.jpg", size, wbc))
        n_cells += len(wbc)
    (out_dir / "labels.csv").write_text(_labels_csv(plan["rows"]))
    per_class = {c: sum(v[0] == c for k, v in plan["cells"].items() if len(set(v)) == 1) for c in CLASSES}
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    return {
        "out_dir": str(out_dir),
        "n_fields": n_fields,
        "seed": seed,
        "n_white_cells": n_cells,
        "fields_per_class": per_class,
        "faults": plan["faults"],
        "total_bytes": sum(p.stat().st_size for p in files),
        "seconds": round(time.perf_counter() - start, 2),
    }
