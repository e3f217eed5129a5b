"""ingest + validate_labels on all of the real PBC set (../shared/data/pbc) with the 8-class taxonomy."""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pytest

from hemaflow.config import IngestParams, load_params
from hemaflow.tasks.ingest import ingest
from hemaflow.tasks.validate_labels import validate_labels

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# what the README of the shared data says, minus what validation must take out (measured once, kept literal
# so a change in either the data or the validator shows up as a number)
EXPECTED_CLEAN = {"basophil": 727, "eosinophil": 1866, "erythroblast": 931, "ig": 1735, "lymphocyte": 728,
                  "monocyte": 851, "neutrophil": 1997, "platelet": 1409}


@pytest.fixture(scope="module")
def pbc_run(shared_data: Path, project_root: Path, tmp_path_factory):
    pbc = shared_data / "pbc"
    if not (pbc / "images").is_dir():
        pytest.skip(f"PBC images not present at {pbc / 'images'}")
    params = load_params(project_root / "examples" / "pbc.params.yaml")
    out = tmp_path_factory.mktemp("pbc")
    ingest(pbc, out / "manifest.parquet", IngestParams(reader="class_folders"))
    started = time.perf_counter()
    result = validate_labels(out / "manifest.parquet", out / "labels", params.validate_labels, params.base.classes)
    seconds = time.perf_counter() - started
    print(f"\nvalidate_labels on PBC: {seconds:.2f} s, {result.summary()}")
    return pbc, out, result, seconds


def file_facts(pbc: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Independent of the pipeline: sha256 -> files, and the files that are not JPEGs at all."""
    by_sha: dict[str, list[str]] = defaultdict(list)
    not_jpeg = []
    for p in sorted((pbc / "images").glob("*/*")):
        if p.is_file():
            data = p.read_bytes()
            by_sha[hashlib.sha256(data).hexdigest()].append(p.relative_to(pbc).as_posix())
            if data[:3] != b"\xff\xd8\xff":
                not_jpeg.append(p.relative_to(pbc).as_posix())
    return by_sha, not_jpeg


def test_non_image_file_is_in_the_review_list(pbc_run) -> None:
    pbc, out, result, _ = pbc_run
    _, not_jpeg = file_facts(pbc)
    assert not_jpeg == ["images/neutrophil/.DS_169665.jpg"]
    review = pd.read_csv(result.review_path).set_index("path")
    assert not_jpeg[0] in review.index, "the non-image file is missing from the review list (did ingest list it?)"
    assert review.loc[not_jpeg[0], "reason"] in {"not_an_image", "unreadable_image"}


def test_duplicate_pair_with_two_labels_is_a_conflict(pbc_run) -> None:
    pbc, out, result, _ = pbc_run
    by_sha, _ = file_facts(pbc)
    conflicting = [sorted(files) for files in by_sha.values() if len({f.split("/")[1] for f in files}) > 1]
    assert len(conflicting) == 1, conflicting
    pair = conflicting[0]
    review = pd.read_csv(result.review_path)
    flagged = review.loc[review["reason"] == "conflicting_duplicate", "path"].sort_values().tolist()
    assert flagged == pair
    clean = pd.read_parquet(result.clean_path)
    assert not clean["path"].isin(pair).any()


def test_clean_counts_per_class(pbc_run) -> None:
    pbc, out, result, _ = pbc_run
    by_sha, not_jpeg = file_facts(pbc)
    expected = Counter(f.split("/")[1] for files in by_sha.values() for f in files if f not in not_jpeg)
    for files in by_sha.values():
        classes = {f.split("/")[1] for f in files}
        if len(files) > 1:
            for f in files if len(classes) > 1 else files[1:]:  # conflict: all go; same label: one copy stays
                expected[f.split("/")[1]] -= 1
    assert result.class_counts == dict(expected) == EXPECTED_CLEAN
    clean = pd.read_parquet(result.clean_path)
    assert clean["sha256"].is_unique and clean["group_id"].notna().all()
    assert result.problems["duplicate_image"] == 7


def test_near_duplicates_found_by_phash(pbc_run) -> None:
    pbc, out, result, seconds = pbc_run
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["phash"].notna().sum() == len(manifest) - 1  # every image but the non-image file
    pairs = pd.read_csv(out / "labels" / "near_duplicates.csv")
    # measured: at <= 4 bits exactly one pair, two shots of the same monocyte (2 bits apart)
    assert pairs[["image_id_a", "image_id_b", "distance"]].values.tolist() == [
        ["monocyte/MO_231316", "monocyte/MO_415531", 2]]
    clean = pd.read_parquet(result.clean_path).set_index("image_id")
    assert clean.loc["monocyte/MO_415531", "group_id"] == clean.loc["monocyte/MO_231316", "group_id"]
    assert seconds < 30, f"validate_labels took {seconds:.1f} s on 10k images"


def test_label_corrections_on_pbc(pbc_run, project_root: Path, tmp_path) -> None:
    """The images the label review sheet showed (stop 27): a person's relabel and drop land in the clean table."""
    pbc, out, result, _ = pbc_run
    corrections = tmp_path / "label_corrections.csv"
    corrections.write_text("path,action,label,note\n"
                           "images/monocyte/MO_332923.jpg,relabel,lymphocyte,looks like a lymphocyte\n"
                           "images/neutrophil/BNE_143245.jpg,drop,,a second cell at the crop's edge\n"
                           "images/platelet/PLATELET_89526.jpg,,erythroblast,undecided\n")
    params = load_params(project_root / "examples" / "pbc.params.yaml")
    fixed = validate_labels(out / "manifest.parquet", tmp_path / "labels", params.validate_labels,
                            params.base.classes, corrections_path=corrections)
    assert fixed.class_counts == {**result.class_counts, "monocyte": result.class_counts["monocyte"] - 1,
                                  "lymphocyte": result.class_counts["lymphocyte"] + 1,
                                  "neutrophil": result.class_counts["neutrophil"] - 1}
    clean = pd.read_parquet(fixed.clean_path).set_index("path")
    assert clean.loc["images/monocyte/MO_332923.jpg", ["label_raw", "label"]].tolist() == ["monocyte", "lymphocyte"]
    assert "images/neutrophil/BNE_143245.jpg" not in clean.index
    assert clean.loc["images/platelet/PLATELET_89526.jpg", "label"] == "platelet"
    assert fixed.problems["relabelled_by_reviewer"] == 1 and fixed.problems["dropped_by_reviewer"] == 1
