from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hemaflow.config import ValidateLabelsParams
from hemaflow.errors import StageInputError
from hemaflow.schema import CLEAN_COLUMNS, MANIFEST_COLUMNS
from hemaflow.taxonomy import Taxonomy
from hemaflow.tasks.validate_labels import LabelValidationError
from hemaflow.tasks.validate_labels import validate_labels as validate_labels_strict


def validate_labels(*args, **kwargs):
    """The review-logic tests use tiny fixtures that leave some configured classes empty."""
    return validate_labels_strict(*args, require_every_class=False, **kwargs)

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
CFG = ValidateLabelsParams(synonyms={"neutrophil": ("sne", "bne", "seg")})


def _row(image_id, label_raw, sha=None, error=None, path="auto"):
    return {"image_id": image_id, "path": f"fields/{image_id}.jpg" if path == "auto" else path,
            "sha256": sha or f"sha-{image_id}", "width": 10, "height": 10, "channels": 3, "source": "voc_fields",
            "label_raw": label_raw, "boxes": "[]", "split": None, "error": error}


@pytest.fixture
def manifest(tmp_path):
    rows = [
        _row("a", "NEUTROPHIL"), _row("b", "Neutrophils"), _row("c", "lymphocyte"), _row("d", "SNE"),
        _row("e", ""), _row("f", "NEUTROPHIL, LYMPHOCYTE"), _row("g", "megakaryocyte"), _row("h", None),
        _row("i", "MONOCYTE", error="unreadable_image: OpenCV cannot decode it"),
        _row("j", "MONOCYTE", path=None, sha=None, error="label_without_image: no such file"),
        _row("k", "EOSINOPHIL", sha="same"), _row("l", "BASOPHIL", sha="same"),
        _row("m", "monocyte", sha="dup"), _row("n", "Monocyte", sha="dup"),
        _row("o", "Neutrophil, neutrophil"),
    ]
    p = tmp_path / "manifest.parquet"
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(p)
    return p


def test_clean_table_and_review_reasons(manifest, tmp_path):
    res = validate_labels(manifest, tmp_path / "labels", CFG, CLASSES)
    clean = pd.read_parquet(res.clean_path).set_index("image_id")
    assert clean["label"].to_dict() == {"a": "neutrophil", "b": "neutrophil", "c": "lymphocyte", "d": "neutrophil",
                                        "m": "monocyte", "o": "neutrophil"}
    review = pd.read_csv(res.review_path)
    reasons = dict(zip(review["item"], review["reason"]))
    assert reasons == {"e": "blank_label", "f": "multi_label", "g": "unknown_class", "h": "image_without_label",
                       "i": "unreadable_image", "j": "label_without_image", "k": "conflicting_duplicate",
                       "l": "conflicting_duplicate", "n": "duplicate_image"}
    assert "megakaryocyte" in review.set_index("item").loc["g", "detail"]
    assert res.problems["conflicting_duplicate"] == 2


def test_fail_policy_stops_with_the_list(manifest, tmp_path):
    with pytest.raises(LabelValidationError, match=r"(?s)manifest\.parquet: 9 item\(s\).*blank_label"):
        validate_labels(manifest, tmp_path / "labels", CFG.model_copy(update={"on_error": "fail"}), CLASSES)
    assert (tmp_path / "labels" / "review.csv").is_file()  # the list is written before stopping


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(StageInputError, match="missing.parquet"):
        validate_labels(tmp_path / "missing.parquet", tmp_path / "o", CFG, CLASSES)
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"image_id": ["x"]}).to_parquet(bad)
    with pytest.raises(StageInputError, match=r"bad\.parquet: missing column"):
        validate_labels(bad, tmp_path / "o", CFG, CLASSES)


def test_taxonomy_rejects_synonyms_for_unknown_class():
    with pytest.raises(ValueError, match="platelet"):
        Taxonomy.build(CLASSES, {"platelet": ("plt",)})


# ---------------------------------------------------------------- newer manifests: phash, second annotator

import json  # noqa: E402
import time  # noqa: E402




from hemaflow.config import IngestParams  # noqa: E402
from hemaflow.duplicates import near_duplicate_pairs, parse_phash  # noqa: E402

BASE_HASH = 0x0123456789ABCDEF


def _hash(flip_bits: int = 0, base: int = BASE_HASH) -> str:
    """16-hex phash that differs from base in the lowest `flip_bits` bits."""
    return f"{base ^ ((1 << flip_bits) - 1):016x}"


def _row2(image_id, label_raw, phash, label_raw_2=None, **kw):
    return {**_row(image_id, label_raw, **kw), "phash": phash, "label_raw_2": label_raw_2}


