"""Labels encoded in file names (ALL-IDB: Im042_1.tif, 1 = lymphoblast, 0 = no blast).

`filename_pattern` is matched against the file stem; its `label` group, mapped through
`filename_labels` (unmapped values kept as they are), is the label. A name that does not
match gets no label, which validate_labels reports as an image without label.
"""

from __future__ import annotations

import re
from pathlib import Path

from hemaflow.config import IngestParams
from hemaflow.readers.guard import FolderGuard
from hemaflow.readers.items import Scan, SourceItem

NAME = "filename_labels"


def label_of(stem: str, pattern: re.Pattern, mapping: dict[str, str]) -> str | None:
    m = pattern.match(stem)
    if m is None:
        return None
    token = m.group("label")
    return mapping.get(token, token)


def scan(raw_dir: Path, cfg: IngestParams) -> Scan:
    pattern = re.compile(cfg.filename_pattern)
    files = sorted(p for p in raw_dir.glob(cfg.filename_glob) if p.is_file())
    guard = FolderGuard(raw_dir)

    def items():
        for p in files:
            yield SourceItem(image_id=p.stem, path=p.relative_to(raw_dir).as_posix(), source=NAME,
                             label_raw=label_of(p.stem, pattern, cfg.filename_labels), file=p, error=guard.error(p))

    return Scan(items=items(), total=len(files))
