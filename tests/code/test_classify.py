"""Classifying new smears with a model folder: every white cell found, labelled, counted."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hemaflow.config import Params
from hemaflow.errors import StageInputError
from hemaflow.voc import read_voc_boxes


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    from hemaflow.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("smears")
    generate_dataset(root, n_fields=12, seed=3)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real (untrained) model saved the way train writes one: model.keras + labels.json."""
    from hemaflow.models import build_model

    params = Params()
    d = tmp_path_factory.mktemp("model")
    size = params.train.image_size
    build_model("small_cnn", (size, size, 3), len(params.base.classes)).save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(list(params.base.classes)))
    return d


def test_every_cell_found_labelled_and_counted(smears, model_dir, tmp_path):
    from hemaflow.tasks.classify import classify_smears

    (smears / "fields" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    res = classify_smears(model_dir, [smears / "fields"], tmp_path, Params())
    cells = pd.read_csv(res.cells_path)
    truth = sum(len(read_voc_boxes(x)) for x in (smears / "annotations").glob("*.xml"))
    assert res.n_images == 12
    assert abs(len(cells) - truth) <= 1, (len(cells), truth)
    assert set(cells["label"]) <= set(Params().base.classes)
    assert cells["probability"].between(0, 1).all()
    classes = list(Params().base.classes)
    counts = pd.read_csv(res.counts_path, index_col="image")
    assert len(counts) == 13 and counts.index[-1] == "ALL"     # 12 images + the whole input
    assert list(counts.columns) == ["cells", *classes, *[f"{c} %" for c in classes]]
    counted = (cells["flag"].fillna("") == "").sum()
    assert counts.loc["ALL", classes].sum() == counted == counts.loc["ALL", "cells"]
    assert counts.drop(index="ALL")[classes].sum().tolist() == counts.loc["ALL", classes].tolist()
    pct = counts.loc[counts["cells"] > 0, [f"{c} %" for c in classes]].sum(axis=1)
    assert ((pct - 100).abs() <= 0.3).all()
    # top-3 per cell, in order
    assert (cells["probability"] >= cells["top2_probability"]).all()
    assert (cells["top2_probability"] >= cells["top3_probability"]).all()
    assert (cells[["label", "top2_label", "top3_label"]].nunique(axis=1) == 3).all()
    data = json.loads(res.json_path.read_text())
    assert data["overall"]["cells"] == counted and set(data["overall"]["percent"]) == set(classes)
    assert len(data["images"]) == 12 and len(data["cells"]) == len(cells) and data["unreadable"] == []
    assert data["model"]["sha256"] and res.images_per_s > 0 and res.summary()["images/s"] > 0


def test_unreadable_image_goes_to_review(smears, model_dir, tmp_path):
    from hemaflow.tasks.classify import classify_smears

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    res = classify_smears(model_dir, [bad, smears / "fields" / "SmearField_00000.jpg"], tmp_path / "out", Params())
    review = pd.read_csv(res.review_path)
    assert list(review["reason"]) == ["unreadable_image"] and review["path"].iloc[0] == str(bad)
    assert res.n_images == 2 and res.n_unreadable == 1
    counts = pd.read_csv(res.counts_path, index_col="image")
    assert str(bad) not in counts.index                      # skipped, not counted as an empty image
    assert json.loads(res.json_path.read_text())["unreadable"] == [str(bad)]


def test_overlays_draw_every_cell(smears, model_dir, tmp_path):
    import cv2

    from hemaflow.tasks.classify import classify_smears

    one = smears / "fields" / "SmearField_00001.jpg"
    res = classify_smears(model_dir, [one], tmp_path, Params(), overlays=True)
    png = res.overlay_dir / "SmearField_00001.png"
    drawn, original = cv2.imread(str(png)), cv2.imread(str(one))
    assert drawn.shape == original.shape and (drawn != original).any()


def test_cli_classifies_with_the_production_model_from_the_store(smears, model_dir, tmp_path):
    """`hemaflow classify --model production` pulls from the store, verifies, loads safe_mode."""
    import subprocess
    import sys

    from hemaflow.store import open_store

    store = open_store(str(tmp_path / "registry"))
    mv = store.publish("wbc", {"model.keras": model_dir / "model.keras", "labels.json": model_dir / "labels.json"},
                       {"params": {"segment": Params().segment.model_dump(mode="json")}})
    store.set_production("wbc", mv.version, expected=None)
    cmd = [str(Path(sys.executable).parent / "hemaflow"), "classify", str(smears / "fields" / "SmearField_00002.jpg"),
           "--model", "production", "--store-url", str(tmp_path / "registry"), "--model-name", "wbc",
           "--out", str(tmp_path / "out"), "--params", str(tmp_path / "none.yaml")]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"wbc v0001 (production)" in res.stdout and "images/s:" in res.stdout and "cells/s:" in res.stdout
    assert "layout: smear (each cell's box)" in res.stdout and "test-time augmentation: False" in res.stdout
    assert (tmp_path / "models" / "pulled" / "wbc-production" / "card.json").is_file()
    assert (tmp_path / "out" / "results.json").is_file()

    # tampered in the store: refused with a clear message, no traceback
    data = (model_dir / "model.keras").read_bytes()
    (store.root_dir / "wbc" / "v0001" / "model.keras").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 1 and "sha256 mismatch" in res.stderr and "Traceback" not in res.stderr


def test_missing_model_file_is_named(tmp_path, smears):
    from hemaflow.tasks.classify import classify_smears

    (tmp_path / "labels.json").write_text("[]")
    with pytest.raises(StageInputError, match="model.keras"):
        classify_smears(tmp_path, [smears / "fields"], tmp_path / "out", Params())


def test_classes_without_a_nucleus_are_named_in_a_warning(smears, tmp_path):
    """A wbc/rbc/platelet model (examples/bccd.params.yaml) counts only what the white-cell
    detector finds: results.json and the summary say which classes it cannot count."""
    from hemaflow.models import build_model
    from hemaflow.tasks.classify import classify_smears, undetected_classes

    assert undetected_classes(("neutrophil", "Platelets", "erythroblast", "RBC")) == ["Platelets", "RBC"]
    d = tmp_path / "model"
    d.mkdir()
    size = Params().train.image_size
    build_model("small_cnn", (size, size, 3), 3).save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(["wbc", "rbc", "platelet"]))
    res = classify_smears(d, [smears / "fields" / "SmearField_00000.jpg"], tmp_path / "out", Params())
    warnings = json.loads(res.json_path.read_text())["warnings"]
    assert len(warnings) == 1 and "rbc, platelet" in warnings[0] and "nucleated" in warnings[0]
    assert res.summary()["warning 1"] == warnings[0]