def _write(rows, tmp_path) -> Path:
    p = tmp_path / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(p)
    return p


def _far(k: int) -> str:
    """Hashes far apart from each other and from BASE_HASH (random 64-bit, fixed seed)."""
    return f"{int(np.random.default_rng(k).integers(0, 2**63)):016x}"


def test_near_duplicates_are_grouped_and_conflicts_dropped(tmp_path):
    rows = [
        _row2("a1", "neutrophil", _hash(0)), _row2("a2", "SNE", _hash(3)), _row2("a3", "neutrophil", _hash(4, BASE_HASH ^ 0xF0)),
        _row2("b1", "lymphocyte", _far(1)), _row2("b2", "monocyte", f"{int(_far(1), 16) ^ 0b11:016x}"),
        _row2("c1", "monocyte", _far(2)), _row2("c2", "monocyte", f"{int(_far(2), 16) ^ 0b11111:016x}"),
        _row2("d1", "eosinophil", None),
    ]
    res = validate_labels(_write(rows, tmp_path), tmp_path / "labels", CFG, CLASSES)
    clean = pd.read_parquet(res.clean_path).set_index("image_id")
    # a1-a2: 3 bits; a3 is 8 bits from a1 and 5 from a2: not a near-duplicate of either
    assert clean.loc[["a1", "a2", "a3"], "group_id"].tolist() == ["a1", "a1", "a3"]
    assert set(clean.index) == {"a1", "a2", "a3", "c1", "c2", "d1"}
    assert clean.loc["c2", "group_id"] == "c2"   # 5 bits > 4: not a near-duplicate
    assert clean.loc["d1", "group_id"] == "d1"   # no phash: its own group
    review = pd.read_csv(res.review_path).set_index("item")
    assert review.loc["a2", "reason"] == "near_duplicate" and "grouped with a1 (phash distance 3" in review.loc["a2", "detail"]
    assert review.loc[["b1", "b2"], "reason"].tolist() == ["conflicting_near_duplicate"] * 2
    assert "labelled monocyte vs lymphocyte" in review.loc["b2", "detail"]
    pairs = pd.read_csv(tmp_path / "labels" / "near_duplicates.csv")
    assert sorted(map(tuple, pairs[["image_id_a", "image_id_b", "distance"]].values.tolist())) == [("a1", "a2", 3), ("b1", "b2", 2)]
    assert res.near_duplicate_pairs == 2 and res.n_groups == 1
    assert res.summary()["near-duplicate pairs"] == 2


def test_near_duplicate_chain_forms_one_group(tmp_path):
    rows = [_row2("x1", "basophil", _hash(0)), _row2("x2", "basophil", _hash(4)),
            _row2("x3", "basophil", f"{BASE_HASH ^ 0b1111 ^ (0b1111 << 8):016x}")]  # 4 from x2, 8 from x1
    res = validate_labels(_write(rows, tmp_path), tmp_path / "labels", CFG, CLASSES)
    clean = pd.read_parquet(res.clean_path)
    assert clean["group_id"].tolist() == ["x1", "x1", "x1"]
    assert list(clean.columns) == list(CLEAN_COLUMNS)


def test_near_duplicates_alone_do_not_fail_the_run(tmp_path):
    rows = [_row2("a1", "neutrophil", _hash(0)), _row2("a2", "neutrophil", _hash(2))]
    cfg = CFG.model_copy(update={"on_error": "fail"})
    res = validate_labels(_write(rows, tmp_path), tmp_path / "labels", cfg, CLASSES)
    assert res.n_clean == 2 and res.problems == {"near_duplicate": 1}
    rows.append(_row2("a3", "neutrophil", _far(9), error="truncated_jpeg: no end-of-image marker"))
    with pytest.raises(LabelValidationError, match=r"1 item\(s\) failed.*\n  truncated_jpeg: a3"):
        validate_labels(_write(rows, tmp_path), tmp_path / "labels", cfg, CLASSES)


def test_near_duplicate_check_can_be_turned_off(tmp_path):
    rows = [_row2("a1", "neutrophil", _hash(0)), _row2("a2", "lymphocyte", _hash(1))]
    res = validate_labels(_write(rows, tmp_path), tmp_path / "labels",
                          CFG.model_copy(update={"near_duplicate_distance": None}), CLASSES)
    assert res.n_clean == 2 and res.near_duplicate_pairs is None
    assert res.summary()["near-duplicate pairs"] == "not checked"


