"""Validate labels: manifest -> clean table + review list, one row per problem, with a reason.

Problems found here: ingest's file errors (unreadable, truncated, non-image, size far off,
path outside the data folder, label without image: passed through as "code: detail"),
missing/blank/unknown/multi labels, a file-name subtype that
contradicts the label, a second annotator who disagrees, the same bytes under two labels
(or twice under one), and near-duplicates by perceptual hash. Same-label near-duplicates
stay in the clean table and share a `group_id`, so split keeps them on one side.

A person's decisions (`paths.label_corrections`, hemaflow/label_corrections.py) come first: a
relabelled image takes the reviewer's class (its label problems and any annotator disagreement
are settled by that; file errors still drop it), a dropped one goes to the review list with the
reviewer's note. Both are listed in review.csv; `label_raw` in clean.parquet keeps the original.

Policy (params validate_labels.on_error): `drop` sends bad items to the review list and
goes on; `fail` stops the run with the same list. Raw files are never touched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hemaflow.agreement import measure_agreement, write_agreement
from hemaflow.config import ValidateLabelsParams
from hemaflow.duplicates import group_labels, near_duplicate_pairs, parse_phash
from hemaflow.errors import StageInputError, read_table, require_columns
from hemaflow.label_corrections import Correction, read_corrections, unmatched
from hemaflow.review import ReviewItem, write_review
from hemaflow.schema import CLEAN_COLUMNS, MANIFEST_COLUMNS
from hemaflow.taxonomy import Taxonomy, split_labels

STAGE = "validate_labels"
OPTIONAL_COLUMNS = ("phash", "label_raw_2")   # added by newer ingest; missing means None
# listed for a person, never fails the run: near duplicates are kept; the reviewer's decisions are already made
INFO_REASONS = frozenset({"near_duplicate", "relabelled_by_reviewer", "dropped_by_reviewer"})
NEAR_DUP_COLUMNS = ("image_id_a", "image_id_b", "path_a", "path_b", "label_a", "label_b", "distance")


class LabelValidationError(Exception):
    """on_error=fail and some items did not pass."""


@dataclass
class ValidateResult:
    clean_path: Path
    review_path: Path
    n_clean: int
    problems: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)
    agreement: dict | None = None          # kappa etc.; None without a second annotator
    near_duplicate_pairs: int | None = None  # None: check off or no phash in the manifest
    n_groups: int = 0                      # near-duplicate groups of 2+ clean images
    corrections: dict[str, int] | None = None  # relabel/drop/keep/undecided counts; None without a file
    seconds: float = 0.0

    def summary(self) -> dict:
        out = {"clean images": self.n_clean, "review items": sum(self.problems.values()),
               **{f"review: {k}": v for k, v in sorted(self.problems.items())},
               **{f"class: {k}": v for k, v in self.class_counts.items()},
               "near-duplicate pairs": "not checked" if self.near_duplicate_pairs is None else self.near_duplicate_pairs,
               "near-duplicate groups": self.n_groups}
        if self.corrections is not None:
            out["label corrections"] = ", ".join(f"{k} {v}" for k, v in self.corrections.items())
        if self.agreement is not None:
            out["cohen kappa"] = self.agreement["cohen_kappa"]
            out["annotator agreement"] = f"{self.agreement['n_agree']}/{self.agreement['n_compared']}"
        out["seconds"] = round(self.seconds, 2)
        return out


def _text(value) -> str:
    """Cell as text; '' for None/NaN (pandas 3 stores missing strings as NaN)."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def label_problems(label_raw, taxonomy: Taxonomy) -> tuple[str | None, list[tuple[str, str]]]:
    """(canonical label, [(reason, detail)]) for one label cell."""
    if label_raw is None or (isinstance(label_raw, float) and pd.isna(label_raw)):
        return None, [("image_without_label", "the image has no row in the labels file")]
    raw = str(label_raw)
    parts = split_labels(raw)
    if not parts:
        return None, [("blank_label", "the label cell is empty")]
    canon = [taxonomy.canonical(p) for p in parts]
    unknown = [p for p, c in zip(parts, canon) if c is None]
    if unknown:
        return None, [("unknown_class", f"'{', '.join(unknown)}' is not in the taxonomy {list(taxonomy.classes)}")]
    if len(set(canon)) > 1:
        return None, [("multi_label", f"several classes in one label: '{raw}'")]
    return canon[0], []