def test_white_cell_model_has_no_warning(smears, model_dir, tmp_path):
    from hemaflow.tasks.classify import classify_smears

    res = classify_smears(model_dir, [smears / "fields" / "SmearField_00000.jpg"], tmp_path, Params())
    assert json.loads(res.json_path.read_text())["warnings"] == [] and "warning 1" not in res.summary()


# --- single-cell images (PBC-style): classify cuts them as the segment stage cut the training crops ---

def _single_cell_project(smears: Path, tmp_path: Path, crop: str) -> tuple[Path, Params, list[Path]]:
    """Generated fields filed as class-folder images (one labelled, centred cell each), and
    params of a model trained on them: segment mode single_cell, `crop` as single_cell_crop."""
    import shutil

    from hemaflow.schema import CLEAN_COLUMNS
    from hemaflow.tasks.segment import segment_images

    raw = tmp_path / "raw"
    rows, images = [], []
    for k, src in enumerate(sorted((smears / "fields").glob("SmearField_*.jpg"))[:6]):
        cls = Params().base.classes[k % 3]
        dest = raw / "images" / cls / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
        images.append(dest)
        row = dict.fromkeys(CLEAN_COLUMNS)
        row.update(image_id=f"{cls}/{src.stem}", path=f"images/{cls}/{src.name}", sha256="0" * 64,
                   source="class_folders", boxes="[]", label=cls, label_raw=cls)
        rows.append(row)
    clean = tmp_path / "clean.parquet"
    pd.DataFrame(rows, columns=list(CLEAN_COLUMNS)).to_parquet(clean)
    params = Params()
    params = params.model_copy(update={
        "ingest": params.ingest.model_copy(update={"reader": "class_folders"}),
        "segment": params.segment.model_copy(update={"mode": "auto", "single_cell_crop": crop,
                                                     "fallback_crop_px": 160})})
    segment_images(clean, raw, tmp_path / "crops", params.segment)
    return tmp_path / "crops", params, images