def test_subtype_prefix_contradicting_the_label(tmp_path):
    rows = [_row2("n1", "neutrophil", _far(1), path="images/neutrophil/SNE_1.jpg"),
            _row2("n2", "monocyte", _far(2), path="images/monocyte/BNE_2.jpg"),
            _row2("n3", "monocyte", _far(3), path="images/monocyte/XYZ_3.jpg")]
    res = validate_labels(_write(rows, tmp_path), tmp_path / "labels", CFG, CLASSES)
    review = pd.read_csv(res.review_path)
    assert review[["item", "reason"]].values.tolist() == [["n2", "label_mismatch"]]
    assert "prefix says neutrophil, the label 'monocyte' says monocyte" in review.loc[0, "detail"]
    off = validate_labels(_write(rows, tmp_path), tmp_path / "off", CFG.model_copy(update={"check_file_prefix": False}),
                          CLASSES)
    assert off.n_clean == 3


@pytest.mark.parametrize("error, code", [
    ("truncated_jpeg: no end-of-image marker, the file was cut short", "truncated_jpeg"),
    ("not_an_image: suffix '.txt' is not an image type", "not_an_image"),
    ("unreadable_image: OpenCV cannot decode it", "unreadable_image"),
    ("size_out_of_range: 40x40 is more than 4x away from the usual 360x363", "size_out_of_range"),
    ("path_outside_data_folder: the name leaves the data folder (labels.csv line 3: '../x.jpg')", "path_outside_data_folder"),
])
def test_ingest_errors_pass_through_with_code_and_detail(tmp_path, error, code):
    rows = [_row2("bad", "neutrophil", None, error=error), _row2("ok", "neutrophil", _far(1))]
    res = validate_labels(_write(rows, tmp_path), tmp_path / "labels", CFG, CLASSES)
    review = pd.read_csv(res.review_path)
    assert review[["item", "reason", "detail"]].values.tolist() == [["bad", code, error.partition(": ")[2]]]
    assert res.n_clean == 1


def test_second_annotator_kappa_and_disagreements(tmp_path):
    first = ["neutrophil"] * 4 + ["lymphocyte"] * 3 + ["monocyte"] * 3
    second = ["SNE", "seg", "neutrophil", "lymphocyte", "lymphocyte", "Lymphocytes", "lymphocyte", "monocyte", "monocyte", None]
    rows = [_row2(f"i{k}", a, _far(k), label_raw_2=b) for k, (a, b) in enumerate(zip(first, second))]
    res = validate_labels(_write(rows, tmp_path), tmp_path / "labels", CFG, CLASSES)
    # 9 compared (i9 has no second label), 8 agree; kappa by hand: po=8/9, pe=(4*3+3*4+2*2)/81
    po, pe = 8 / 9, (4 * 3 + 3 * 4 + 2 * 2) / 81
    assert res.agreement["cohen_kappa"] == pytest.approx((po - pe) / (1 - pe), abs=1e-4)
    assert res.summary()["cohen kappa"] == res.agreement["cohen_kappa"]
    assert res.summary()["annotator agreement"] == "8/9"
    dis = pd.read_csv(tmp_path / "labels" / "disagreements.csv")
    assert dis[["image_id", "label", "label_2"]].values.tolist() == [["i3", "neutrophil", "lymphocyte"]]
    saved = json.loads((tmp_path / "labels" / "agreement.json").read_text())
    assert saved["cohen_kappa"] == res.agreement["cohen_kappa"]
    review = pd.read_csv(res.review_path)
    assert review[["item", "reason"]].values.tolist() == [["i3", "annotator_disagreement"]]
    assert res.n_clean == 9
    kept = validate_labels(_write(rows, tmp_path), tmp_path / "keep", CFG.model_copy(update={"on_disagreement": "keep"}),
                           CLASSES)
    assert kept.n_clean == 10 and kept.problems == {}


def test_no_second_annotator_means_no_kappa(manifest, tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "agreement.json").write_text("{}")  # left by an earlier run with two annotators
    res = validate_labels(manifest, tmp_path / "labels", CFG, CLASSES)
    assert res.agreement is None and "cohen kappa" not in res.summary()
    assert not (tmp_path / "labels" / "agreement.json").exists()


def test_near_duplicate_search_is_exact_and_fast():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 10_000, dtype=np.uint64)
    hashes[500] = hashes[10] ^ np.uint64(0b101)        # distance 2
    hashes[9_999] = hashes[4_000] ^ np.uint64(0b1111)  # distance 4
    started = time.perf_counter()
    pairs = near_duplicate_pairs(hashes, 4)
    seconds = time.perf_counter() - started
    assert sorted(map(tuple, pairs.values.tolist())) == [(10, 500, 2), (4_000, 9_999, 4)]
    assert seconds < 10, f"10k hashes took {seconds:.1f} s"
    small = hashes[:200]
    brute = {(i, j) for i in range(200) for j in range(i + 1, 200) if bin(int(small[i]) ^ int(small[j])).count("1") <= 26}
    assert set(map(tuple, near_duplicate_pairs(small, 26)[["i", "j"]].values.tolist())) == brute
    assert brute  # the threshold is loose enough to find pairs, so the comparison means something
    parsed, valid = parse_phash(["00000000000000ff", None, "zz", "1"])
    assert parsed[0] == 255 and valid.tolist() == [True, False, False, False]


