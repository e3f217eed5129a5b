"""The review list: rejected or doubtful items, one row per problem, for a person to work through."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from hemaflow.schema import REVIEW_COLUMNS


@dataclass(frozen=True)
class ReviewItem:
    stage: str    # stage that raised it
    item: str     # image or crop id
    path: str     # file concerned ('' if none)
    reason: str   # short machine-friendly reason, e.g. blank_label, no_cell_found
    detail: str   # one sentence for the person reviewing


def write_review(items: list[ReviewItem], path: str | Path) -> pd.DataFrame:
    """Write the review CSV (always, even when empty, so DVC has an output) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([asdict(i) for i in items], columns=list(REVIEW_COLUMNS))
    df = df.sort_values(["reason", "item"], kind="stable").reset_index(drop=True)
    df.to_csv(path, index=False)
    return df
