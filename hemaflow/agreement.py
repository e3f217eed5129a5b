"""Agreement between two annotators: Cohen's kappa and the list of items they disagree on.

Kappa corrects raw agreement for the agreement two annotators would reach by chance given
their class mix, so 0.9 raw agreement on a 90%-neutrophil set can still be a poor kappa.
Both labels go through the taxonomy first: "SNE" and "neutrophil" agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hemaflow.taxonomy import Taxonomy, split_labels

DISAGREEMENT_COLUMNS = ("image_id", "path", "label_raw", "label_raw_2", "label", "label_2")


@dataclass(frozen=True)
class Agreement:
    n_compared: int            # items with a usable label from both annotators
    n_agree: int
    kappa: float | None        # None when fewer than 2 items or only one class seen by both (undefined)
    disagreements: pd.DataFrame  # DISAGREEMENT_COLUMNS, one row per item the annotators disagree on

    @property
    def raw_agreement(self) -> float | None:
        return self.n_agree / self.n_compared if self.n_compared else None

    def summary(self) -> dict:
        return {"n_compared": self.n_compared, "n_agree": self.n_agree,
                "n_disagree": len(self.disagreements),
                "raw_agreement": None if self.raw_agreement is None else round(self.raw_agreement, 4),
                "cohen_kappa": None if self.kappa is None else round(self.kappa, 4)}


def second_label(text: str | None, taxonomy: Taxonomy) -> str | None:
    """Canonical class of the second annotator's cell; '?<text>' when it is unknown or multi-label."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    parts = split_labels(str(text))
    if not parts:
        return None
    canon = {taxonomy.canonical(p) for p in parts}
    return canon.pop() if len(canon) == 1 and None not in canon else f"?{text}"


def measure_agreement(items: pd.DataFrame, taxonomy: Taxonomy) -> Agreement:
    """items: image_id, path, label_raw, label_raw_2, label (the first annotator's canonical class).

    Only rows where both annotators gave a label are compared; an unknown second label
    counts as a disagreement (it is a label the first annotator did not give).
    """
    from sklearn.metrics import cohen_kappa_score

    df = items.assign(label_2=[second_label(v, taxonomy) for v in items["label_raw_2"]])
    both = df[df["label"].notna() & df["label_2"].notna()]
    agree = both["label"] == both["label_2"]
    kappa = None
    if len(both) >= 2 and len(set(both["label"]) | set(both["label_2"])) > 1:
        kappa = float(cohen_kappa_score(both["label"].astype(str), both["label_2"].astype(str)))
    dis = both.loc[~agree, list(DISAGREEMENT_COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)
    return Agreement(len(both), int(agree.sum()), kappa, dis)


def write_agreement(agreement: Agreement, labels_dir: Path) -> tuple[Path, Path]:
    """disagreements.csv (always written, possibly empty) and agreement.json with kappa."""
    labels_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = labels_dir / "disagreements.csv", labels_dir / "agreement.json"
    agreement.disagreements.to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(agreement.summary(), indent=2) + "\n")
    return csv_path, json_path