def row_problems(row: dict, taxonomy: Taxonomy, cfg: ValidateLabelsParams) -> tuple[str | None, list[tuple[str, str]]]:
    """(canonical label or None, every problem of one manifest row as (reason, detail))."""
    problems: list[tuple[str, str]] = []
    error = _text(row["error"])
    if error:
        code, sep, detail = error.partition(": ")
        problems.append((code, detail if sep else error))
    label, label_issues = label_problems(row["label_raw"], taxonomy)
    problems += label_issues
    path = _text(row["path"])
    if label is not None and cfg.check_file_prefix and path:
        named = taxonomy.subtype_class(path)
        if named is not None and named != label:
            problems.append(("label_mismatch", f"the file name prefix says {named}, the label '{row['label_raw']}' says {label}"))
    return (label if not problems else None), problems


def apply_correction(row: dict, corr: Correction,
                     problems: list[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(label, problems) of one row after a person's relabel or drop decision."""
    original = f"label '{_text(row['label_raw'])}'" if _text(row["label_raw"]) else "no label"
    note = f": {corr.note}" if corr.note else ""
    where = f" (label corrections line {corr.line})"
    if corr.action == "drop":
        return None, [("dropped_by_reviewer", f"{original}; dropped by a reviewer{note}{where}")]
    if _text(row["error"]):  # the reviewer's class cannot make an unreadable file usable (row_problems lists it first)
        return None, problems[:1]
    return corr.label, [("relabelled_by_reviewer", f"{original} -> {corr.label} by a reviewer{note}{where}")]


def read_manifest(manifest_path: Path) -> pd.DataFrame:
    manifest = read_table(manifest_path, "manifest")
    for col in OPTIONAL_COLUMNS:
        if col not in manifest.columns:
            manifest[col] = None
    require_columns(manifest, MANIFEST_COLUMNS, manifest_path)
    return manifest.reset_index(drop=True)


def validate_labels(manifest_path: Path, labels_dir: Path, cfg: ValidateLabelsParams,
                    classes: tuple[str, ...], require_every_class: bool = True,
                    corrections_path: Path | None = None) -> ValidateResult:
    """Classify every manifest row, resolve duplicates, write clean.parquet, review.csv and the agreement files.

    corrections_path: a person's relabel/drop decisions (hemaflow/label_corrections.py); a bad row or
    one naming an image the manifest does not hold fails the stage before anything is written.

    A configured class left with no image (or no image at all) fails the stage after the
    files are written: training on it would be silently wrong (require_every_class=False
    only for tests of the review logic on tiny fixtures).
    """
    started = time.perf_counter()
    manifest = read_manifest(manifest_path)
    has_phash = manifest["phash"].notna().any()
    try:
        taxonomy = Taxonomy.build(classes, cfg.synonyms)
    except ValueError as exc:
        raise StageInputError("params.yaml", str(exc)) from exc
    corrections = read_corrections(corrections_path, taxonomy) if corrections_path is not None else None
    if corrections:
        stale = unmatched(corrections, {_text(p) for p in manifest["path"]})
        if stale:
            shown = ", ".join(f"line {c.line} ({c.path})" for c in stale[:10])
            raise StageInputError(corrections_path, f"{len(stale)} label correction(s) name images that are not in "
                                                    f"the manifest {manifest_path}: {shown}; fix the path "
                                                    "(relative to paths.raw_dir, as review.csv writes it) or remove the row")

    review: list[ReviewItem] = []
    settled: set[str] = set()  # image ids relabelled by a person: their class is not up for disagreement
    labels: list[str | None] = []
    first_labels: list[str | None] = []  # the first annotator's class, whatever else is wrong
    for row in manifest.to_dict("records"):
        label, problems = row_problems(row, taxonomy, cfg)
        corr = corrections.get(_text(row["path"])) if corrections else None
        if corr is not None and corr.action in ("relabel", "drop"):
            label, problems = apply_correction(row, corr, problems)
            if label is not None:
                settled.add(row["image_id"])
        labels.append(label)
        first_labels.append(label_problems(row["label_raw"], taxonomy)[0])
        for reason, detail in problems:
            review.append(ReviewItem(STAGE, str(row["image_id"]), _text(row["path"]), reason, detail))
    df = manifest.assign(label=labels)

    agreement = None
    labels_dir.mkdir(parents=True, exist_ok=True)
    if manifest["label_raw_2"].notna().any():
        agreement = measure_agreement(manifest.assign(label=first_labels), taxonomy)
        write_agreement(agreement, labels_dir)
        if cfg.on_disagreement == "review":
            still_ok = set(df.loc[df["label"].notna(), "image_id"])  # dropped already: its row is enough
            disputed = agreement.disagreements[~agreement.disagreements["image_id"].isin(settled)]
            for r in disputed.itertuples(index=False):
                if r.image_id in still_ok:
                    review.append(ReviewItem(STAGE, str(r.image_id), _text(r.path), "annotator_disagreement",
                                             f"annotator 1 says {r.label} ('{r.label_raw}'), annotator 2 says "
                                             f"'{r.label_raw_2}'"))
            df.loc[df["image_id"].isin(set(disputed["image_id"])), "label"] = None
    else:  # no second annotator: leave no agreement files from an earlier run behind
        for stale in ("agreement.json", "disagreements.csv"):
            (labels_dir / stale).unlink(missing_ok=True)
    ok = df[df["label"].notna()].sort_values("path", kind="stable")
    ok = drop_exact_duplicates(ok, review)

    n_pairs = None
    pairs_table = pd.DataFrame(columns=list(NEAR_DUP_COLUMNS))
    ok = ok.assign(group_id=ok["image_id"].astype(str))
    if cfg.near_duplicate_distance is not None and has_phash:
        ok, pairs_table = group_near_duplicates(ok, cfg.near_duplicate_distance, review)
        n_pairs = len(pairs_table)
    clean = ok[list(CLEAN_COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)

    clean_path, review_path = labels_dir / "clean.parquet", labels_dir / "review.csv"
    review_df = write_review(review, review_path)
    clean.to_parquet(clean_path, index=False)
    pairs_table.to_csv(labels_dir / "near_duplicates.csv", index=False)
    problems = {k: int(v) for k, v in review_df["reason"].value_counts().items()}
    group_sizes = clean["group_id"].value_counts()
    result = ValidateResult(clean_path, review_path, len(clean), problems,
                            {c: int((clean["label"] == c).sum()) for c in classes},
                            agreement=agreement.summary() if agreement else None,
                            near_duplicate_pairs=n_pairs, n_groups=int((group_sizes > 1).sum()),
                            corrections=None if corrections is None else {
                                a or "undecided": sum(c.action == a for c in corrections.values())
                                for a in ("relabel", "drop", "keep", "")},
                            seconds=time.perf_counter() - started)
    (labels_dir / "summary.json").write_text(json.dumps(
        {k: v for k, v in result.summary().items() if k != "seconds"}, indent=2) + "\n")
    empty = [c for c in classes if result.class_counts.get(c, 0) == 0]
    if empty and require_every_class:
        what = "no image at all" if len(clean) == 0 else f"no image of class(es) {', '.join(empty)}"
        top = ", ".join(f"{k} {v}" for k, v in sorted(problems.items(), key=lambda kv: -kv[1])[:5]) or "none"
        raise LabelValidationError(
            f"{manifest_path}: label validation kept {what} (base.classes: {', '.join(classes)}); "
            f"{len(clean)} clean image(s) in all, review reasons: {top}. Check the reader, the label "
            f"synonyms and the review list {review_path}")
    blocking = [r for r in review if r.reason not in INFO_REASONS]
    if cfg.on_error == "fail" and blocking:
        lines = "\n".join(f"  {r.reason}: {r.item} ({r.path or '-'}) {r.detail}" for r in blocking[:20])
        more = f"\n  ... and {len(blocking) - 20} more" if len(blocking) > 20 else ""
        raise LabelValidationError(f"{manifest_path}: {len(blocking)} item(s) failed label validation "
                                   f"(on_error=fail); review list: {review_path}\n{lines}{more}")
    return result


def drop_exact_duplicates(ok: pd.DataFrame, review: list[ReviewItem]) -> pd.DataFrame:
    """Same bytes: under two labels all copies go to review; under one label the first (by path) stays."""
    keep = pd.Series(True, index=ok.index)
    dup = ok[ok.duplicated("sha256", keep=False) & ok["sha256"].notna()]
    for _, grp in dup.groupby("sha256", sort=True):
        names = ", ".join(grp["path"])
        if grp["label"].nunique() > 1:
            keep[grp.index] = False
            for r in grp.itertuples():
                review.append(ReviewItem(STAGE, str(r.image_id), r.path, "conflicting_duplicate",
                                         f"identical content under labels {sorted(grp['label'].unique())}: {names}"))
        else:
            for r in grp.iloc[1:].itertuples():
                keep[r.Index] = False
                review.append(ReviewItem(STAGE, str(r.image_id), r.path, "duplicate_image",
                                         f"identical content to {grp.iloc[0]['path']} (kept that one)"))
    return ok[keep]


def group_near_duplicates(ok: pd.DataFrame, max_distance: int,
                          review: list[ReviewItem]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Group images whose phash is within max_distance bits; conflicting groups go to review.

    Same-label groups stay: each member but the first gets an informational review row and
    all share group_id = the first member's image_id (split keeps a group on one side).
    """
    ok = ok.reset_index(drop=True)
    hashes, valid = parse_phash(ok["phash"].tolist())
    idx = np.flatnonzero(valid)
    pairs = near_duplicate_pairs(hashes[idx], max_distance)
    pairs["i"], pairs["j"] = idx[pairs["i"].to_numpy()], idx[pairs["j"].to_numpy()]
    ids, paths, labs = ok["image_id"].astype(str).to_numpy(), ok["path"].astype(str).to_numpy(), ok["label"].to_numpy()
    table = pd.DataFrame({"image_id_a": ids[pairs["i"]], "image_id_b": ids[pairs["j"]],
                          "path_a": paths[pairs["i"]], "path_b": paths[pairs["j"]],
                          "label_a": labs[pairs["i"]], "label_b": labs[pairs["j"]],
                          "distance": pairs["distance"].to_numpy()}, columns=list(NEAR_DUP_COLUMNS))
    comp = group_labels(len(ok), pairs)
    keep = np.ones(len(ok), dtype=bool)
    group_id = ids.copy()
    nearest = {}  # member -> (distance, other member) of its closest pair
    for i, j, d in pairs[["i", "j", "distance"]].itertuples(index=False):
        for a, b in ((i, j), (j, i)):
            if a not in nearest or d < nearest[a][0]:
                nearest[a] = (int(d), int(b))
    sizes = np.bincount(comp)
    for c in np.flatnonzero(sizes > 1):
        members = sorted(np.flatnonzero(comp == c), key=lambda k: ids[k])
        member_ids = ", ".join(ids[k] for k in members)
        if len(set(labs[members])) > 1:
            keep[members] = False
            for k in members:
                d, other = nearest[k]
                review.append(ReviewItem(STAGE, ids[k], paths[k], "conflicting_near_duplicate",
                                         f"near-identical (phash distance {d}) to {ids[other]} but labelled "
                                         f"{labs[k]} vs {labs[other]}; group: {member_ids}"))
            continue
        group_id[members] = ids[members[0]]
        for k in members[1:]:
            d, other = nearest[k]
            review.append(ReviewItem(STAGE, ids[k], paths[k], "near_duplicate",
                                     f"kept, grouped with {ids[members[0]]} (phash distance {d} to {ids[other]}); "
                                     f"the group stays in one split"))
    out = ok.assign(group_id=group_id)[keep]
    return out, table
