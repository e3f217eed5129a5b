"""Tiny synthetic white-cell dataset in the augment stage's output format, for train/evaluate tests.

Each class is a cartoon cell on a white background: a cytoplasm disc and a nucleus whose
colour and shape differ per class, with random position, size, colour jitter and noise,
so a small CNN learns it in a few epochs but not from a single pixel.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")

# class -> (cytoplasm RGB, nucleus RGB, nucleus shape)
LOOKS = {
    "neutrophil": ((235, 200, 215), (120, 60, 150), "lobes"),
    "lymphocyte": ((190, 200, 240), (40, 40, 120), "round"),
    "monocyte": ((200, 200, 215), (140, 110, 180), "kidney"),
    "eosinophil": ((240, 140, 90), (110, 50, 120), "bilobe"),
    "basophil": ((150, 100, 170), (50, 20, 70), "granules"),
}


def draw_cell(label: str, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One RGB uint8 cartoon cell of class `label`."""
    cyto, nucleus, shape = LOOKS[label]
    img = np.full((size, size, 3), 245, np.uint8)
    c = np.array([size // 2, size // 2]) + rng.integers(-8, 9, 2)
    r = int(size * rng.uniform(0.30, 0.40))
    jitter = lambda col: tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in col)  # noqa: E731
    cv2.circle(img, tuple(int(v) for v in c), r, jitter(cyto), -1)
    col = jitter(nucleus)
    if shape == "round":
        cv2.circle(img, tuple(int(v) for v in c), int(r * 0.8), col, -1)
    elif shape == "kidney":
        cv2.ellipse(img, tuple(int(v) for v in c), (int(r * 0.6), int(r * 0.4)), float(rng.uniform(0, 180)), 0, 300, col, -1)
    else:
        n = {"lobes": 3, "bilobe": 2, "granules": 12}[shape]
        rad = int(r * (0.12 if shape == "granules" else 0.3))
        spread = r * (0.7 if shape == "granules" else 0.4)
        for a in rng.uniform(0, 2 * np.pi, n):
            p = c + (spread * np.array([np.cos(a), np.sin(a)])).astype(int)
            cv2.circle(img, tuple(int(v) for v in p), rad, col, -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_dataset(dataset_dir: Path, per_split: dict[str, int] | None = None, seed: int = 0,
                  size: int = 96) -> pd.DataFrame:
    """Write PNGs (cv2.imwrite of BGR arrays, like the real stages) and dataset.parquet."""
    per_split = per_split or {"train": 12, "val": 4, "test": 8}
    rng = np.random.default_rng(seed)
    img_dir = dataset_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in per_split.items():
        for label in CLASSES:
            for i in range(n):
                crop_id = f"{split}_{label}_{i:03d}"
                path = f"images/{crop_id}.png"
                rgb = draw_cell(label, rng, size)
                cv2.imwrite(str(dataset_dir / path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                rows.append({"path": path, "label": label, "split": split, "source_id": f"src_{crop_id}",
                             "source_sha256": "0" * 64, "crop_id": crop_id, "augmented": False})
    df = pd.DataFrame(rows)
    df.to_parquet(dataset_dir / "dataset.parquet", index=False)
    return df
