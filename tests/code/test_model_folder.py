"""The one model-folder loader shared by evaluate, promote and classify."""

from __future__ import annotations

import json

import keras
import pytest

from hemaflow.errors import StageInputError
from hemaflow.model_folder import open_model_folder, sha256_file


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    model.save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    return d


def _card(d, **files):
    (d / "card.json").write_text(json.dumps({"files": files}))


def test_opens_checks_and_loads(model_dir):
    _card(model_dir, **{"model.keras": {"sha256": sha256_file(model_dir / "model.keras")},
                        "labels.json": {"sha256": sha256_file(model_dir / "labels.json")}})
    folder = open_model_folder(model_dir)
    assert folder.classes == ("a", "b", "c") and folder.image_size == 8
    assert folder.sha256 == sha256_file(model_dir / "model.keras")


def test_tampered_file_is_refused_before_loading(model_dir):
    _card(model_dir, **{"model.keras": {"sha256": sha256_file(model_dir / "model.keras")}})
    with open(model_dir / "model.keras", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(StageInputError, match=r"model.keras: sha256 mismatch.*refusing to load"):
        open_model_folder(model_dir)


def test_card_naming_a_file_outside_is_refused(model_dir):
    _card(model_dir, **{"../x": {"sha256": "0" * 64}})
    with pytest.raises(StageInputError, match="outside the model folder"):
        open_model_folder(model_dir)


def test_class_count_must_match_the_model(model_dir):
    (model_dir / "labels.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(StageInputError, match="lists 2 classes but the model outputs 3"):
        open_model_folder(model_dir).load()


def test_empty_model_file_names_it(model_dir):
    (model_dir / "model.keras").write_bytes(b"")
    with pytest.raises(StageInputError, match="model.keras: model file is empty"):
        open_model_folder(model_dir)
