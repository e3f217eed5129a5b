"""Split stage: grouped by source image, stratified by label, deterministic, rare classes held out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hemaflow.config import SplitParams
from hemaflow.errors import StageInputError
from hemaflow.schema import CROP_COLUMNS
from hemaflow.tasks.split import SPLITS, split_crops

SHARES = {"neutrophil": 0.5, "lymphocyte": 0.25, "monocyte": 0.12, "eosinophil": 0.1, "basophil": 0.03}


def make_crops(n_fields: int, seed: int = 0, rare: dict[str, int] | None = None) -> pd.DataFrame:
    """Smear fields with 1-6 cells of mixed classes; `rare` adds single-cell fields of a class."""
    rng = np.random.default_rng(seed)
    labels, shares = list(SHARES), np.array(list(SHARES.values()))
    rows = []

    def add_field(f: int, field_labels: list[str]) -> None:
        for i, label in enumerate(field_labels):
            rows.append({
                "crop_id": f"F{f:04d}_{i}", "path": f"crops/F{f:04d}_{i}.png",
                "source_id": f"F{f:04d}", "source_sha256": f"sha{f:04d}",
                "source_path": f"fields/F{f:04d}.jpg", "label": label,
                "x0": 0, "y0": 0, "x1": 10, "y1": 10, "mask_area": 50,
            })

    for f in range(n_fields):
        add_field(f, list(rng.choice(labels, size=int(rng.integers(1, 7)), p=shares)))
    for label, n in (rare or {}).items():
        for _ in range(n):
            add_field(len({r["source_id"] for r in rows}) + 10_000, [label])
    return pd.DataFrame(rows, columns=list(CROP_COLUMNS))


def write(df: pd.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "crops.parquet"
    df.to_parquet(path, index=False)
    return path


def test_split_keeps_rows_and_sources_together(tmp_path: Path) -> None:
    crops = make_crops(200)
    # the same file ingested twice under two ids: same hash, must land in one split
    dup = crops[crops["source_id"] == "F0007"].assign(
        source_id="F9999", crop_id=lambda d: d["crop_id"] + "_dup", source_path="other/F9999.jpg")
    crops = pd.concat([crops, dup], ignore_index=True)
    out_path = tmp_path / "out" / "split.parquet"
    result = split_crops(write(crops, tmp_path), out_path, SplitParams(), seed=1)

    out = pd.read_parquet(out_path)
    assert list(out.columns) == [*CROP_COLUMNS, "split"]
    assert out["crop_id"].tolist() == crops["crop_id"].tolist()
    assert set(out["split"]) == set(SPLITS)
    assert (out.groupby("source_sha256")["split"].nunique() == 1).all()
    assert out.loc[out["source_sha256"] == "sha0007", "split"].nunique() == 1
    assert result.counts == {
        s: {lab: int(((out["split"] == s) & (out["label"] == lab)).sum()) for lab in sorted(SHARES)}
        for s in SPLITS
    }
    assert result.sources == out.groupby("split")["source_sha256"].nunique().to_dict()


def test_split_is_stratified_and_sized(tmp_path: Path) -> None:
    crops = make_crops(400, seed=3)
    out_path = tmp_path / "split.parquet"
    result = split_crops(write(crops, tmp_path), out_path, SplitParams(test_size=0.15, val_size=0.25), seed=7)
    out = pd.read_parquet(out_path)
    fractions = out["split"].value_counts(normalize=True)
    assert fractions["train"] == pytest.approx(0.60, abs=0.01)
    assert fractions["val"] == pytest.approx(0.25, abs=0.01)
    assert fractions["test"] == pytest.approx(0.15, abs=0.01)
    overall = out["label"].value_counts(normalize=True)
    for s in SPLITS:
        share = out.loc[out["split"] == s, "label"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        assert (share - overall).abs().max() < 0.02, s
        assert result.class_gap[s] == pytest.approx((share - overall).abs().max())
    summary = result.summary()
    assert summary["n_crops"] == len(crops)
    assert summary["splits"]["val"]["fraction"] == pytest.approx(fractions["val"], abs=1e-4)


def test_split_is_deterministic_per_seed_and_ignores_row_order(tmp_path: Path) -> None:
    crops = make_crops(150, seed=5)
    cfg = SplitParams()

    def run(df: pd.DataFrame, seed: int, name: str) -> pd.Series:
        (tmp_path / name).mkdir()
        out = tmp_path / name / "split.parquet"
        split_crops(write(df, tmp_path / name), out, cfg, seed)
        return pd.read_parquet(out).set_index("crop_id")["split"].sort_index()

    first = run(crops, 42, "a")
    pd.testing.assert_series_equal(first, run(crops, 42, "b"))
    pd.testing.assert_series_equal(first, run(crops.sample(frac=1, random_state=0), 42, "c"))
    assert not first.equals(run(crops, 43, "d"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rare_class_gets_a_source_in_val_and_test(tmp_path: Path, seed: int) -> None:
    crops = make_crops(120, seed=seed)
    crops = crops[crops["label"] != "basophil"]
    crops = pd.concat([crops, make_crops(0, rare={"basophil": 3})], ignore_index=True)
    out_path = tmp_path / "split.parquet"
    result = split_crops(write(crops, tmp_path), out_path, SplitParams(), seed=seed)
    assert {s: result.counts[s]["basophil"] for s in SPLITS} == {"train": 1, "val": 1, "test": 1}


def test_missing_crops_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "crops.parquet"
    with pytest.raises(StageInputError, match=r"nope/crops\.parquet.*not found"):
        split_crops(missing, tmp_path / "split.parquet", SplitParams(), seed=0)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write(make_crops(10).drop(columns=["source_sha256"]), tmp_path)
    with pytest.raises(StageInputError, match=r"crops\.parquet: missing column\(s\) source_sha256"):
        split_crops(path, tmp_path / "split.parquet", SplitParams(), seed=0)


def test_crop_without_source_hash_is_refused(tmp_path: Path) -> None:
    crops = make_crops(10)
    crops.loc[2, "source_sha256"] = None
    with pytest.raises(StageInputError, match=r"crops\.parquet: 1 crop\(s\) have no source_sha256"):
        split_crops(write(crops, tmp_path), tmp_path / "split.parquet", SplitParams(), seed=0)


def test_fractions_leaving_no_train_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing for train"):
        split_crops(write(make_crops(10), tmp_path), tmp_path / "split.parquet",
                    SplitParams(test_size=0.5, val_size=0.5), seed=0)


# ---------------------------------------------------------------- near-duplicate groups from clean.parquet

def write_clean(crops: pd.DataFrame, tmp_path: Path, groups: dict[str, str] | None = None) -> Path:
    """clean.parquet naming every source of the crops; `groups` maps source_id -> group_id (default: itself)."""
    ids = crops["source_id"].drop_duplicates()
    clean = pd.DataFrame({"image_id": ids, "label": "x", "group_id": [(groups or {}).get(i, i) for i in ids]})
    path = tmp_path / "clean.parquet"
    clean.to_parquet(path, index=False)
    return path


def near_dup_groups(crops: pd.DataFrame, n_groups: int, size: int, seed: int) -> dict[str, str]:
    """Tie `n_groups` random sets of `size` sources together, as validate_labels would for near-duplicates."""
    ids = crops["source_id"].drop_duplicates().sample(n_groups * size, random_state=seed).tolist()
    return {i: ids[(k // size) * size] for k, i in enumerate(ids)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_duplicate_groups_stay_in_one_split(tmp_path: Path, seed: int) -> None:
    crops = make_crops(300, seed=seed)
    groups = near_dup_groups(crops, n_groups=25, size=4, seed=seed)
    out_path = tmp_path / "split.parquet"
    result = split_crops(write(crops, tmp_path), out_path, SplitParams(), seed=seed,
                         clean_path=write_clean(crops, tmp_path, groups))
    out = pd.read_parquet(out_path)
    out["group_id"] = out["source_id"].map(lambda s: groups.get(s, s))
    assert (out.groupby("group_id")["split"].nunique() == 1).all()
    assert result.summary()["n_groups"] == out["group_id"].nunique() == 300 - 25 * 3
    # without the clean table the same groups would be cut across splits: the test can tell
    plain = split_crops(write(crops, tmp_path), tmp_path / "plain.parquet", SplitParams(), seed=seed)
    cut = pd.read_parquet(plain.split_path).assign(group_id=lambda d: d["source_id"].map(lambda s: groups.get(s, s)))
    assert (cut.groupby("group_id")["split"].nunique() > 1).any()


def test_group_and_hash_links_are_transitive_and_deterministic(tmp_path: Path) -> None:
    crops = make_crops(150, seed=4)
    # F0001 and F0002 are near-duplicates; F0002 also shares its bytes with F0003 (copied file)
    crops.loc[crops["source_id"] == "F0003", "source_sha256"] = "sha0002"
    groups = {"F0002": "F0001", "F0001": "F0001"}
    clean_path = write_clean(crops, tmp_path, groups)

    def run(df: pd.DataFrame, name: str) -> pd.Series:
        (tmp_path / name).mkdir()
        out = tmp_path / name / "split.parquet"
        split_crops(write(df, tmp_path / name), out, SplitParams(), 42, clean_path=clean_path)
        return pd.read_parquet(out).set_index("crop_id")["split"].sort_index()

    first = run(crops, "a")
    linked = first[crops.set_index("crop_id").loc[first.index, "source_id"].isin(["F0001", "F0002", "F0003"])]
    assert linked.nunique() == 1
    pd.testing.assert_series_equal(first, run(crops.sample(frac=1, random_state=1), "b"))


def test_crop_whose_source_is_not_in_clean_is_refused(tmp_path: Path) -> None:
    crops = make_crops(20)
    clean_path = write_clean(crops[crops["source_id"] != "F0003"], tmp_path)
    with pytest.raises(StageInputError, match=r"crops\.parquet: \d+ crop\(s\) have a source_id not in .*clean\.parquet \(e\.g\. F0003\)"):
        split_crops(write(crops, tmp_path), tmp_path / "split.parquet", SplitParams(), seed=0, clean_path=clean_path)


def test_clean_table_without_group_id_is_refused(tmp_path: Path) -> None:
    crops = make_crops(20)
    clean_path = tmp_path / "clean.parquet"
    pd.DataFrame({"image_id": crops["source_id"].unique()}).to_parquet(clean_path)
    with pytest.raises(StageInputError, match=r"clean\.parquet: cannot read image_id, group_id"):
        split_crops(write(crops, tmp_path), tmp_path / "split.parquet", SplitParams(), seed=0, clean_path=clean_path)
    with pytest.raises(StageInputError, match=r"nope\.parquet: clean label table not found"):
        split_crops(write(crops, tmp_path), tmp_path / "split.parquet", SplitParams(), seed=0,
                    clean_path=tmp_path / "nope.parquet")
