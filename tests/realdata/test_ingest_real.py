"""Ingest of the real PBC class folders and BCCD smear fields (../shared/data).

Counts come from /work/shared/data/README.md and were checked on disk: pbc has 10,253
JPEGs plus one hidden non-image file (images/neutrophil/.DS_169665.jpg, an Apple
Desktop Services Store), 276 images that are not 360x363 (normal variation, not
flagged), and 8 exact-duplicate pairs of which one carries two labels.
"""

import csv
import json

import pandas as pd
import pytest

from hemaflow.config import IngestParams
from hemaflow.imageio import read_image
from hemaflow.tasks.ingest import ingest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

PBC_COUNTS = {"basophil": 728, "eosinophil": 1869, "erythroblast": 931, "ig": 1738, "lymphocyte": 728,
              "monocyte": 852, "neutrophil": 1998, "platelet": 1409}
BCCD = IngestParams(images_glob="JPEGImages/*.jpg", annotations_dir="Annotations", split_lists_dir="ImageSets/Main",
                    id_pattern="BloodImage_{:05d}.jpg")


@pytest.fixture(scope="module")
def pbc(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pbc") / "manifest.parquet"
    res = ingest(shared_data / "pbc", out, IngestParams())
    return res, pd.read_parquet(out)


@pytest.fixture(scope="module")
def bccd(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bccd") / "manifest.parquet"
    res = ingest(shared_data / "bccd" / "BCCD", out, BCCD)
    return res, pd.read_parquet(out)


def test_pbc_every_file_and_class_count(pbc):
    res, df = pbc
    assert res.reader == "class_folders" and len(df) == 10_254 == res.n_images
    ok = df[df["error"].isna()]
    assert ok["label_raw"].value_counts().to_dict() == PBC_COUNTS
    assert ok["phash"].str.fullmatch(r"[0-9a-f]{16}").all() and ok["sha256"].str.len().eq(64).all()
    assert (ok["channels"] == 3).all()


def test_pbc_only_the_non_image_file_has_an_error(pbc):
    _, df = pbc
    bad = df[df["error"].notna()]
    assert bad["path"].tolist() == ["images/neutrophil/.DS_169665.jpg"]
    assert bad["error"].iloc[0].split(":")[0] in {"not_an_image", "unreadable_image"}


def test_pbc_other_sizes_are_kept_not_flagged(pbc):
    _, df = pbc
    ok = df[df["error"].isna()]
    sizes = (ok["width"].astype(str) + "x" + ok["height"].astype(str)).value_counts().to_dict()
    assert sizes == {"360x363": 9977, "366x369": 150, "360x360": 124, "359x360": 1, "361x360": 1}


def test_pbc_duplicates_share_hashes(pbc):
    _, df = pbc
    groups = df[df["error"].isna()].groupby("sha256")
    dups = groups.filter(lambda g: len(g) > 1)
    assert dups["sha256"].nunique() == 8 and len(dups) == 16
    assert (dups.groupby("sha256")["phash"].nunique() == 1).all()
    two_labels = dups.groupby("sha256")["label_raw"].nunique()
    assert (two_labels > 1).sum() == 1
    pair = dups[dups["sha256"] == two_labels.idxmax()]
    assert sorted(pair["path"]) == ["images/eosinophil/EO_225902.jpg", "images/neutrophil/BNE_191112.jpg"]


def test_bccd_fields_boxes_and_splits(bccd, shared_data):
    res, df = bccd
    assert res.reader == "voc_fields" and len(df) == 364 and res.n_errors == 0
    assert set(zip(df["width"], df["height"], df["channels"])) == {(640, 480, 3)}
    n_wbc = df["boxes"].map(lambda b: len(json.loads(b)))
    assert (n_wbc == 0).sum() == 6 and (n_wbc >= 2).sum() == 14
    assert df["split"].value_counts().to_dict() == {"train": 205, "val": 87, "test": 72}
    assert df["label_raw"].isna().all()  # BCCD's white-cell labels CSV is not shipped there
    # the boxes agree with the flattened test.csv (filename, cell_type, xmin, xmax, ymin, ymax)
    expected: dict[str, list] = {}
    with open(shared_data / "bccd" / "test.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["cell_type"] == "WBC":
                expected.setdefault(r["filename"].removesuffix(".jpg"), []).append(
                    [int(r["xmin"]), int(r["ymin"]), int(r["xmax"]), int(r["ymax"])])
    got = {i: sorted(json.loads(b)) for i, b in zip(df["image_id"], df["boxes"]) if b != "[]"}
    assert got == {k: sorted(v) for k, v in expected.items()}
    assert sum(map(len, got.values())) == 372


def test_bccd_images_read_back_by_manifest_path(bccd, shared_data):
    _, df = bccd
    for path in df["path"].head(3):
        assert read_image(shared_data / "bccd" / "BCCD", path).shape == (480, 640, 3)
