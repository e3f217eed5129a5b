"""Validate labels: manifest -> clean table + review list, one row per problem, with a reason.

Policy (params validate_labels.on_error): `drop` sends bad items to the review list and
goes on; `fail` stops the run with the same list. Raw files are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from hemaflow.config import ValidateLabelsParams
from hemaflow.errors import StageInputError, require_columns, require_file
from hemaflow.review import ReviewItem, write_review
from hemaflow.schema import CLEAN_COLUMNS, MANIFEST_COLUMNS
from hemaflow.taxonomy import Taxonomy, split_labels

STAGE = "validate_labels"


class LabelValidationError(Exception):
    """on_error=fail and some items did not pass."""


@dataclass
class ValidateResult:
    clean_path: Path
    review_path: Path
    n_clean: int
    problems: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"clean images": self.n_clean, "review items": sum(self.problems.values()),
                **{f"review: {k}": v for k, v in sorted(self.problems.items())},
                **{f"class: {k}": v for k, v in self.class_counts.items()}}


def _text(value) -> str:
    """Cell as text; '' for None/NaN (pandas 3 stores missing strings as NaN)."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def classify_row(row: pd.Series, taxonomy: Taxonomy) -> tuple[str | None, str | None, str]:
    """(canonical label, reason, detail) for one manifest row; reason None means it passed."""
    if _text(row["error"]):
        code, _, detail = row["error"].partition(": ")
        return None, code, detail or row["error"]
    if pd.isna(row["label_raw"]):
        return None, "image_without_label", "the image has no row in the labels file"
    raw = str(row["label_raw"])
    parts = split_labels(raw)
    if not parts:
        return None, "blank_label", "the label cell is empty"
    canon = [taxonomy.canonical(p) for p in parts]
    unknown = [p for p, c in zip(parts, canon) if c is None]
    if unknown:
        return None, "unknown_class", f"'{', '.join(unknown)}' is not in the taxonomy {list(taxonomy.classes)}"
    if len(set(canon)) > 1:
        return None, "multi_label", f"several classes in one label: '{raw}'"
    return canon[0], None, ""


def validate_labels(manifest_path: Path, labels_dir: Path, cfg: ValidateLabelsParams,
                    classes: tuple[str, ...]) -> ValidateResult:
    """Classify every manifest row, resolve duplicate content, write clean.parquet + review.csv."""
    require_file(manifest_path, "manifest")
    try:
        manifest = pd.read_parquet(manifest_path)
    except Exception as exc:
        raise StageInputError(manifest_path, f"not a readable parquet manifest ({exc})") from exc
    require_columns(manifest, MANIFEST_COLUMNS, manifest_path)
    try:
        taxonomy = Taxonomy.build(classes, cfg.synonyms)
    except ValueError as exc:
        raise StageInputError("params.yaml", str(exc)) from exc

    review: list[ReviewItem] = []
    labels: list[str | None] = []
    for _, row in manifest.iterrows():
        label, reason, detail = classify_row(row, taxonomy)
        labels.append(label)
        if reason:
            review.append(ReviewItem(STAGE, row["image_id"], _text(row["path"]), reason, detail))
    df = manifest.assign(label=labels)
    ok = df[df["label"].notna()]

    # the same bytes under two labels cannot both be right; under one label they would leak across splits
    keep = pd.Series(True, index=ok.index)
    for sha, grp in ok.groupby("sha256", sort=False):
        if len(grp) < 2:
            continue
        names = ", ".join(grp["path"])
        if grp["label"].nunique() > 1:
            keep[grp.index] = False
            for _, r in grp.iterrows():
                review.append(ReviewItem(STAGE, r["image_id"], r["path"], "conflicting_duplicate",
                                         f"identical content under labels {sorted(grp['label'].unique())}: {names}"))
        else:
            for _, r in grp.iloc[1:].iterrows():
                keep[r.name] = False
                review.append(ReviewItem(STAGE, r["image_id"], r["path"], "duplicate_image",
                                         f"identical content to {grp.iloc[0]['path']} (kept that one)"))
    clean = ok[keep][list(CLEAN_COLUMNS)].reset_index(drop=True)

    labels_dir.mkdir(parents=True, exist_ok=True)
    clean_path, review_path = labels_dir / "clean.parquet", labels_dir / "review.csv"
    review_df = write_review(review, review_path)
    clean.to_parquet(clean_path, index=False)
    problems = review_df["reason"].value_counts().to_dict()
    if cfg.on_error == "fail" and review:
        lines = "\n".join(f"  {r.reason}: {r.item} ({r.path or '-'}) {r.detail}" for r in review[:20])
        more = f"\n  ... and {len(review) - 20} more" if len(review) > 20 else ""
        raise LabelValidationError(f"{manifest_path}: {len(review)} item(s) failed label validation "
                                   f"(on_error=fail); review list: {review_path}\n{lines}{more}")
    return ValidateResult(clean_path, review_path, len(clean), problems,
                          {c: int((clean["label"] == c).sum()) for c in classes})
