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
    counts = pd.read_csv(res.counts_path, index_col="image")
    assert len(counts) == 12 and list(counts.columns) == list(Params().base.classes)
    assert counts.to_numpy().sum() == (cells["flag"].fillna("") == "").sum()


def test_unreadable_image_goes_to_review(smears, model_dir, tmp_path):
    from hemaflow.tasks.classify import classify_smears

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    res = classify_smears(model_dir, [bad, smears / "fields" / "SmearField_00000.jpg"], tmp_path / "out", Params())
    review = pd.read_csv(res.review_path)
    assert list(review["reason"]) == ["unreadable_image"] and review["path"].iloc[0] == str(bad)
    assert res.n_images == 2


def test_missing_model_file_is_named(tmp_path, smears):
    from hemaflow.tasks.classify import classify_smears

    (tmp_path / "labels.json").write_text("[]")
    with pytest.raises(StageInputError, match="model.keras"):
        classify_smears(tmp_path, [smears / "fields"], tmp_path / "out", Params())
