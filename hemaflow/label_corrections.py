"""A person's label decisions: relabel or drop an image, kept in a CSV that validate_labels applies.

Why: the review lists (validate_labels' review.csv, evaluate's label_review.csv and its sheet) name
images whose label looks wrong, but nothing relabels them by itself and the raw data is never
modified. A decision therefore lives in its own small file (`paths.label_corrections`), versioned
with the project and listed as a DVC dependency, so that the next run applies it and anyone can see
who changed what and why.

The file, one row per image (`path` as the manifest writes it, relative to `paths.raw_dir`):

    path,action,label,note
    images/neutrophil/BNE_143245.jpg,relabel,ig,metamyelocyte in the centre; the band cell is at the edge
    images/platelet/PLATELET_89526.jpg,drop,,nucleated cell in the crop; the platelets are outside it
    images/monocyte/MO_332923.jpg,,lymphocyte,  <- no action yet: a suggestion, not applied

`action`: `relabel` (to `label`, any spelling the taxonomy knows), `drop` (leave the image out,
listed in review.csv with the note), `keep` (a person looked: the label stands) or blank (not
decided yet; `hemaflow label-corrections --review ...` drafts such rows). Any other content is an
error naming the file and the line, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hemaflow.errors import StageInputError, read_table
from hemaflow.schema import CORRECTION_COLUMNS, CROP_COLUMNS, REVIEW_COLUMNS
from hemaflow.taxonomy import Taxonomy

ACTIONS = ("relabel", "drop", "keep", "")


@dataclass(frozen=True)
class Correction:
    path: str          # manifest path of the image (relative to raw_dir)
    action: str        # relabel | drop | keep | '' (undecided)
    label: str | None  # canonical class for relabel; None otherwise
    note: str          # why, in the reviewer's words
    line: int          # line in the CSV (header = 1), for messages


def read_corrections(path: str | Path, taxonomy: Taxonomy) -> dict[str, Correction]:
    """manifest path -> the decision for it. Every problem of the file is collected and raised as one
    StageInputError naming the file and its lines: a mistyped decision must not be half-applied."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError(path, "label corrections file not found (paths.label_corrections); create it with "
                                    f"just the header line '{','.join(CORRECTION_COLUMNS)}' (no decisions yet)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:  # empty file, bad quoting, undecodable bytes
        raise StageInputError(path, f"label corrections cannot be read as CSV: {exc}") from exc
    missing = [c for c in ("path", "action") if c not in df.columns]
    if missing:
        raise StageInputError(path, f"label corrections lack column(s) {', '.join(missing)}; expected the header "
                                    f"'{','.join(CORRECTION_COLUMNS)}'")
    df = df.reindex(columns=list(CORRECTION_COLUMNS), fill_value="")
    out: dict[str, Correction] = {}
    problems: list[str] = []
    for i, row in enumerate(df.itertuples(index=False), start=2):
        item, action, label_text, note = (str(v).strip() for v in row)
        action = action.lower()
        if not item:
            problems.append(f"line {i}: empty path")
            continue
        if action not in ACTIONS:
            problems.append(f"line {i} ({item}): action '{action}' is not one of relabel, drop, keep or blank")
            continue
        label = None
        if action == "relabel":
            label = taxonomy.canonical(label_text) if label_text else None
            if label is None:
                problems.append(f"line {i} ({item}): relabel needs a label in the taxonomy {list(taxonomy.classes)}, "
                                f"got '{label_text}'")
                continue
        corr = Correction(item, action, label, note, i)
        seen = out.get(item)
        if seen is not None and (seen.action, seen.label) != (action, label):
            problems.append(f"line {i} ({item}): contradicts line {seen.line} ({seen.action or 'undecided'} "
                            f"{seen.label or ''}".rstrip() + ")")
            continue
        out[item] = corr
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise StageInputError(path, f"{len(problems)} bad row(s) in the label corrections: {shown}")
    return out


def unmatched(corrections: dict[str, Correction], manifest_paths: set[str]) -> list[Correction]:
    """Decided corrections whose image is not in the manifest (a typo, or the image left the data)."""
    return [c for c in corrections.values() if c.action and c.path not in manifest_paths]


def draft_from_review(review_csv: str | Path, crops_table: str | Path, corrections_path: str | Path) -> dict[str, int]:
    """Append to the corrections file one undecided row per image of an evaluate label review
    (label_review.csv) that the file does not list yet: the source image's manifest path, the
    model's class (predictions.csv beside the review) as the suggested label and the review's
    sentence as the note. A person then writes relabel / drop / keep in `action`; nothing is
    applied before that.

    Review rows name crops of the dataset; the crops table (segment's crops.parquet) says which
    source image each was cut from. Rows it does not know (an external test folder's review: those
    images are not training data) are counted and skipped."""
    review_csv, corrections_path = Path(review_csv), Path(corrections_path)
    if not review_csv.is_file():
        raise StageInputError(review_csv, "label review not found (evaluate writes label_review.csv in its eval dir)")
    review = pd.read_csv(review_csv, dtype=str, keep_default_na=False)
    if not set(REVIEW_COLUMNS) <= set(review.columns):
        raise StageInputError(review_csv, f"not a review list: expected the columns {', '.join(REVIEW_COLUMNS)}")
    crops = read_table(crops_table, "crops table", CROP_COLUMNS).set_index("path")
    predictions = review_csv.parent / "predictions.csv"
    called = (pd.read_csv(predictions, dtype=str, keep_default_na=False).set_index("path")["predicted"].to_dict()
              if predictions.is_file() else {})
    if corrections_path.is_file():
        existing = pd.read_csv(corrections_path, dtype=str, keep_default_na=False)
        listed = set(existing["path"]) if "path" in existing.columns else set()
    else:
        existing, listed = pd.DataFrame(columns=list(CORRECTION_COLUMNS)), set()
    rows, skipped, already = [], 0, 0
    for r in review.itertuples(index=False):
        if r.item not in crops.index:
            skipped += 1
            continue
        source = str(crops.loc[r.item, "source_path"])
        if source in listed:
            already += 1
            continue
        listed.add(source)
        rows.append({"path": source, "action": "", "label": called.get(r.item, ""), "note": r.detail})
    if rows:
        corrections_path.parent.mkdir(parents=True, exist_ok=True)
        out = pd.concat([existing, pd.DataFrame(rows)], ignore_index=True)
        out.reindex(columns=list(dict.fromkeys([*CORRECTION_COLUMNS, *existing.columns]))).to_csv(
            corrections_path, index=False)
    return {"added": len(rows), "already listed": already, "not in this project's crops (skipped)": skipped}
