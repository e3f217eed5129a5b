"""A person's label decisions (paths.label_corrections): applied by validate_labels, drafted from a label review."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hemaflow.config import ValidateLabelsParams
from hemaflow.errors import StageInputError
from hemaflow.label_corrections import draft_from_review, read_corrections
from hemaflow.schema import CROP_COLUMNS, MANIFEST_COLUMNS
from hemaflow.taxonomy import Taxonomy
from hemaflow.tasks.validate_labels import validate_labels

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
CFG = ValidateLabelsParams(synonyms={"neutrophil": ("sne", "bne", "seg")})
TAXONOMY = Taxonomy.build(CLASSES, CFG.synonyms)


def _row(image_id, label_raw, path=None, error=None, label_raw_2=None):
    return {"image_id": image_id, "path": path or f"images/{image_id}.jpg", "sha256": f"sha-{image_id}",
            "phash": f"{int(np.random.default_rng(sum(map(ord, image_id))).integers(0, 2**63)):016x}",
            "width": 10, "height": 10, "channels": 3, "source": "class_folders", "label_raw": label_raw,
            "label_raw_2": label_raw_2, "boxes": "[]", "split": None, "error": error}


def _manifest(tmp_path, rows) -> Path:
    p = tmp_path / "manifest.parquet"
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(p)
    return p


def _corrections(tmp_path, text: str, name="corrections.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


ROWS = [_row("a", "monocyte"), _row("b", "neutrophil"), _row("c", ""), _row("d", "lymphocyte"),
        _row("e", "monocyte", path="images/monocyte/BNE_5.jpg"), _row("f", "monocyte", error="unreadable_image: cannot decode"),
        _row("g", "eosinophil"), _row("h", "basophil")]


def test_relabel_drop_keep_and_undecided_rows(tmp_path):
    corr = _corrections(tmp_path, "path,action,label,note\n"
                                  "images/a.jpg,relabel,Lymphocytes,round nucleus\n"   # a synonym spelling
                                  "images/b.jpg,drop,,two cells in the crop\n"
                                  "images/c.jpg,relabel,basophil,\n"                   # fixes a blank label
                                  "images/monocyte/BNE_5.jpg,RELABEL,seg,\n"           # settles a prefix mismatch
                                  "images/f.jpg,relabel,monocyte,\n"                   # a file error still drops it
                                  "images/g.jpg,keep,,looked\n"
                                  "images/h.jpg,,eosinophil,model says so\n")          # undecided: not applied
    res = validate_labels(_manifest(tmp_path, ROWS), tmp_path / "labels", CFG, CLASSES, require_every_class=False,
                          corrections_path=corr)
    clean = pd.read_parquet(res.clean_path).set_index("image_id")
    assert clean["label"].to_dict() == {"a": "lymphocyte", "c": "basophil", "d": "lymphocyte", "e": "neutrophil",
                                        "g": "eosinophil", "h": "basophil"}
    assert clean.loc["a", "label_raw"] == "monocyte"  # the original label is kept next to the decision
    review = pd.read_csv(res.review_path).set_index("item")
    assert review["reason"].to_dict() == {"a": "relabelled_by_reviewer", "b": "dropped_by_reviewer",
                                          "c": "relabelled_by_reviewer", "e": "relabelled_by_reviewer",
                                          "f": "unreadable_image"}
    assert review.loc["a", "detail"] == ("label 'monocyte' -> lymphocyte by a reviewer: round nucleus "
                                         "(label corrections line 2)")
    assert review.loc["b", "detail"] == "label 'neutrophil'; dropped by a reviewer: two cells in the crop (label corrections line 3)"
    assert review.loc["c", "detail"] == "no label -> basophil by a reviewer (label corrections line 4)"
    assert res.corrections == {"relabel": 4, "drop": 1, "keep": 1, "undecided": 1}
    assert res.summary()["label corrections"] == "relabel 4, drop 1, keep 1, undecided 1"


def test_decisions_never_fail_the_strict_policy(tmp_path):
    rows = [r for r in ROWS if r["image_id"] in "abdgh"]
    corr = _corrections(tmp_path, "path,action,label\nimages/a.jpg,relabel,lymphocyte\nimages/b.jpg,drop,\n")
    res = validate_labels(_manifest(tmp_path, rows), tmp_path / "labels", CFG.model_copy(update={"on_error": "fail"}),
                          CLASSES, require_every_class=False, corrections_path=corr)
    assert res.n_clean == 4 and res.problems == {"relabelled_by_reviewer": 1, "dropped_by_reviewer": 1}


def test_a_relabel_settles_an_annotator_disagreement(tmp_path):
    rows = [_row("a", "monocyte", label_raw_2="lymphocyte"), _row("b", "neutrophil", label_raw_2="monocyte"),
            _row("d", "lymphocyte", label_raw_2="lymphocyte")]
    corr = _corrections(tmp_path, "path,action,label\nimages/a.jpg,relabel,lymphocyte\n")
    res = validate_labels(_manifest(tmp_path, rows), tmp_path / "labels", CFG, CLASSES, require_every_class=False,
                          corrections_path=corr)
    clean = pd.read_parquet(res.clean_path).set_index("image_id")
    assert clean["label"].to_dict() == {"a": "lymphocyte", "d": "lymphocyte"}
    assert res.problems == {"annotator_disagreement": 1, "relabelled_by_reviewer": 1}
    assert res.agreement["n_compared"] == 3  # agreement still measures the annotators, not the reviewer


@pytest.mark.parametrize("text, message", [
    ("path,action,label\nimages/a.jpg,relabel,cat\nimages/b.jpg,zap,\n,drop,\n",
     r"corrections\.csv: 3 bad row\(s\) in the label corrections: line 2 \(images/a\.jpg\): relabel needs a label in "
     r"the taxonomy .*got 'cat'; line 3 \(images/b\.jpg\): action 'zap' is not one of relabel, drop, keep or blank; "
     r"line 4: empty path"),
    ("path,action,label\nimages/a.jpg,relabel,lymphocyte\nimages/a.jpg,drop,\n",
     r"line 3 \(images/a\.jpg\): contradicts line 2 \(relabel lymphocyte\)"),
    ("file,decision\nimages/a.jpg,drop\n", r"corrections\.csv: label corrections lack column\(s\) path, action"),
    ("path,action,label\nimages/zz.jpg,drop,\nimages/a.jpg,relabel,lymphocyte\n",
     r"corrections\.csv: 1 label correction\(s\) name images that are not in the manifest .*line 2 \(images/zz\.jpg\)"),
    ("", r"corrections\.csv: label corrections cannot be read as CSV"),
])
def test_bad_corrections_fail_at_once_naming_file_and_line(tmp_path, text, message):
    corr = _corrections(tmp_path, text)
    with pytest.raises(StageInputError, match=message):
        validate_labels(_manifest(tmp_path, ROWS), tmp_path / "labels", CFG, CLASSES, corrections_path=corr)
    assert not (tmp_path / "labels").exists()  # nothing half-applied, nothing written


def test_missing_corrections_file_is_an_error_not_silence(tmp_path):
    with pytest.raises(StageInputError, match=r"absent\.csv: label corrections file not found.*path,action,label,note"):
        read_corrections(tmp_path / "absent.csv", TAXONOMY)
    assert read_corrections(_corrections(tmp_path, "path,action,label,note\n"), TAXONOMY) == {}


def _evaluated(tmp_path) -> tuple[Path, Path]:
    """A crops table and an eval dir with a label review and its predictions, as segment and evaluate write them."""
    crops = pd.DataFrame([
        {"crop_id": f"{s}_c0", "path": f"images/{c}/{s}_c0.png", "source_id": s, "source_sha256": "x",
         "source_path": f"images/{c}/{s}.jpg", "label": c, "x0": 0, "y0": 0, "x1": 9, "y1": 9, "mask_area": 1}
        for s, c in (("MO_1", "monocyte"), ("BNE_2", "neutrophil"), ("LY_3", "lymphocyte"))], columns=list(CROP_COLUMNS))
    table = tmp_path / "crops" / "crops.parquet"
    table.parent.mkdir()
    crops.to_parquet(table)
    ev = tmp_path / "eval"
    ev.mkdir()
    pd.DataFrame({"stage": "evaluate", "item": ["images/monocyte/MO_1_c0.png", "images/neutrophil/BNE_2_c0.png",
                                                "images/ig/EXT_9_c0.png"],
                  "path": "", "reason": "confident_disagreement",
                  "detail": ["labelled monocyte; the model says lymphocyte with probability 0.998",
                             "labelled neutrophil; the model says monocyte with probability 0.97",
                             "labelled ig; external"]}).to_csv(ev / "label_review.csv", index=False)
    pd.DataFrame({"path": ["images/monocyte/MO_1_c0.png", "images/neutrophil/BNE_2_c0.png"],
                  "label": ["monocyte", "neutrophil"], "predicted": ["lymphocyte", "monocyte"]}).to_csv(
        ev / "predictions.csv", index=False)
    return table, ev / "label_review.csv"


def test_draft_from_a_label_review_adds_undecided_rows_once(tmp_path):
    table, review = _evaluated(tmp_path)
    corr = _corrections(tmp_path, "path,action,label,note\nimages/neutrophil/BNE_2.jpg,keep,,a band: checked\n")
    counts = draft_from_review(review, table, corr)
    assert counts == {"added": 1, "already listed": 1, "not in this project's crops (skipped)": 1}
    out = pd.read_csv(corr, dtype=str, keep_default_na=False)
    assert out[["path", "action", "label"]].values.tolist() == [["images/neutrophil/BNE_2.jpg", "keep", ""],
                                                               ["images/monocyte/MO_1.jpg", "", "lymphocyte"]]
    assert out.loc[0, "note"] == "a band: checked"  # a person's row is never rewritten
    assert "probability 0.998" in out.loc[1, "note"]
    assert draft_from_review(review, table, corr)["added"] == 0
    assert read_corrections(corr, TAXONOMY)["images/monocyte/MO_1.jpg"].action == ""  # drafted = undecided


def test_label_corrections_command(tmp_path):
    table, review = _evaluated(tmp_path)
    (tmp_path / "params.yaml").write_text("paths:\n  crops_dir: crops\n  label_corrections: decisions/labels.csv\n")
    res = subprocess.run([str(Path(sys.executable).parent / "hemaflow"), "label-corrections", "--review", str(review)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "decisions/labels.csv: added 2, already listed 0, not in this project's crops (skipped) 1" in res.stdout
    assert len(pd.read_csv(tmp_path / "decisions" / "labels.csv")) == 2
    bad = subprocess.run([str(Path(sys.executable).parent / "hemaflow"), "label-corrections", "--review",
                          str(tmp_path / "nope.csv")], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "nope.csv: label review not found" in bad.stderr and "Traceback" not in bad.stderr
