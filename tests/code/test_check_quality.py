"""Data-quality gate: Great Expectations suites pass a sound table and name what is wrong otherwise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from hemaflow.config import CheckQualityParams
from hemaflow.errors import StageInputError
from hemaflow.schema import DATASET_COLUMNS
from hemaflow.tasks.check_quality import QualityGateError, check_quality

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
ORIGINALS = {"train": [30, 20, 10, 8, 6], "val": [9, 7, 4, 3, 3], "test": [9, 7, 4, 3, 3]}
CFG = CheckQualityParams()


def make_dataset(originals: dict[str, list[int]] = ORIGINALS, train_target: int = 30) -> pd.DataFrame:
    """Original crops per split x class (one source image each), train topped up by augmentation."""
    rows = []
    for split, counts in originals.items():
        for label, n in zip(CLASSES, counts):
            for _ in range(n):
                k = len(rows)
                rows.append({"path": f"crops/c{k}.png", "label": label, "split": split, "source_id": f"S{k}",
                             "source_sha256": f"{k:064x}", "crop_id": f"c{k}", "augmented": False})
    for label in CLASSES:
        sources = [r for r in rows if r["split"] == "train" and r["label"] == label]
        for i in range(train_target - len(sources)):
            k = len(rows)
            rows.append({**sources[i % len(sources)], "path": f"aug/a{k}.png", "crop_id": f"a{k}", "augmented": True})
    return pd.DataFrame(rows, columns=list(DATASET_COLUMNS))


def run(df: pd.DataFrame, tmp_path: Path, cfg: CheckQualityParams = CFG):
    path = tmp_path / "dataset.parquet"
    df.to_parquet(path, index=False)
    return check_quality(path, tmp_path / "quality", cfg, CLASSES)


def gate_error(df: pd.DataFrame, tmp_path: Path, cfg: CheckQualityParams = CFG) -> str:
    with pytest.raises(QualityGateError, match=re.escape(str(tmp_path / "dataset.parquet"))) as info:
        run(df, tmp_path, cfg)
    return str(info.value)


def strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_sound_dataset_passes_and_writes_outputs(tmp_path: Path) -> None:
    result = run(make_dataset(), tmp_path)
    assert result.success and result.failures == []
    assert result.counts["train"] == dict.fromkeys(CLASSES, 30)
    assert result.originals["val"] == dict(zip(CLASSES, ORIGINALS["val"]))
    assert all(c.passed for c in result.checks)
    suites = {c.suite for c in result.checks}
    assert suites == {"schema", "completeness", "taxonomy", "class_minimum", "class_imbalance",
                      "class_distribution", "leakage", "held_out_originals"}
    saved = strict_json(tmp_path / "quality" / "result.json")
    assert saved["summary"] == result.summary()
    assert saved["summary"]["n_rows"] == 150 + 2 * 26
    assert all(v["success"] for v in saved["validation_results"].values())
    report = (tmp_path / "quality" / "report.md").read_text()
    assert report == result.markdown
    assert report.startswith("# Data-quality gate: PASSED")
    assert "| val | 9 (9) | 7 (7) | 4 (4) | 3 (3) | 3 (3) | 26 (26) |" in report


def test_class_missing_or_short_in_a_split_is_named(tmp_path: Path) -> None:
    originals = {**ORIGINALS, "val": [9, 7, 4, 2, 0]}
    message = gate_error(make_dataset(originals), tmp_path, CFG.model_copy(update={"imbalance_splits": ("train",)}))
    assert "val: basophil is missing (0 < 3, min_per_class)" in message
    assert "val: eosinophil has 2 < 3 (min_per_class, original images)" in message
    assert "test:" not in message and "train:" not in message


def test_failure_still_writes_result_and_report(tmp_path: Path) -> None:
    originals = {**ORIGINALS, "train": [30, 20, 10, 8, 2]}
    with pytest.raises(QualityGateError) as info:
        run(make_dataset(originals), tmp_path)
    message = str(info.value)
    assert info.value.result is not None and not info.value.result.success
    assert info.value.result.markdown == (tmp_path / "quality" / "report.md").read_text()
    assert "train: basophil has 2 < 3 (min_per_class, original images, 30 rows with augmentation)" in message
    saved = strict_json(tmp_path / "quality" / "result.json")
    assert saved["summary"]["success"] is False
    assert saved["summary"]["failures"] == [line[4:] for line in message.splitlines()[1:]]
    assert saved["validation_results"]["class_minimum"]["success"] is False
    report = (tmp_path / "quality" / "report.md").read_text()
    assert report.startswith("# Data-quality gate: FAILED")
    assert "| class_minimum | expect_column_values_to_be_between | originals | train | **NO** |" in report


def test_too_imbalanced_split_names_both_classes_and_ratio(tmp_path: Path) -> None:
    df = make_dataset(train_target=30)
    df = df[~(df["augmented"] & (df["label"] == "basophil"))]  # basophil left at its 6 originals
    message = gate_error(df, tmp_path)
    assert "train: imbalance 5.00 > 3 (neutrophil 30 / basophil 6)" in message


def test_imbalance_can_be_limited_to_train(tmp_path: Path) -> None:
    skewed = {**ORIGINALS, "val": [12, 7, 4, 3, 3]}  # 12 / 3 = 4 > 3
    (tmp_path / "strict").mkdir()
    assert "val: imbalance 4.00 > 3 (neutrophil 12 / basophil 3)" in gate_error(make_dataset(skewed), tmp_path / "strict")
    assert run(make_dataset(skewed), tmp_path, CFG.model_copy(update={"imbalance_splits": ("train",)})).success


def test_split_distribution_far_from_whole_reports_kl_and_classes(tmp_path: Path) -> None:
    originals = {**ORIGINALS, "test": [3, 3, 3, 9, 9]}
    message = gate_error(make_dataset(originals), tmp_path)
    whole = pd.DataFrame(originals, index=CLASSES).sum(axis=1)
    expected_kl = stats.entropy(pd.Series(originals["test"], index=CLASSES), whole)
    assert expected_kl > 0.25
    assert f"test: label distribution KL {expected_kl:.3f} > 0.25 vs all originals (" in message
    share = whole / whole.sum()
    assert f"basophil {9 / 27:.1%} vs {share['basophil']:.1%}" in message
    assert f"neutrophil {3 / 27:.1%} vs {share['neutrophil']:.1%}" in message
    assert "train: label distribution" not in message


def test_leakage_names_the_source_and_its_splits(tmp_path: Path) -> None:
    df = make_dataset()
    src = df[(df["split"] == "train") & ~df["augmented"]].iloc[0]
    leaked_original = {**src.to_dict(), "split": "val", "crop_id": "leak1", "path": "crops/leak1.png"}
    aug = df[df["augmented"]].iloc[0]
    leaked_aug = {**aug.to_dict(), "split": "test", "crop_id": "leak2", "path": "aug/leak2.png"}
    df = pd.concat([df, pd.DataFrame([leaked_original, leaked_aug])], ignore_index=True)
    message = gate_error(df, tmp_path)
    assert re.search(r"leakage: 2 source image\(s\) in more than one split \(by source_sha256\): "
                     rf"0+\.\. = {src['source_id']} \(train\+val\), 0+\w*\.\. = {aug['source_id']} \(test\+train\)", message)
    assert f"(by source_id): {src['source_id']} (train+val)" in message
    assert "leakage: 1 augmented row(s) in val/test, which must hold originals only: leak2" in message


def test_unknown_label_and_split_are_named(tmp_path: Path) -> None:
    df = make_dataset()
    df.loc[[0, 1], "label"] = "platelet"
    df.loc[5, "split"] = "holdout"
    message = gate_error(df, tmp_path, CFG.model_copy(update={"min_per_class": 0}))
    assert "label: 2 row(s) outside the taxonomy (neutrophil, lymphocyte, monocyte, eosinophil, basophil): 'platelet' x2" in message
    assert "split: 1 row(s) not a known split (train, val, test): 'holdout' x1" in message


def test_nulls_are_named_by_row_and_crop(tmp_path: Path) -> None:
    df = make_dataset()
    df.loc[4, "source_sha256"] = None
    df.loc[[7, 8], "path"] = None
    message = gate_error(df, tmp_path)
    assert "null: 1 row(s) have no source_sha256: row 4 (c4)" in message
    assert "null: 2 row(s) have no path: row 7 (c7), row 8 (c8)" in message


def test_wrong_column_type_is_named(tmp_path: Path) -> None:
    df = make_dataset()
    df["augmented"] = df["augmented"].map({True: "yes", False: "no"})
    message = gate_error(df, tmp_path)
    assert "schema: column augmented has type str, expected bool" in message


def test_missing_dataset_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "augmented" / "dataset.parquet"
    with pytest.raises(StageInputError, match=r"augmented/dataset\.parquet: dataset table not found"):
        check_quality(missing, tmp_path / "quality", CFG, CLASSES)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "dataset.parquet"
    make_dataset().drop(columns=["augmented"]).to_parquet(path)
    with pytest.raises(StageInputError, match=r"dataset\.parquet: missing column\(s\) augmented"):
        check_quality(path, tmp_path / "quality", CFG, CLASSES)
    assert not (tmp_path / "quality").exists()


# ---------------------------------------------------------------- the clean table and near-duplicate groups

CLEAN_CFG = CFG.model_copy(update={"clean_min_per_class": 5, "clean_max_imbalance_ratio": 5.0})  # whole mix: 48 / 12


def make_clean(df: pd.DataFrame, groups: dict[str, str] | None = None) -> pd.DataFrame:
    """validate_labels-style clean table: one row per source image of the dataset."""
    src = df.drop_duplicates("source_id")
    n = len(src)
    return pd.DataFrame({
        "image_id": src["source_id"].to_numpy(), "path": [f"images/{s}.jpg" for s in src["source_id"]],
        "sha256": src["source_sha256"].to_numpy(), "phash": [f"{k:016x}" for k in range(n)],
        "width": 360, "height": 363, "channels": 3, "source": "class_folders", "label_raw": src["label"].to_numpy(),
        "label_raw_2": None, "boxes": "[]", "split": None, "error": None, "label": src["label"].to_numpy(),
        "group_id": [(groups or {}).get(s, s) for s in src["source_id"]],
    })


def run_with_clean(df: pd.DataFrame, clean: pd.DataFrame, tmp_path: Path, cfg: CheckQualityParams = CLEAN_CFG):
    clean_path = tmp_path / "clean.parquet"
    clean.to_parquet(clean_path, index=False)
    df.to_parquet(tmp_path / "dataset.parquet", index=False)
    return check_quality(tmp_path / "dataset.parquet", tmp_path / "quality", cfg, CLASSES, clean_path=clean_path)


def gate_error_with_clean(df, clean, tmp_path, cfg: CheckQualityParams = CLEAN_CFG) -> QualityGateError:
    with pytest.raises(QualityGateError) as info:
        run_with_clean(df, clean, tmp_path, cfg)
    return info.value


def test_sound_clean_table_passes_and_is_reported(tmp_path: Path) -> None:
    df = make_dataset()
    result = run_with_clean(df, make_clean(df), tmp_path)
    assert result.success
    assert {"clean_schema", "clean_completeness", "clean_taxonomy", "clean_class_minimum", "clean_class_imbalance",
            "lineage"} <= {c.suite for c in result.checks}
    assert any(c.suite == "leakage" and c.scope == "per group_id" and c.passed for c in result.checks)
    assert result.clean_counts == {c: sum(ORIGINALS[s][i] for s in ORIGINALS) for i, c in enumerate(CLASSES)}
    saved = strict_json(tmp_path / "quality" / "result.json")
    assert saved["summary"]["clean_counts"] == result.clean_counts
    assert saved["validation_results"]["clean_class_minimum"]["success"] is True
    assert "| 48 | 34 | 18 | 14 | 12 | 126 |" in result.markdown


def test_clean_class_short_and_imbalance_name_class_and_amount(tmp_path: Path) -> None:
    df = make_dataset()
    clean = make_clean(df)
    basophils = clean.index[clean["label"] == "basophil"]
    clean = clean.drop(basophils[:10])  # 2 basophil images left
    err = gate_error_with_clean(df, clean, tmp_path)
    assert "clean: basophil has 2 < 5 images (3 short, clean_min_per_class)" in err.failures
    assert "clean: imbalance 24.00 > 5 (neutrophil 48 / basophil 2)" in err.failures
    assert str(err.report_path) in str(err)
    report = (tmp_path / "quality" / "report.md").read_text()
    assert report.startswith("# Data-quality gate: FAILED") and "clean: basophil has 2 < 5 images" in report
    saved = strict_json(tmp_path / "quality" / "result.json")
    assert saved["validation_results"]["clean_class_minimum"]["success"] is False
    assert saved["validation_results"]["clean_class_imbalance"]["success"] is False


def test_clean_duplicates_nulls_errors_and_unknown_labels_are_named(tmp_path: Path) -> None:
    df = make_dataset()
    clean = make_clean(df)
    clean.loc[1, "sha256"] = clean.loc[0, "sha256"]
    clean.loc[2, "group_id"] = None
    clean.loc[3, "error"] = "truncated_jpeg: cut short"
    clean.loc[4, "label"] = "platelet"
    failures = gate_error_with_clean(df, clean, tmp_path).failures
    text = "\n".join(failures)
    assert f"clean: 2 row(s) share a sha256 (identical content twice): {clean.loc[0, 'image_id']}" in text
    assert f"clean: null: 1 row(s) have no group_id: row 2 ({clean.loc[2, 'image_id']})" in failures
    assert f"clean: 1 row(s) carry an ingest error: {clean.loc[3, 'image_id']} (truncated_jpeg: cut short)" in failures
    assert "clean: label: 1 row(s) outside the taxonomy" in text and "'platelet' x1" in text


def test_near_duplicate_group_across_splits_is_leakage(tmp_path: Path) -> None:
    df = make_dataset()
    train_src = df[(df["split"] == "train") & ~df["augmented"]].iloc[0]["source_id"]
    test_src = df[(df["split"] == "test") & (df["label"] == "neutrophil")].iloc[0]["source_id"]
    clean = make_clean(df, groups={train_src: train_src, test_src: train_src})
    err = gate_error_with_clean(df, clean, tmp_path)
    assert err.failures == [f"leakage: 1 source image(s) in more than one split (by group_id): group {train_src} (test+train)"]
    # the same dataset passes without the group: the gate caught the group, nothing else
    (tmp_path / "ungrouped").mkdir()
    assert run_with_clean(df, make_clean(df), tmp_path / "ungrouped").success


def test_dataset_row_without_clean_source_is_named(tmp_path: Path) -> None:
    df = make_dataset()
    clean = make_clean(df)
    gone = clean.loc[0, "image_id"]
    err = gate_error_with_clean(df, clean.drop(index=0), tmp_path)
    n_rows = int((df["source_id"] == gone).sum())
    assert f"lineage: {n_rows} row(s) have a source_id not in the clean table: {gone}" in err.failures


def test_clean_thresholds_default_to_the_split_thresholds(tmp_path: Path) -> None:
    df = make_dataset()
    err = gate_error_with_clean(df, make_clean(df), tmp_path, CFG)  # clean_* unset: ratio 48 / 12 vs 3
    assert err.failures == ["clean: imbalance 4.00 > 3 (neutrophil 48 / basophil 12)"]


def test_missing_clean_table_names_it(tmp_path: Path) -> None:
    make_dataset().to_parquet(tmp_path / "dataset.parquet")
    with pytest.raises(StageInputError, match=r"labels/clean\.parquet: clean label table not found"):
        check_quality(tmp_path / "dataset.parquet", tmp_path / "q", CFG, CLASSES, clean_path=tmp_path / "labels" / "clean.parquet")
