"""Split stage: assign every crop to train / val / test.

A split fixed by the data source (BCCD ImageSets lists, MedMNIST train/val/test, a split
column in a labels CSV) is kept as given (split.use_source_split); images it leaves open
are placed by the balancing below.

Stratified by label so every split sees the class mix of the whole, and grouped so that
crops of one smear field (source_sha256), exact duplicate files and near-duplicate images
(validate_labels' group_id in clean.parquet, joined on source_id) never sit on both sides
of the train/test line: that would leak and inflate the test score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from hemaflow.config import ConfigError, SplitParams
from hemaflow.errors import StageInputError, read_table, require_file
from hemaflow.schema import CROP_COLUMNS

SPLITS = ("train", "val", "test")
MIN_GROUPS_FOR_HOLDOUT = 3  # a class with this many source images gets one in val and one in test


@dataclass(frozen=True)
class SplitResult:
    split_path: Path
    counts: dict[str, dict[str, int]]   # split -> label -> crops
    sources: dict[str, int]             # split -> source images
    class_gap: dict[str, float]         # split -> max over classes |share in split - share overall|
    groups: dict[str, int] | None = None  # split -> leakage groups (sources joined by near-duplicate group)
    source_split_groups: int = 0          # groups whose split the data source fixed

    @property
    def n_crops(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def summary(self) -> dict:
        """Plain-JSON record for metrics files and Prefect artifacts."""
        total = self.n_crops
        return {
            "n_crops": total,
            "n_sources": sum(self.sources.values()),
            "n_groups": sum((self.groups or self.sources).values()),
            "groups with the source's split": self.source_split_groups,
            "splits": {
                s: {
                    "crops": sum(self.counts[s].values()),
                    "fraction": round(sum(self.counts[s].values()) / total, 4) if total else 0.0,
                    "sources": self.sources[s],
                    "max_class_share_gap": round(self.class_gap[s], 4),
                }
                for s in SPLITS
            },
            "counts": self.counts,
        }


def split_crops(crops_path: Path, split_path: Path, cfg: SplitParams, seed: int,
                clean_path: Path | None = None) -> SplitResult:
    """Read the crops table, add a `split` column, write it to split_path.

    With clean_path, crops are joined to clean.parquet by source_id and near-duplicate
    groups (group_id) are kept together too; without it, grouping is by source_sha256 only.
    """
    crops = read_crops(crops_path)
    fractions = split_fractions(cfg)
    labels = sorted(crops["label"].unique())
    clean = read_clean(clean_path) if clean_path is not None else None
    group_ids = read_group_ids(clean, clean_path, crops, crops_path) if clean is not None else None
    groups, group_of_row = leakage_groups(crops["source_sha256"].to_numpy(dtype=str), group_ids)
    label_idx = pd.Categorical(crops["label"], categories=labels).codes
    group_counts = np.zeros((len(groups), len(labels)), dtype=np.int64)
    np.add.at(group_counts, (group_of_row, label_idx), 1)

    fixed = None
    if cfg.use_source_split and clean is not None:
        fixed = fixed_group_splits(read_source_splits(clean, crops), group_of_row, len(groups))
    group_split = assign_groups(group_counts, fractions, np.random.default_rng(seed), fixed=fixed)
    out = crops.copy()
    out["split"] = np.asarray(SPLITS, dtype=object)[group_split[group_of_row]]
    split_path = Path(split_path)
    split_path.parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(split_path, index=False)
    result = summarize_split(out, split_path, labels)
    per_split = pd.Series(group_split).value_counts()
    n_fixed = int((fixed >= 0).sum()) if fixed is not None else 0
    return SplitResult(result.split_path, result.counts, result.sources, result.class_gap,
                       groups={s: int(per_split.get(k, 0)) for k, s in enumerate(SPLITS)},
                       source_split_groups=n_fixed)


SPLIT_SPELLINGS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                   "dev": "val", "test": "test", "testing": "test"}


def read_source_splits(clean: pd.DataFrame, crops: pd.DataFrame) -> np.ndarray:
    """Per crop: the split its source image was given by the data source (BCCD ImageSets lists,
    MedMNIST train/val/test keys, a labels CSV split column), as an index into SPLITS, or -1."""
    if "split" not in clean.columns:  # an older clean table: nothing is fixed
        return np.full(len(crops), -1)
    norm = clean["split"].map(lambda v: SPLIT_SPELLINGS.get(str(v).strip().lower()) if isinstance(v, str) else None)
    by_id = pd.Series(norm.to_numpy(), index=clean["image_id"].astype(str)).groupby(level=0).first()
    per_crop = crops["source_id"].astype(str).map(by_id)
    return per_crop.map(lambda v: SPLITS.index(v) if isinstance(v, str) else -1).to_numpy(dtype=np.int64)


def fixed_group_splits(row_split: np.ndarray, group_of_row: np.ndarray, n_groups: int) -> np.ndarray:
    """Per leakage group: the source's split, or -1 where the source fixed none.

    A group whose rows the source put on both sides (the same image listed in train and test,
    or near-duplicates across the published split) goes to the most held-out of them (test
    over val over train), so it can never leak into training.
    """
    fixed = np.full(n_groups, -1, dtype=np.int64)
    np.maximum.at(fixed, group_of_row, row_split)
    return fixed


def read_clean(clean_path: Path) -> pd.DataFrame:
    """image_id, group_id (and the source's split, where the table has it) of clean.parquet, read once."""
    import pyarrow.parquet as pq

    require_file(clean_path, "clean label table")
    try:
        optional = ["split"] if "split" in pq.read_schema(clean_path).names else []  # older tables lack it
        return pd.read_parquet(clean_path, columns=["image_id", "group_id", *optional])
    except Exception as exc:  # a missing column or a corrupt file
        raise StageInputError(clean_path, f"cannot read image_id, group_id: {exc}") from exc


def read_group_ids(clean: pd.DataFrame, clean_path: Path, crops: pd.DataFrame, crops_path: Path) -> np.ndarray:
    """group_id of each crop's source image, from clean.parquet (joined on source_id = image_id)."""
    groups = crops["source_id"].astype(str).map(clean.drop_duplicates("image_id").set_index("image_id")["group_id"])
    missing = groups.isna()
    if missing.any():
        ids = ", ".join(map(str, crops.loc[missing, "source_id"].drop_duplicates().head(5)))
        raise StageInputError(crops_path, f"{int(missing.sum())} crop(s) have a source_id not in {clean_path} "
                                          f"(e.g. {ids}); re-run segment after validate_labels")
    return groups.to_numpy(dtype=str)


def leakage_groups(source_sha: np.ndarray, group_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(group keys, group index per row): rows sharing a source hash or a group_id, transitively.

    Each group is keyed by its smallest source hash, so indices do not depend on row order.
    """
    if group_ids is None:
        return np.unique(source_sha, return_inverse=True)
    sha_keys, sha_code = np.unique(source_sha, return_inverse=True)
    _, grp_code = np.unique(group_ids, return_inverse=True)
    n_sha = len(sha_keys)
    n_nodes = n_sha + int(grp_code.max()) + 1
    graph = coo_matrix((np.ones(len(sha_code)), (sha_code, n_sha + grp_code)), shape=(n_nodes, n_nodes))
    comp = connected_components(graph, directed=False)[1]
    key_of_comp = pd.Series(sha_keys).groupby(comp[:n_sha]).min()   # sha_keys sorted: min = first
    return np.unique(key_of_comp.loc[comp[sha_code]].to_numpy(dtype=str), return_inverse=True)


def read_crops(crops_path: Path) -> pd.DataFrame:
    """Load and check the crops table; every problem names the file."""
    crops = read_table(crops_path, "crops table", CROP_COLUMNS)
    if crops.empty:
        raise StageInputError(crops_path, "crops table has no rows; nothing to split")
    for col in ("label", "source_sha256"):
        n_null = int(crops[col].isna().sum())
        if n_null:
            ids = ", ".join(map(str, crops.loc[crops[col].isna(), "crop_id"].head(5)))
            raise StageInputError(crops_path, f"{n_null} crop(s) have no {col} (e.g. {ids})")
    return crops


def split_fractions(cfg: SplitParams) -> np.ndarray:
    """(train, val, test) shares of the data, in SPLITS order."""
    train = 1.0 - cfg.val_size - cfg.test_size
    if train <= 0:
        raise ConfigError(
            f"split: val_size {cfg.val_size} + test_size {cfg.test_size} leave nothing for train"
        )
    return np.array([train, cfg.val_size, cfg.test_size])


def assign_groups(group_counts: np.ndarray, fractions: np.ndarray, rng: np.random.Generator,
                  fixed: np.ndarray | None = None) -> np.ndarray:
    """Give each group (row of per-class crop counts) a split index; deterministic for rng's seed.

    First every class with >= 3 groups gets its smallest group into val and into test, so
    no held-out split misses a rare class. Then a greedy pass, largest groups first (they are
    the hardest to fit), puts each group where it most reduces the squared gap between the
    per-class counts and their targets (fraction x class total, relative to the class total).
    Split sizes follow from the per-class targets. Measured against a two-stage
    StratifiedGroupKFold it matches or beats its class balance, honours any fraction (not only
    1/k) and never leaves a class with >= 3 source images out of val or test.
    """
    n_groups, n_classes = group_counts.shape
    class_totals = group_counts.sum(axis=0).astype(float)
    target = fractions[:, None] * class_totals[None, :]
    assigned = np.zeros((len(fractions), n_classes))
    split_of = np.full(n_groups, -1)
    shuffle_rank = np.empty(n_groups, dtype=np.int64)
    shuffle_rank[rng.permutation(n_groups)] = np.arange(n_groups)
    sizes = group_counts.sum(axis=1)

    def place(g: int, s: int) -> None:
        split_of[g] = s
        assigned[s] += group_counts[g]

    if fixed is not None:  # the source's own split comes first; the rest is balanced around it
        for g in np.flatnonzero(fixed >= 0):
            place(int(g), int(fixed[g]))

    groups_per_class = (group_counts > 0).sum(axis=0)
    for k in np.argsort(groups_per_class, kind="stable"):
        if groups_per_class[k] < MIN_GROUPS_FOR_HOLDOUT:
            continue
        for s in (SPLITS.index("val"), SPLITS.index("test")):
            if assigned[s, k] > 0:
                continue
            free = np.flatnonzero((split_of < 0) & (group_counts[:, k] > 0))
            if free.size:
                place(int(free[np.lexsort((shuffle_rank[free], sizes[free]))[0]]), s)

    # rarest class present in each group: how few groups carry it
    present = np.where(group_counts > 0, groups_per_class[None, :], np.iinfo(np.int64).max)
    rarity = present.min(axis=1)
    todo = np.flatnonzero(split_of < 0)
    todo = todo[np.lexsort((shuffle_rank[todo], rarity[todo], -sizes[todo]))]
    weight = 1.0 / np.maximum(class_totals, 1.0) ** 2
    for g in todo:
        c = group_counts[g]
        gap = assigned - target                       # splits x classes
        class_cost = ((c * c + 2 * c * gap) * weight).sum(axis=1)
        place(int(g), int(np.argmin(class_cost)))
    return split_of


def summarize_split(df: pd.DataFrame, split_path: Path, labels: list[str]) -> SplitResult:
    """Counts per split x class, source images per split, and how far class shares drift."""
    table = pd.crosstab(df["split"], df["label"]).reindex(index=list(SPLITS), columns=labels, fill_value=0)
    overall = table.sum(axis=0) / max(int(table.to_numpy().sum()), 1)
    gaps: dict[str, float] = {}
    for s in SPLITS:
        n = int(table.loc[s].sum())
        gaps[s] = float((table.loc[s] / n - overall).abs().max()) if n else 1.0
    sources = df.groupby("split")["source_sha256"].nunique().reindex(list(SPLITS), fill_value=0)
    return SplitResult(
        split_path=split_path,
        counts={s: {lab: int(table.loc[s, lab]) for lab in labels} for s in SPLITS},
        sources={s: int(sources[s]) for s in SPLITS},
        class_gap=gaps,
    )
