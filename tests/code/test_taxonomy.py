"""Taxonomy: synonyms, case and plural folding, PBC subtype prefixes, and config mistakes."""

from __future__ import annotations

import pytest

from hemaflow.config import load_params
from hemaflow.taxonomy import Taxonomy, fold, split_labels

PBC = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
SYN = {"neutrophil": ("sne", "bne", "seg", "band neutrophil"), "ig": ("immature granulocyte", "mmy", "my", "pmy"),
       "eosinophil": ("eo",), "platelet": ("plt",)}


@pytest.fixture
def tax() -> Taxonomy:
    return Taxonomy.build(PBC, SYN)


@pytest.mark.parametrize("text, expected", [
    ("neutrophil", "neutrophil"), ("NEUTROPHIL", "neutrophil"), (" Neutrophils ", "neutrophil"),
    ("SNE", "neutrophil"), ("bne", "neutrophil"), ("Band_Neutrophils", "neutrophil"), ("band-neutrophil", "neutrophil"),
    ("MMY", "ig"), ("My", "ig"), ("pmy", "ig"), ("IG", "ig"), ("Immature  Granulocytes", "ig"),
    ("Platelets", "platelet"), ("PLT", "platelet"), ("EO", "eosinophil"), ("eosinophils", "eosinophil"),
])
def test_synonyms_case_and_plurals(tax: Taxonomy, text: str, expected: str) -> None:
    assert tax.canonical(text) == expected


@pytest.mark.parametrize("text", ["megakaryocyte", "neutro", "", "s", "monocytes x"])
def test_unknown_spellings_are_none(tax: Taxonomy, text: str) -> None:
    assert tax.canonical(text) is None


@pytest.mark.parametrize("name, expected", [
    ("SNE_123.jpg", "neutrophil"), ("images/neutrophil/BNE_9.jpg", "neutrophil"), ("MMY_45.jpg", "ig"),
    ("IG_9.jpg", "ig"), ("PLATELET_1.jpg", "platelet"), ("SmearField_00012.jpg", None), ("cell.jpg", None),
    ("_12.jpg", None),
])
def test_subtype_prefix_of_file_names(tax: Taxonomy, name: str, expected: str | None) -> None:
    assert tax.subtype_class(name) == expected


def test_synonym_for_class_not_in_taxonomy_is_refused() -> None:
    with pytest.raises(ValueError, match="not in base.classes: basophils"):
        Taxonomy.build(PBC, {"basophils": ("ba",)})


def test_one_spelling_under_two_classes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ambiguous synonyms.*'MY' -> ig and monocyte"):
        Taxonomy.build(PBC, {"ig": ("MY",), "monocyte": ("MY",)})


def test_fold_and_split_labels() -> None:
    assert fold("  Band__Neutrophil - X ") == "band neutrophil x"
    assert split_labels("NEUTROPHIL, LYMPHOCYTE") == ["NEUTROPHIL", "LYMPHOCYTE"]
    assert split_labels("a; b | c") == ["a", "b", "c"]
    assert split_labels(" , ") == []


def test_example_pbc_params_map_every_pbc_prefix(project_root) -> None:
    p = load_params(project_root / "examples" / "pbc.params.yaml")
    tax = Taxonomy.build(p.base.classes, p.validate_labels.synonyms)
    prefixes = {"BA": "basophil", "EO": "eosinophil", "ERB": "erythroblast", "IG": "ig", "MMY": "ig", "MY": "ig",
                "PMY": "ig", "LY": "lymphocyte", "MO": "monocyte", "SNE": "neutrophil", "BNE": "neutrophil",
                "NEUTROPHIL": "neutrophil", "PLATELET": "platelet"}
    assert {k: tax.subtype_class(f"{k}_1.jpg") for k in prefixes} == prefixes
    assert sorted(p.base.classes) == sorted(PBC)
