"""Class folders (PBC): <raw_dir>[/images]/<class>/<file>, the folder name is the label.

Every file is listed, hidden ones too: PBC hides a non-image file as `.DS_<n>.jpg`, and
ingest must report it rather than skip it. Listing uses os.scandir, whose entries know
file type and symlink-ness without a stat call per file.
"""

from __future__ import annotations

import os
from pathlib import Path

from hemaflow.config import IngestParams
from hemaflow.readers.guard import FolderGuard
from hemaflow.readers.items import Scan, SourceItem

NAME = "class_folders"


def class_root(raw_dir: Path) -> Path:
    return raw_dir / "images" if (raw_dir / "images").is_dir() else raw_dir


def list_class_files(base: Path) -> list[tuple[str, os.DirEntry | None]]:
    """(class name, file entry) for every file one level below base, sorted by path;
    (class name, None) for a class folder holding no file."""
    out: list[tuple[str, os.DirEntry | None]] = []
    for cls in sorted(os.scandir(base), key=lambda e: e.name):
        if cls.is_dir():
            files = [(cls.name, f) for f in sorted(os.scandir(cls.path), key=lambda e: e.name) if f.is_file()]
            out.extend(files or [(cls.name, None)])
    return out


def scan(raw_dir: Path, cfg: IngestParams) -> Scan:
    base = class_root(raw_dir)
    prefix = base.relative_to(raw_dir).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    files = list_class_files(base)
    guard = FolderGuard(raw_dir)

    def items():
        for cls, entry in files:
            if entry is None:  # reported, so an empty class is never a silent zero
                yield SourceItem(image_id=cls, path=None, source=NAME, label_raw=cls,
                                 error=f"empty_class_folder: {prefix}{cls}/ holds no file")
                continue
            p = Path(entry.path)
            error = guard.error(p, is_symlink=entry.is_symlink())
            yield SourceItem(image_id=f"{cls}/{os.path.splitext(entry.name)[0]}", path=f"{prefix}{cls}/{entry.name}",
                             source=NAME, label_raw=cls, file=p, error=error)

    return Scan(items=items(), total=len(files))
