"""Two annotators: Cohen's kappa (checked against the textbook formula) and the disagreement list."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest

from hemaflow.agreement import DISAGREEMENT_COLUMNS, measure_agreement, second_label, write_agreement
from hemaflow.taxonomy import Taxonomy

TAX = Taxonomy.build(("neutrophil", "lymphocyte", "monocyte"), {"neutrophil": ("sne", "seg")})


def items(first: list[str | None], second: list[str | None]) -> pd.DataFrame:
    n = len(first)
    return pd.DataFrame({"image_id": [f"i{k:02d}" for k in range(n)], "path": [f"f/i{k:02d}.jpg" for k in range(n)],
                         "label_raw": first, "label_raw_2": second,
                         "label": [TAX.canonical(x) if x else None for x in first]})


def kappa_by_hand(a: list[str], b: list[str]) -> float:
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(a) | set(b)) / n ** 2
    return (po - pe) / (1 - pe)


def test_kappa_matches_formula_and_lists_disagreements() -> None:
    first = ["neutrophil"] * 6 + ["lymphocyte"] * 3 + ["monocyte"] * 3
    second = ["SNE"] * 5 + ["lymphocyte"] + ["Lymphocytes"] * 2 + ["LYMPHOCYTE"] + ["monocyte"] * 2 + ["neutrophil"]
    result = measure_agreement(items(first, second), TAX)
    canon2 = [TAX.canonical(x) for x in second]
    assert result.n_compared == 12 and result.n_agree == 10
    assert result.kappa == pytest.approx(kappa_by_hand(first, canon2))
    assert 0.5 < result.kappa < 1
    dis = result.disagreements
    assert list(dis.columns) == list(DISAGREEMENT_COLUMNS)
    assert dis[["image_id", "label", "label_2"]].values.tolist() == [
        ["i05", "neutrophil", "lymphocyte"], ["i11", "monocyte", "neutrophil"]]
    assert result.summary()["raw_agreement"] == pytest.approx(10 / 12, abs=1e-4)


def test_missing_second_label_is_not_compared_and_unknown_disagrees() -> None:
    result = measure_agreement(items(["neutrophil", "lymphocyte", "monocyte", "neutrophil", None],
                                     [None, "", "megakaryocyte", "seg", "monocyte"]), TAX)
    assert result.n_compared == 2  # i02 (unknown second label) and i03; i04 has no first label
    assert result.disagreements["label_2"].tolist() == ["?megakaryocyte"]


def test_kappa_undefined_with_a_single_class_or_one_item() -> None:
    assert measure_agreement(items(["neutrophil"] * 3, ["sne"] * 3), TAX).kappa is None
    assert measure_agreement(items(["neutrophil"], ["lymphocyte"]), TAX).kappa is None


def test_second_label_folding() -> None:
    assert second_label("SEG", TAX) == "neutrophil"
    assert second_label("neutrophil, lymphocyte", TAX) == "?neutrophil, lymphocyte"
    assert second_label(float("nan"), TAX) is None


def test_write_agreement_files(tmp_path) -> None:
    result = measure_agreement(items(["neutrophil", "lymphocyte", "monocyte"], ["sne", "monocyte", "monocyte"]), TAX)
    csv_path, json_path = write_agreement(result, tmp_path / "labels")
    assert pd.read_csv(csv_path)["image_id"].tolist() == ["i01"]
    saved = json.loads(json_path.read_text())
    assert saved["n_compared"] == 3 and saved["n_disagree"] == 1
    assert saved["cohen_kappa"] == pytest.approx(kappa_by_hand(["neutrophil", "lymphocyte", "monocyte"],
                                                               ["neutrophil", "monocyte", "monocyte"]), abs=1e-4)
