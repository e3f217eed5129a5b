"""Labels CSV files: the hand-made labels voc_fields joins, and the `labels_csv` reader.

read_labels_csv (BCCD white-cell style): image id or file name -> label text. BCCD's
file has an unnamed index column, integer ids mapped to BloodImage_%05d.jpg, upper-case
names, blank rows and multi-label cells ("NEUTROPHIL, LYMPHOCYTE"). The text is kept
exactly; validate_labels decides what it means.

The `labels_csv` reader (scan): images anywhere below raw_dir, and one CSV naming each by
its path relative to raw_dir, with its label and optionally its split:

    path,label,split
    images/neutrophil/BNE_1.jpg,NEUTROPHIL,train

A row whose file is missing becomes a `label_without_image` row, an image file the CSV
does not name an image without label, a name or symlink leading out of raw_dir
`path_outside_data_folder` (never read).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from hemaflow.config import IngestParams
from hemaflow.errors import StageInputError
from hemaflow.readers.guard import OUTSIDE, FolderGuard
from hemaflow.readers.items import IMAGE_SUFFIXES, Scan, SourceItem

NAME = "labels_csv"

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


# --- the labels_csv reader ----------------------------------------------------------------------

# column names the reader recognises, compared after _key (case, spaces, _ and - folded), in order
PATH_COLUMNS = ("path", "relpath", "relativepath", "filepath", "imagepath", "file", "filename", "image",
                "imagefile", "imagename", "img")
TABLE_LABEL_COLUMNS = ("label", "class", "celltype", "category", "classname", "labelname", "cell", "target")
SPLIT_COLUMNS = ("split", "subset", "partition")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
_DRIVE = re.compile(r"^[A-Za-z]:/")


@dataclass
class _Row:
    """One image named by the CSV (rows naming the same file merged)."""
    rel: str                       # normalised path relative to raw_dir, or the name as written if it leads out
    line: int                      # first CSV line naming it
    labels: list[str] = field(default_factory=list)
    labels_2: list[str | None] = field(default_factory=list)
    split: str = ""                # first non-blank split cell
    outside: bool = False          # the name itself leaves raw_dir


def read_table(csv_path: Path) -> pd.DataFrame:
    """The CSV as text cells (BOM and ';' or tab separators tolerated); blank lines kept for line numbers."""
    last = None
    for sep in (",", ";", "\t"):
        try:
            df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=False, sep=sep,
                             encoding="utf-8-sig")
        except Exception as exc:
            last = exc
            continue
        if len(df.columns) >= 2:
            return df
    detail = f"cannot parse labels CSV ({last})" if last else "labels CSV needs at least two columns (path, label)"
    raise StageInputError(csv_path, detail)


def pick_column(df: pd.DataFrame, wanted: str | None, known: tuple[str, ...]) -> str | None:
    """The column named `wanted` (exactly, else after _key), or with None the first `known` name present."""
    if wanted is not None:
        if wanted in df.columns:
            return wanted
        return next((c for c in df.columns if _key(c) == _key(wanted)), None)
    cols = {_key(c): c for c in df.columns}
    return next((cols[k] for k in known if k in cols), None)


def table_columns(df: pd.DataFrame, cfg: IngestParams, csv_path: Path) -> tuple[str, str, str | None, str | None]:
    """(path, label, second label or None, split or None) column names; a missing required one is an error."""
    path_col = pick_column(df, cfg.csv_path_column, PATH_COLUMNS)
    label_col = pick_column(df, cfg.csv_label_column, TABLE_LABEL_COLUMNS)
    split_col = pick_column(df, cfg.csv_split_column, SPLIT_COLUMNS)
    found = ", ".join(map(str, df.columns))
    for col, wanted, what, names in ((path_col, cfg.csv_path_column, "path", "path/file/filename/image"),
                                     (label_col, cfg.csv_label_column, "label", "label/class/cell_type/category")):
        if col is None:
            ask = f"'{wanted}' (ingest.csv_{what}_column)" if wanted else f"named {names} (or set ingest.csv_{what}_column)"
            raise StageInputError(csv_path, f"needs a {what} column {ask}; found {found}")
    if cfg.csv_split_column is not None and split_col is None:
        raise StageInputError(csv_path, f"needs a split column '{cfg.csv_split_column}' (ingest.csv_split_column); "
                                        f"found {found}")
    label2_col = pick_column(df, None, SECOND_LABEL_COLUMNS)
    if path_col == label_col:
        raise StageInputError(csv_path, f"column '{path_col}' cannot be both the path and the label column")
    return path_col, label_col, (label2_col if label2_col not in (path_col, label_col) else None), split_col


def normalise_path(name: str, root: Path) -> tuple[str | None, bool]:
    """(path relative to raw_dir in posix form, leaves raw_dir?); (None, False) for a blank name.

    Backslashes become '/', './' and 'a/../' fold away; an absolute path is kept when it
    lies under raw_dir (made relative), else it leaves raw_dir like a '../' name.
    """
    s = name.strip().replace("\\", "/")
    if not s:
        return None, False
    if _DRIVE.match(s):
        return s, True
    if s.startswith("/"):
        try:
            s = Path(posixpath.normpath(s)).relative_to(root).as_posix()
        except ValueError:
            return s, True
    s = posixpath.normpath(s)
    if s == ".":
        return None, False
    if s == ".." or s.startswith("../"):
        return name.strip(), True
    return s, False


def _split_value(cell: str) -> str | None:
    return SPLIT_NAMES.get(cell.strip().lower()) if cell.strip() else None


def read_rows(csv_path: Path, cfg: IngestParams, root: Path) -> tuple[list[_Row], list[SourceItem], int]:
    """(the images the CSV names, merged per path; items for rows that name no image at all; label rows)."""
    df = read_table(csv_path)
    path_col, label_col, label2_col, split_col = table_columns(df, cfg, csv_path)
    rows: dict[str, _Row] = {}
    nameless: list[SourceItem] = []
    n_rows = 0
    n = len(df)
    blank = [""] * n
    for i, (name, lab, lab2, split) in enumerate(zip(df[path_col], df[label_col],
                                                      df[label2_col] if label2_col else [None] * n,
                                                      df[split_col] if split_col else blank)):
        line = i + 2
        rel, outside = normalise_path(name, root)
        n_rows += bool(rel is not None or lab.strip())
        if rel is None:
            if lab.strip():  # a label with nothing to attach it to
                nameless.append(SourceItem(image_id=f"{csv_path.name}:{line}", path=None, source=NAME,
                                           label_raw=lab.strip(), error=f"label_without_image: the label row "
                                           f"names no image ({csv_path.name} line {line}: blank {path_col})"))
            continue
        row = rows.setdefault(rel, _Row(rel=rel, line=line, outside=outside))
        row.labels.append(lab.strip())
        row.labels_2.append(lab2.strip() if lab2 is not None else None)
        if not row.split and split.strip():
            row.split = split.strip()
    return list(rows.values()), nameless, n_rows


def _merged(values: list) -> str | None:
    return _merge(pd.Series(values, dtype=object))


def _image_id(rel: str, taken: set[str]) -> str:
    """Path without its suffix (images/neutrophil/BNE_1), the whole path if two files share that."""
    stem = posixpath.splitext(rel)[0]
    return rel if stem in taken else stem


def list_images(raw_dir: Path) -> list[tuple[str, bool]]:
    """(posix path relative to raw_dir, is a symlink) of every image-suffixed file below raw_dir, sorted.

    Symlinked folders are not entered; a symlinked file is listed (the guard judges it).
    """
    out = []
    for folder, dirs, files in os.walk(raw_dir):
        dirs.sort()
        base = Path(folder)
        for f in files:
            if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES:
                out.append(((base / f).relative_to(raw_dir).as_posix(), (base / f).is_symlink()))
    return sorted(out)


def _hint(rel: str, by_lower: dict[str, str], by_name: dict[str, list[str]]) -> str:
    """'; did you mean ...' when a file matches the name but for case, or by file name alone."""
    near = by_lower.get(rel.lower())
    if near is None:
        same = by_name.get(posixpath.basename(rel), [])
        near = same[0] if len(same) == 1 else None
    return f"; did you mean '{near}'?" if near else ""


def scan(raw_dir: Path, cfg: IngestParams) -> Scan:
    csv_path = raw_dir / cfg.labels_csv
    if not csv_path.is_file():
        raise StageInputError(csv_path, "labels CSV not found (ingest.labels_csv, relative to raw_dir)")
    guard = FolderGuard(raw_dir)
    if not guard.inside(csv_path):
        raise StageInputError(csv_path, f"the labels CSV resolves outside the data folder {guard.root}")
    named, nameless, n_rows = read_rows(csv_path, cfg, guard.root)
    images = list_images(raw_dir)
    named_paths = {r.rel for r in named if not r.outside}
    unlisted = [(rel, link) for rel, link in images if rel not in named_paths]
    by_lower = {rel.lower(): rel for rel, _ in images}
    by_name: dict[str, list[str]] = {}
    for rel, _ in images:
        by_name.setdefault(posixpath.basename(rel), []).append(rel)

    taken: set[str] = set()
    ids = []
    for rel in [r.rel for r in named] + [rel for rel, _ in unlisted]:
        image_id = _image_id(rel, taken)
        taken.add(image_id)
        ids.append(image_id)
    where = lambda r: f"({csv_path.name} line {r.line}: '{r.rel}')"  # noqa: E731

    def items():
        yield from nameless
        for r, image_id in zip(named, ids):
            item = SourceItem(image_id=image_id, path=r.rel, source=NAME, label_raw=_merged(r.labels),
                              label_raw_2=_merged(r.labels_2), file=raw_dir / r.rel)
            split = _split_value(r.split) if r.split else None
            if r.outside:
                item.path, item.file = None, None
                item.error = f"{OUTSIDE}: the name leaves the data folder {where(r)}"
            elif (error := guard.error(item.file)) is not None:
                item.error = f"{error} {where(r)}"
            elif not item.file.is_file():
                item.path, item.file = None, None
                item.error = (f"label_without_image: the label row names an image that does not exist "
                              f"{where(r)}{_hint(r.rel, by_lower, by_name)}")
            elif r.split and split is None:
                item.error = (f"unknown_split: split '{r.split}' is not one of train, val, test "
                              f"{where(r)}")
            item.split = split
            yield item
        for (rel, link), image_id in zip(unlisted, ids[len(named):]):
            p = raw_dir / rel
            yield SourceItem(image_id=image_id, path=rel, source=NAME, file=p, error=guard.error(p, is_symlink=link))

    return Scan(items=items(), total=len(nameless) + len(named) + len(unlisted), label_rows=n_rows)


def names_existing_files(raw_dir: Path, cfg: IngestParams, sample: int = 200) -> bool:
    """detect_reader: raw_dir holds cfg.labels_csv with a path column naming files that exist below it."""
    csv_path = raw_dir / cfg.labels_csv
    if not csv_path.is_file():
        return False
    try:
        df = read_table(csv_path)
        path_col = pick_column(df, cfg.csv_path_column, PATH_COLUMNS)
    except StageInputError:
        return False
    if path_col is None:
        return False
    root = raw_dir.resolve()
    for name in df[path_col].head(sample):
        rel, outside = normalise_path(name, root)
        if rel is not None and not outside and (raw_dir / rel).is_file():
            return True
    return False
