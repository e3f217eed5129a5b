"""train.subclasses: subtypes from file names are trained as classes and summed back into params' classes."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from hemaflow import subclasses
from hemaflow.config import TrainParams
from hemaflow.subclasses import class_sum_matrix, file_prefix, subtype_labels, subtype_list
from hemaflow.tasks.train import load_image, train_model
from hemaflow.warm_start import HEAD, warm_start_model
from tests.code.synthetic_wbc import CLASSES, write_dataset


def test_file_prefix_reads_the_letters_before_the_first_underscore():
    assert file_prefix("ig/MMY_261923") == "MMY"
    assert file_prefix("neutrophil/bne_12") == "BNE"
    assert file_prefix("platelet\\PLATELET_89526") == "PLATELET"
    assert file_prefix("lymphocyte/0001") is None and file_prefix("x/12_3") is None


def test_rare_or_missing_prefixes_fall_back_to_the_class():
    labels = ["ig"] * 12 + ["ig", "neutrophil", "neutrophil"]
    ids = [f"ig/MMY_{i}" for i in range(12)] + ["ig/PMY_1", "neutrophil/17", "neutrophil/SNE_3"]
    fine = subtype_labels(labels, ids)
    assert fine == ["ig:MMY"] * 12 + ["ig", "neutrophil", "neutrophil"]  # PMY, SNE: 1 image < 10
    # only rows counted in (the train split) make a subtype common enough
    assert subtype_labels(labels, ids, [i < 5 for i in range(15)])[:12] == ["ig"] * 12
    assert subtype_list(fine, ("neutrophil", "ig")) == ("neutrophil", "ig", "ig:MMY")


def test_class_sum_matrix_maps_each_subtype_to_its_class():
    m = class_sum_matrix(("a:X", "a:Y", "b"), ("a", "b"))
    np.testing.assert_array_equal(m, [[1, 0], [1, 0], [0, 1]])


def test_training_on_subtypes_saves_a_model_over_params_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(subclasses, "MIN_SUBTYPE_IMAGES", 2)
    data = tmp_path / "data"
    write_dataset(data, {"train": 6, "val": 2, "test": 2}, size=32)
    df = pd.read_parquet(data / "dataset.parquet")
    neut = df["label"] == "neutrophil"
    df.loc[neut, "source_id"] = [f"neutrophil/{'BNE' if i % 2 else 'SNE'}_{i}" for i in range(int(neut.sum()))]
    df.to_parquet(data / "dataset.parquet", index=False)
    cfg = TrainParams(image_size=24, epochs=3, batch_size=8, subclasses="file_prefix", calibrate="temperature")
    train_model(data, tmp_path / "model", cfg, CLASSES, 3)

    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["subtypes_train"]["neutrophil:BNE"] == 3 and summary["subtypes_train"]["neutrophil:SNE"] == 3
    assert len(summary["subtypes_train"]) == len(CLASSES) + 1  # the others: one SRC subtype each
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert len(history["val_class_accuracy"]) == 3  # the accuracy evaluate will report, per epoch
    assert all(c >= a for c, a in zip(history["val_class_accuracy"], history["val_accuracy"]))
    assert json.loads((tmp_path / "model" / "labels.json").read_text()) == list(CLASSES)
    model = keras.models.load_model(tmp_path / "model" / "model.keras", safe_mode=True)
    assert model.get_layer(HEAD).units == len(CLASSES) + 1
    summed = model.get_layer(subclasses.CLASS_SUM)
    assert not summed.trainable and summed.kernel.shape == (len(CLASSES) + 1, len(CLASSES))
    cal = summary["calibration"]  # fitted on the classes the model reports, not the subtypes
    assert cal["val_images"] == 2 * len(CLASSES) and cal["val_log_loss_after"] <= cal["val_log_loss_before"] + 1e-4
    x = np.stack([load_image(str(data / p), 24).numpy() for p in df["path"][:6]])
    probs = model.predict(x, verbose=0)
    assert probs.shape == (6, len(CLASSES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    # a later warm start to other classes puts its new head where the subtype softmax was
    warm, info = warm_start_model(model, CLASSES, ("neutrophil", "blast"), (24, 24, 3))
    assert info["head"] == "new" and subclasses.CLASS_SUM not in [layer.name for layer in warm.layers]
    assert warm.output.shape[-1] == 2


def test_unknown_subclass_mode_is_a_config_error():
    with pytest.raises(ValueError, match="subclasses"):
        TrainParams(subclasses="folder")
