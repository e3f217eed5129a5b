"""train stage: learns a small synthetic dataset, writes readable outputs, is reproducible, names bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from hemaflow.config import TrainParams
from hemaflow.errors import StageInputError
from hemaflow.tasks.train import load_image, replica_batch_size, train_model
from tests.code.synthetic_wbc import CLASSES, write_dataset

CFG = TrainParams(image_size=32, epochs=8, batch_size=8, learning_rate=0.003, patience=4)
SEED = 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_dataset(root / "data")
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "stale_from_last_run.txt").write_text("old")
    calls: list[tuple[int, int]] = []
    result = train_model(root / "data", model_dir, CFG, CLASSES, SEED, progress=lambda d, t: calls.append((d, t)))
    return root, result, calls


def test_model_learns_and_keeps_the_best_epoch(trained):
    root, result, _ = trained
    history = json.loads((root / "model" / "history.json").read_text())
    assert result.best_epoch == int(np.argmin(history["val_loss"])) + 1
    model = keras.models.load_model(root / "model" / "model.keras")
    df = pd.read_parquet(root / "data" / "dataset.parquet")

    def accuracy(split: str) -> float:
        part = df[df["split"] == split]
        x = np.stack([load_image(str(root / "data" / p), CFG.image_size).numpy() for p in part["path"]])
        pred = model.predict(x, verbose=0).argmax(axis=1)
        return float(np.mean(pred == [CLASSES.index(c) for c in part["label"]]))

    # the saved weights are those of the best epoch, not the last one
    assert accuracy("val") == pytest.approx(history["val_accuracy"][result.best_epoch - 1])
    assert accuracy("test") >= 0.7  # chance is 0.2


def test_outputs_are_complete_and_readable(trained):
    root, result, _ = trained
    model_dir = root / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "history.json", "labels.json", "model.keras", "train_summary.json", "training_curves.png"]
    assert json.loads((model_dir / "labels.json").read_text()) == list(CLASSES)
    history = json.loads((model_dir / "history.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
        assert len(history[key]) == result.epochs_run
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["n_images"] == {"train": 60, "val": 20, "test": 40}
    assert summary["params"] == CFG.model_dump() and summary["seed"] == SEED
    assert summary["images_per_second"] > 0 and summary["replicas"] == 1
    assert summary["epochs_run"] == result.epochs_run and summary["best_epoch"] == result.best_epoch
    curves = cv2.imread(str(model_dir / "training_curves.png"))
    assert curves is not None and curves.shape[0] > 300 and curves.shape[1] > 600
    assert curves.std() > 20  # drawn, not blank
    assert set(result.summary()) >= {"model", "epochs run", "best epoch", "images/s", "val_accuracy"}


def test_progress_is_reported_per_epoch(trained):
    _, result, calls = trained
    assert calls[0] == (0, CFG.epochs) and calls[-1] == (CFG.epochs, CFG.epochs)
    assert [d for d, _ in calls[1 : result.epochs_run + 1]] == list(range(1, result.epochs_run + 1))


def test_same_seed_gives_the_same_training(trained, tmp_path):
    root, result, _ = trained
    again = train_model(root / "data", tmp_path / "model", CFG, CLASSES, SEED)
    first = json.loads((root / "model" / "history.json").read_text())
    second = json.loads((tmp_path / "model" / "history.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert second[key] == first[key], key
    assert again.best_epoch == result.best_epoch


def test_crops_written_by_opencv_are_read_as_rgb(tmp_path):
    bgr = np.zeros((40, 40, 3), np.uint8)
    bgr[..., 2] = 255  # pure red, in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = load_image(str(tmp_path / "red.png"), 16).numpy()
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_allclose(rgb.mean(axis=(0, 1)), [255, 0, 0], atol=1)


@pytest.mark.parametrize(("batch", "rows", "replicas", "expected"), [
    (32, 600, 1, 32), (5, 600, 1, 5), (5, 600, 2, 6), (32, 600, 3, 33), (32, 9, 2, 8), (6, 5, 2, 4)])
def test_global_batch_splits_evenly_across_replicas(batch, rows, replicas, expected):
    assert replica_batch_size(batch, rows, replicas) == expected


# --- bad inputs: each error names the file -------------------------------------------------

@pytest.fixture
def small_data(tmp_path) -> Path:
    write_dataset(tmp_path / "data", {"train": 1, "val": 1})
    return tmp_path / "data"


def rewrite(data: Path, change) -> None:
    df = pd.read_parquet(data / "dataset.parquet")
    change(df).to_parquet(data / "dataset.parquet", index=False)


def test_missing_dataset_table(tmp_path):
    with pytest.raises(StageInputError, match=r"dataset\.parquet: augmented dataset table not found"):
        train_model(tmp_path / "nowhere", tmp_path / "model", CFG, CLASSES, SEED)


def test_label_outside_classes(small_data, tmp_path):
    rewrite(small_data, lambda df: df.assign(label=df["label"].replace("basophil", "platelet")))
    with pytest.raises(StageInputError, match=r"dataset\.parquet: 2 row\(s\) have label\(s\) not in params .*platelet"):
        train_model(small_data, tmp_path / "model", CFG, CLASSES, SEED)


def test_no_train_rows(small_data, tmp_path):
    rewrite(small_data, lambda df: df[df["split"] != "train"])
    with pytest.raises(StageInputError, match=r"dataset\.parquet: no rows with split == 'train'"):
        train_model(small_data, tmp_path / "model", CFG, CLASSES, SEED)


def test_missing_column(small_data, tmp_path):
    rewrite(small_data, lambda df: df.drop(columns=["split"]))
    with pytest.raises(StageInputError, match=r"dataset\.parquet: missing column\(s\) split"):
        train_model(small_data, tmp_path / "model", CFG, CLASSES, SEED)


def test_missing_image(small_data, tmp_path):
    (small_data / "images" / "train_monocyte_000.png").unlink()
    with pytest.raises(StageInputError, match=r"train_monocyte_000\.png: image listed in dataset\.parquet is missing"):
        train_model(small_data, tmp_path / "model", CFG, CLASSES, SEED)


def test_undecodable_image(small_data, tmp_path):
    (small_data / "images" / "val_eosinophil_000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(StageInputError, match=r"val_eosinophil_000\.png: image listed in dataset\.parquet cannot be decoded"):
        train_model(small_data, tmp_path / "model", CFG.model_copy(update={"epochs": 1}), CLASSES, SEED)


def test_model_dir_holding_the_dataset_is_not_cleared(small_data):
    with pytest.raises(StageInputError, match="contains the input"):
        train_model(small_data, small_data.parent, CFG, CLASSES, SEED)
    assert (small_data / "dataset.parquet").is_file()