@pytest.mark.parametrize(("crop", "tta"), [("centre", True), ("detection", False)])
def test_single_cell_images_get_the_answers_evaluate_gives(smears, model_dir, tmp_path, crop, tta):
    """The same model on the same image: classify's top class and probability are evaluate's
    on the stage's crop (same crop, same pixels, same test-time augmentation). Cutting a
    PBC image's cell out of its background instead turned a 0.99 model into a 0.49 one."""
    from hemaflow.model_folder import open_model_folder
    from hemaflow.tasks.classify import classify_smears
    from hemaflow.tasks.evaluate import predict_paths

    crops_dir, params, images = _single_cell_project(smears, tmp_path, crop)
    table = pd.read_parquet(crops_dir / "crops.parquet")
    folder = open_model_folder(model_dir)
    probs = predict_paths(folder, [str(crops_dir / p) for p in table["path"]], list(table["label"]), tta=tta)
    expected = {str(tmp_path / "raw" / s): (folder.classes[int(p.argmax())], float(p.max()))
                for s, p in zip(table["source_path"], probs)}

    res = classify_smears(model_dir, [tmp_path / "raw" / "images"], tmp_path / "out", params, tta=tta)
    cells = pd.read_csv(res.cells_path)
    assert len(cells) == len(images) == len(expected), "one cell per single-cell image"
    for row in cells.itertuples():
        label, p = expected[row.image]
        assert (row.label, row.probability) == (label, pytest.approx(p, abs=6e-5)), row.image
    data = json.loads(res.json_path.read_text())
    assert data["layout"] == "single_cell" and data["tta"] is tta and data["model"]["trained_on"] == "single_cell"
    assert data["crop"] == f"single_cell_crop: {crop}" and res.summary()["layout"].startswith("single_cell")
    if crop == "centre":  # the centred window, whatever the image holds
        assert ((cells["x1"] - cells["x0"]) == 160).all() and pd.read_csv(res.review_path).empty
    else:  # the other cells of a field are listed for review, never counted
        review = pd.read_csv(res.review_path)
        assert set(review["reason"]) <= {"secondary_cell", "centre_crop_fallback"} and len(review) > 0


def test_smears_with_a_model_of_centred_windows_get_windows(smears, model_dir, tmp_path):
    """A model trained on centred single-cell windows (PBC) sees each cell of a smear through
    the same window, and the platelet warning does not apply to single-cell images."""
    from hemaflow.tasks.classify import classify_smears

    _, params, images = _single_cell_project(smears, tmp_path, "centre")
    res = classify_smears(model_dir, [images[0]], tmp_path / "smear", params, layout="smear")
    data = json.loads(res.json_path.read_text())
    assert data["layout"] == "smear" and data["crop"] == "a centred 160 px window per cell"
    assert res.n_cells >= 1 and data["model"]["trained_on"] == "single_cell"


def test_layout_follows_what_the_model_was_trained_on():
    from hemaflow.tasks.classify import trained_layout

    def layout(mode: str, reader: str) -> str:
        p = Params()
        return trained_layout(p.model_copy(update={"segment": p.segment.model_copy(update={"mode": mode}),
                                                   "ingest": p.ingest.model_copy(update={"reader": reader})}))

    assert layout("auto", "class_folders") == "single_cell" and layout("auto", "medmnist") == "single_cell"
    assert layout("auto", "voc_fields") == "smear" and layout("auto", "auto") == "smear"
    assert layout("fields", "class_folders") == "smear" and layout("single_cell", "auto") == "single_cell"
    # BCCD's cell-type model: trained on annotated boxes as single-cell items, used on whole smears
    assert layout("single_cell", "voc_fields") == "smear"


def test_unknown_layout_is_refused(smears, model_dir, tmp_path):
    from hemaflow.tasks.classify import classify_smears

    with pytest.raises(StageInputError, match="unknown layout"):
        classify_smears(model_dir, [smears / "fields"], tmp_path, Params(), layout="field")