def _jpeg(path, seed: int, size: int = 48) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path.read_bytes()


def test_generated_class_folders_through_ingest(tmp_path):
    """Real files with real faults, read by the real ingest: every fault reaches the review list."""
    raw = tmp_path / "raw" / "images"
    for k in range(4):
        _jpeg(raw / "neutrophil" / f"SNE_{k}.jpg", k)
        _jpeg(raw / "lymphocyte" / f"LY_{k}.jpg", 10 + k)
    data = _jpeg(raw / "monocyte" / "MO_0.jpg", 20)
    (raw / "lymphocyte" / "LY_copy.jpg").write_bytes(data)            # same bytes, two labels
    (raw / "monocyte" / "MO_cut.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (raw / "monocyte" / "MO_junk.jpg").write_bytes(b"not a jpeg at all" * 10)
    (raw / "neutrophil" / ".DS_1.jpg").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    (raw / "megakaryocyte").mkdir()
    _jpeg(raw / "megakaryocyte" / "MK_0.jpg", 30)
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}

    from hemaflow.tasks.ingest import ingest
    manifest_path = tmp_path / "manifest.parquet"
    ingest(tmp_path / "raw", manifest_path, IngestParams(reader="class_folders"))
    manifest = pd.read_parquet(manifest_path)
    res = validate_labels(manifest_path, tmp_path / "labels", CFG, CLASSES)

    review = pd.read_csv(res.review_path)
    by_file = {p.rsplit("/", 1)[-1]: r for p, r in zip(review["path"], review["reason"])}
    errors = {p.rsplit("/", 1)[-1]: e.partition(": ")[0] for p, e in zip(manifest["path"], manifest["error"]) if pd.notna(e)}
    for name in ("MO_cut.jpg", "MO_junk.jpg", ".DS_1.jpg"):
        assert name in errors, f"ingest did not flag {name}"
        assert by_file[name] == errors[name]
    assert errors["MO_cut.jpg"] == "truncated_jpeg"
    assert by_file["MO_0.jpg"] == by_file["LY_copy.jpg"] == "conflicting_duplicate"
    assert by_file["MK_0.jpg"] == "unknown_class"
    assert res.class_counts == {"neutrophil": 4, "lymphocyte": 4, "monocyte": 0, "eosinophil": 0, "basophil": 0}
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before  # raw files untouched


# --- a configured class left empty fails the run (fail fast, name the classes) ---

def test_empty_configured_class_fails_naming_it(manifest, tmp_path):
    with pytest.raises(LabelValidationError, match=r"no image of class\(es\) eosinophil, basophil") as err:
        validate_labels_strict(manifest, tmp_path / "labels", CFG, CLASSES)
    assert "manifest.parquet" in str(err.value) and "review.csv" in str(err.value)
    assert (tmp_path / "labels" / "review.csv").is_file(), "the review list is still written"


def test_no_image_at_all_fails(tmp_path):
    rows = [_row("x", "megakaryocyte"), _row("y", "")]
    with pytest.raises(LabelValidationError, match="kept no image at all"):
        validate_labels_strict(_write(rows, tmp_path), tmp_path / "labels", CFG, CLASSES)


def test_empty_class_folder_is_reported(tmp_path):
    from hemaflow.config import IngestParams
    from hemaflow.tasks.ingest import ingest

    raw = tmp_path / "raw" / "images"
    for cls in ("neutrophil", "lymphocyte"):
        (raw / cls).mkdir(parents=True)
    cv2.imwrite(str(raw / "neutrophil" / "n1.png"), np.full((40, 40, 3), 200, np.uint8))
    ingest(tmp_path / "raw", tmp_path / "manifest.parquet", IngestParams(reader="class_folders"))
    with pytest.raises(LabelValidationError, match=r"no image of class\(es\) lymphocyte"):
        validate_labels_strict(tmp_path / "manifest.parquet", tmp_path / "labels", CFG, ("neutrophil", "lymphocyte"))
    review = pd.read_csv(tmp_path / "labels" / "review.csv")
    row = review[review["reason"] == "empty_class_folder"]
    assert len(row) == 1 and "lymphocyte/ holds no file" in row["detail"].iloc[0]
