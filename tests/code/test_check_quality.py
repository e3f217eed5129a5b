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
from tasks.check_quality import QualityGateError, check_quality

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
