"""tests/fixtures/layouts.py: each layout is read by its reader, faults planted, cells segmentable, bytes reproducible."""

import hashlib

import cv2
import pandas as pd

from hemaflow.config import IngestParams, SegmentParams
from hemaflow.readers import detect_reader
from hemaflow.tasks.ingest import ingest
from hemaflow.tasks.segment import find_white_cells
from tests.fixtures.layouts import make_allidb, make_labels_csv_layout, make_medmnist

SEG = SegmentParams(method="colour", min_area_frac=0.01, max_area_frac=0.6, detect_downscale=2, lobe_join_px=10)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_allidb_names_labels_and_centred_cells(tmp_path):
    make_allidb(tmp_path / "a", n_per_class=6)
    make_allidb(tmp_path / "b", n_per_class=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert detect_reader(tmp_path / "a", IngestParams()) == "filename_labels"
    res = ingest(tmp_path / "a", tmp_path / "m.parquet", IngestParams())
    df = pd.read_parquet(tmp_path / "m.parquet")
    assert res.n_errors == 0 and df["label_raw"].value_counts().to_dict() == {"lymphoblast": 6, "no_blast": 6}
    centred = 0
    for p in sorted((tmp_path / "a").glob("*.tif")):
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        centred += any(abs((d.box[0] + d.box[2]) / 2 - w / 2) < 0.15 * w and abs((d.box[1] + d.box[3]) / 2 - h / 2) < 0.15 * h
                       and not d.touches_border for d in find_white_cells(img, SEG))
    assert centred >= 11


def test_medmnist_archive(tmp_path):
    info = make_medmnist(tmp_path, n_per_class=(3, 1, 2))
    assert info["file"] == "bloodmnist_64.npz" and detect_reader(tmp_path, IngestParams()) == "medmnist"
    ingest(tmp_path, tmp_path / "m.parquet", IngestParams())
    df = pd.read_parquet(tmp_path / "m.parquet")
    assert df["split"].value_counts().to_dict() == {"train": 9, "test": 6, "val": 3}
    assert set(df["label_raw"]) == {"eosinophil", "lymphocyte", "neutrophil"} and (df["width"] == 64).all()


def test_labels_csv_layout_with_its_two_faults(tmp_path):
    info = make_labels_csv_layout(tmp_path, n_per_class=5)
    assert detect_reader(tmp_path, IngestParams()) == "labels_csv"
    res = ingest(tmp_path, tmp_path / "m.parquet", IngestParams())
    df = pd.read_parquet(tmp_path / "m.parquet").set_index("path", drop=False)
    assert res.n_images == 15 and res.errors == {"label_without_image": 1}
    assert pd.isna(df.loc[info["unlabelled"]].label_raw)
    assert df["error"].dropna().str.contains(info["missing"]).all()
    assert set(df["split"].dropna()) == {"train", "val", "test"}
