"""Hand-made labels CSV (BCCD white-cell style): image id or file name -> label text.

BCCD's file has an unnamed index column, integer ids mapped to BloodImage_%05d.jpg,
upper-case names, blank rows and multi-label cells ("NEUTROPHIL, LYMPHOCYTE"). The text
is kept exactly; validate_labels decides what it means.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from hemaflow.errors import StageInputError

IMAGE_COLUMNS = ("image", "imageid", "imagename", "filename", "file")
LABEL_COLUMNS = ("category", "label", "class", "category1", "label1", "class1", "annotator1")
SECOND_LABEL_COLUMNS = ("category2", "label2", "class2", "annotator2")
LABEL_CSV_COLUMNS = ["file_name", "label_raw", "label_raw_2", "csv_line"]


def _key(column: str) -> str:
    return re.sub(r"[^a-z0-9]", "", column.lower())


def _merge(values: pd.Series):
    """Several rows for one image: keep every label, the validator sees a multi-label cell."""
    if len(values) == 1:
        return values.iloc[0]
    present = [v for v in values if isinstance(v, str) and v]
    return ", ".join(present) if present else values.iloc[0]


def read_labels_csv(csv_path: Path, id_pattern: str) -> pd.DataFrame:
    """(file_name, label_raw, label_raw_2, csv_line) per image named in the CSV.

    Image column: Image/image_id/filename (integer ids go through id_pattern). Label column:
    Category/label/class; an optional second annotator column: Category2/label_2/annotator2.
    Blank categories are kept as "" (not dropped); fully blank lines are skipped.
    """
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except Exception as exc:
        raise StageInputError(csv_path, f"cannot parse labels CSV ({exc})") from exc
    cols = {_key(c): c for c in df.columns}
    img_col = next((cols[c] for c in IMAGE_COLUMNS if c in cols), None)
    lab_col = next((cols[c] for c in LABEL_COLUMNS if c in cols), None)
    lab2_col = next((cols[c] for c in SECOND_LABEL_COLUMNS if c in cols), None)
    if img_col is None or lab_col is None:
        raise StageInputError(csv_path, f"needs an image column (Image/filename) and a label column "
                                        f"(Category/label); found {', '.join(df.columns)}")
    second = df[lab2_col] if lab2_col is not None else [None] * len(df)
    rows = []
    for i, (img, lab, lab2) in enumerate(zip(df[img_col], df[lab_col], second)):
        img = img.strip()
        if not img:
            continue  # nothing to attach a label to
        name = id_pattern.format(int(img)) if img.isdigit() else img
        rows.append({"file_name": name, "label_raw": lab.strip(),
                     "label_raw_2": lab2.strip() if lab2 is not None else None, "csv_line": i + 2})
    out = pd.DataFrame(rows, columns=LABEL_CSV_COLUMNS)
    return (out.groupby("file_name", sort=False)
               .agg(label_raw=("label_raw", _merge), label_raw_2=("label_raw_2", _merge),
                    csv_line=("csv_line", "first"))
               .reset_index())
