import pandas as pd
import pytest

from hemaflow.config import ValidateLabelsParams
from hemaflow.errors import StageInputError
from hemaflow.schema import MANIFEST_COLUMNS
from hemaflow.taxonomy import Taxonomy
from tasks.validate_labels import LabelValidationError, validate_labels

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
CFG = ValidateLabelsParams(synonyms={"neutrophil": ("sne", "bne", "seg")})


def _row(image_id, label_raw, sha=None, error=None, path="auto"):
    return {"image_id": image_id, "path": f"fields/{image_id}.jpg" if path == "auto" else path,
            "sha256": sha or f"sha-{image_id}", "width": 10, "height": 10, "channels": 3, "source": "voc_fields",
            "label_raw": label_raw, "boxes": "[]", "split": None, "error": error}


@pytest.fixture
def manifest(tmp_path):
    rows = [
        _row("a", "NEUTROPHIL"), _row("b", "Neutrophils"), _row("c", "lymphocyte"), _row("d", "SNE"),
        _row("e", ""), _row("f", "NEUTROPHIL, LYMPHOCYTE"), _row("g", "megakaryocyte"), _row("h", None),
        _row("i", "MONOCYTE", error="unreadable_image: OpenCV cannot decode it"),
        _row("j", "MONOCYTE", path=None, sha=None, error="label_without_image: no such file"),
        _row("k", "EOSINOPHIL", sha="same"), _row("l", "BASOPHIL", sha="same"),
        _row("m", "monocyte", sha="dup"), _row("n", "Monocyte", sha="dup"),
        _row("o", "Neutrophil, neutrophil"),
    ]
    p = tmp_path / "manifest.parquet"
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(p)
    return p


def test_clean_table_and_review_reasons(manifest, tmp_path):
    res = validate_labels(manifest, tmp_path / "labels", CFG, CLASSES)
    clean = pd.read_parquet(res.clean_path).set_index("image_id")
    assert clean["label"].to_dict() == {"a": "neutrophil", "b": "neutrophil", "c": "lymphocyte", "d": "neutrophil",
                                        "m": "monocyte", "o": "neutrophil"}
    review = pd.read_csv(res.review_path)
    reasons = dict(zip(review["item"], review["reason"]))
    assert reasons == {"e": "blank_label", "f": "multi_label", "g": "unknown_class", "h": "image_without_label",
                       "i": "unreadable_image", "j": "label_without_image", "k": "conflicting_duplicate",
                       "l": "conflicting_duplicate", "n": "duplicate_image"}
    assert "megakaryocyte" in review.set_index("item").loc["g", "detail"]
    assert res.problems["conflicting_duplicate"] == 2


def test_fail_policy_stops_with_the_list(manifest, tmp_path):
    with pytest.raises(LabelValidationError, match=r"(?s)manifest\.parquet: 9 item\(s\).*blank_label"):
        validate_labels(manifest, tmp_path / "labels", CFG.model_copy(update={"on_error": "fail"}), CLASSES)
    assert (tmp_path / "labels" / "review.csv").is_file()  # the list is written before stopping


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(StageInputError, match="missing.parquet"):
        validate_labels(tmp_path / "missing.parquet", tmp_path / "o", CFG, CLASSES)
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"image_id": ["x"]}).to_parquet(bad)
    with pytest.raises(StageInputError, match=r"bad\.parquet: missing column"):
        validate_labels(bad, tmp_path / "o", CFG, CLASSES)


def test_taxonomy_rejects_synonyms_for_unknown_class():
    with pytest.raises(ValueError, match="platelet"):
        Taxonomy.build(CLASSES, {"platelet": ("plt",)})
