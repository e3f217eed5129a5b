"""evaluate stage: metrics match the predictions, files are readable, model behaves, bad inputs are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from hemaflow.config import EvaluateParams, TrainParams
from hemaflow.errors import StageInputError
from hemaflow.tasks.evaluate import PREDICTION_COLUMNS, evaluate_model, score_predictions
from hemaflow.tasks.train import load_image, train_model
from tests.code.synthetic_wbc import CLASSES, write_dataset

TEST_CFG = EvaluateParams(split="test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    write_dataset(root / "data")
    train_model(root / "data", root / "model", TrainParams(image_size=32, epochs=8, batch_size=8, learning_rate=0.003),
                CLASSES, seed=7)
    return root


@pytest.fixture(scope="module")
def evaluated(trained):
    return trained, evaluate_model(trained / "model", trained / "data", trained / "eval", TEST_CFG)


def test_metrics_file_is_complete_and_well_above_chance(evaluated):
    root, result = evaluated
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 40 == result.n
    assert metrics["accuracy"] >= 0.7 and metrics["balanced_accuracy"] >= 0.7  # chance is 0.2
    assert set(metrics["per_class"]) == set(CLASSES)
    for m in metrics["per_class"].values():
        assert m["support"] == 8 and set(m) == {"precision", "recall", "f1", "support", "auc"}
        assert 0.5 < m["auc"] <= 1
    assert metrics["macro_auc"] == pytest.approx(np.mean([m["auc"] for m in metrics["per_class"].values()]))
    assert 0 <= metrics["ece"] <= 1 and metrics["top3_accuracy"] >= metrics["accuracy"]
    from hemaflow.model_folder import sha256_file
    assert metrics["model_sha256"] == sha256_file(root / "model" / "model.keras")
    assert sum(metrics["error_rank_counts"].values()) == round((1 - metrics["accuracy"]) * 40)
    assert metrics["macro_f1"] == pytest.approx(np.mean([m["f1"] for m in metrics["per_class"].values()]))


def test_predictions_and_confusion_agree_with_metrics(evaluated):
    root, result = evaluated
    preds = pd.read_csv(root / "eval" / "predictions.csv")
    assert tuple(preds.columns) == PREDICTION_COLUMNS and len(preds) == 40
    assert set(preds["predicted"]) <= set(CLASSES)
    assert preds["confidence"].between(1 / len(CLASSES), 1).all()
    assert (preds["label"] == preds["predicted"]).mean() == pytest.approx(result.metrics["accuracy"])
    cm = pd.read_csv(root / "eval" / "confusion.csv", index_col="true")
    assert list(cm.index) == list(CLASSES) == list(cm.columns)
    assert cm.values.sum() == 40 and np.trace(cm.values) / 40 == pytest.approx(result.metrics["accuracy"])


def test_label_review_lists_the_confident_errors_of_the_run(evaluated):
    root, _ = evaluated
    preds = pd.read_csv(root / "eval" / "predictions.csv")
    review = pd.read_csv(root / "eval" / "label_review.csv")
    sure = preds[(preds["label"] != preds["predicted"]) & (preds["confidence"] >= TEST_CFG.label_review_confidence)]
    assert sorted(review["item"]) == sorted(sure["path"])
    assert json.loads((root / "eval" / "metrics.json").read_text())["label_review"] == len(sure)


def test_label_review_keeps_only_errors_called_surely(tmp_path):
    """A sure error is listed with both probabilities; an unsure error and a sure right call are not."""
    from hemaflow.tasks.evaluate import SplitPredictions, write_label_review

    pred = SplitPredictions(paths=["images/a/1.png", "images/b/2.png", "images/a/3.png"], labels=["a", "b", "a"],
                            classes=("a", "b"), probs=np.array([[0.02, 0.98], [0.6, 0.4], [0.99, 0.01]]))
    df = write_label_review(pred, tmp_path / "data", 0.95, tmp_path / "label_review.csv")
    assert list(df["item"]) == ["images/a/1.png"] and df["reason"][0] == "confident_disagreement"
    assert df["path"][0] == str(tmp_path / "data" / "images/a/1.png")
    assert "labelled a" in df["detail"][0] and "says b with probability 0.980" in df["detail"][0]
    assert "(a: 0.020)" in df["detail"][0]
    assert pd.read_csv(tmp_path / "label_review.csv").equals(df)
    empty = write_label_review(pred, tmp_path, 0.999, tmp_path / "none.csv")
    assert empty.empty and (tmp_path / "none.csv").read_text().strip()  # header only, still a file for DVC
    assert cv2.imread(str(tmp_path / "label_review.png")) is not None
    assert cv2.imread(str(tmp_path / "none.png")) is not None  # a sheet that says there is nothing to check


def test_label_review_sheet_shows_the_source_image_with_the_crop_outlined(tmp_path):
    """A crop can hide what its label refers to, so the sheet shows the whole source image with the
    crop box drawn in, and the review row names the source and the box. A crop the table does not
    know, or whose source is gone, is shown as the crop."""
    from hemaflow.tasks.evaluate import CropSources, SplitPredictions, write_label_review

    raw, data = tmp_path / "raw", tmp_path / "data"
    source = np.full((300, 300, 3), (60, 40, 200), np.uint8)             # a red field ...
    cv2.circle(source, (150, 150), 75, (200, 60, 60), -1)                 # ... with a blue cell filling the crop
    (raw / "images" / "a").mkdir(parents=True)
    cv2.imwrite(str(raw / "images" / "a" / "1.jpg"), source)
    for name in ("1_c0.png", "2_c0.png"):
        (data / "images" / "a").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(data / "images" / "a" / name), source[100:200, 100:200])
    pd.DataFrame({"path": ["images/a/1_c0.png"], "source_path": ["images/a/1.jpg"], "x0": [100], "y0": [100],
                  "x1": [200], "y1": [200]}).to_parquet(tmp_path / "crops.parquet")
    pred = SplitPredictions(paths=["images/a/1_c0.png", "images/a/2_c0.png"], labels=["a", "a"], classes=("a", "b"),
                            probs=np.array([[0.01, 0.99], [0.03, 0.97]]))
    df = write_label_review(pred, data, 0.95, tmp_path / "eval" / "label_review.csv",
                            CropSources(tmp_path / "crops.parquet", raw))
    detail = dict(zip(df["item"], df["detail"]))
    assert f"source {raw / 'images/a/1.jpg'}, crop box (100, 100, 200, 200)" in detail["images/a/1_c0.png"]
    assert "source" not in detail["images/a/2_c0.png"]
    sheet = cv2.imread(str(tmp_path / "eval" / "label_review.png"))
    assert sheet is not None and sheet.shape[1] >= 2 * 240
    green = (sheet[..., 1] > 150) & (sheet[..., 0] < 60) & (sheet[..., 2] < 60)   # the crop box
    assert green.sum() > 200
    tiles = sheet[26:26 + 240 + 8]
    assert tiles.shape[0] > 200
    def red(tile):
        return (np.abs(tile.astype(int) - (60, 40, 200)) < 30).all(axis=-1).sum()

    first, second = tiles[:, 4:244], tiles[:, 248:488]                  # most confident (the known crop) first
    assert red(first) > 20_000 and red(second) < 500                    # the field around the cell; the crop is all cell


def test_label_review_tile_of_an_annotated_object_shows_its_whole_field(tmp_path):
    """A crop of one annotated object ('field.png#x0,y0,x1,y1', as the VOC reader writes it) has its
    box relative to the object's region: the tile is the whole field, the object's box in orange and
    the crop shifted into field coordinates in green."""
    from hemaflow.tasks.evaluate import CropSources

    cv2.imwrite(str(tmp_path / "field.png"), np.full((120, 160, 3), 255, np.uint8))
    tile = CropSources(tmp_path / "none.parquet", tmp_path).tile(tmp_path / "crop.png",
                                                                 ("field.png#40,30,100,90", (10, 10, 50, 50)))
    assert tile.shape == (120, 160, 3)
    green = (tile[..., 1] == 170) & (tile[..., 0] == 0) & (tile[..., 2] == 0)
    orange = (tile[..., 1] == 140) & (tile[..., 2] == 255) & (tile[..., 0] == 0)
    ys, xs = np.nonzero(green)                                          # lines 2 px thick: +-1 px
    assert np.allclose((xs.min(), ys.min(), xs.max(), ys.max()), (50, 40, 89, 79), atol=1)
    ys, xs = np.nonzero(orange)
    assert np.allclose((xs.min(), ys.min(), xs.max(), ys.max()), (40, 30, 99, 89), atol=1)
    gone = CropSources(tmp_path / "none.parquet", tmp_path).tile(tmp_path / "crop.png", ("missing.png", (0, 0, 5, 5)))
    assert gone.shape == (8, 8, 3)      # neither source nor crop readable: a blank tile, not a failed evaluate


@pytest.mark.parametrize("picture", ["confusion_matrix.png", "reliability_diagram.png", "error_gallery.png",
                                     "error_ranks.png"])
def test_pictures_are_real_plots(evaluated, picture):
    root, _ = evaluated
    img = cv2.imread(str(root / "eval" / picture))
    assert img is not None and min(img.shape[:2]) > 200 and img.std() > 20


def test_reliability_csv_matches_ece(evaluated):
    root, _ = evaluated
    bins = pd.read_csv(root / "eval" / "reliability.csv")
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    used = bins[bins["images"] > 0]
    ece = float((used["images"] / used["images"].sum() * (used["accuracy"] - used["confidence"]).abs()).sum())
    assert bins["images"].sum() == 40 and ece == pytest.approx(metrics["ece"])


def test_tta_averages_the_eight_views(trained, tmp_path):
    """TTA probabilities are exactly the mean over the 8 flips/rotations of each crop."""
    from hemaflow.tasks.evaluate import predict_split

    plain = predict_split(trained / "model", trained / "data", "test")
    tta = predict_split(trained / "model", trained / "data", "test", tta=True)
    df = pd.read_parquet(trained / "data" / "dataset.parquet")
    x = np.stack([load_image(str(trained / "data" / p), 32).numpy() for p in df[df["split"] == "test"]["path"]])
    model = keras.models.load_model(trained / "model" / "model.keras")
    views = [x, x[:, ::-1], x[:, :, ::-1]] + [np.rot90(v, k, axes=(1, 2)) for v in (x, x[:, :, ::-1]) for k in (1, 2, 3)]
    views = views[:1] + views[3:6] + [views[2]] + views[6:]  # 8 distinct dihedral views
    expected = np.mean([model.predict(np.ascontiguousarray(v), verbose=0) for v in views], axis=0)
    assert np.allclose(tta.probs, expected, atol=1e-5)
    assert not np.allclose(tta.probs, plain.probs)
    result = evaluate_model(trained / "model", trained / "data", tmp_path / "eval", EvaluateParams(split="test", tta=True))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["tta"] is True and result.metrics["tta"]


def test_external_test_folder_is_prepared_like_training_and_drops_seen_images(trained, tmp_path):
    """--test-data: a class-folder layout goes through ingest/validate/segment; an image that is
    also in the training data is dropped and counted, never scored."""
    from hemaflow.config import IngestParams, Params, SegmentParams
    from hemaflow.model_folder import sha256_file

    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    df = pd.read_parquet(data / "dataset.parquet")
    first_train = df.index[df["split"] == "train"][0]
    df.loc[first_train, "source_sha256"] = sha256_file(data / df.loc[first_train, "path"])  # as ingest records it
    df.to_parquet(data / "dataset.parquet", index=False)
    ext = tmp_path / "external"
    for _, row in df[df["split"] == "test"].iterrows():
        (ext / "images" / row["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(trained / "data" / row["path"], ext / "images" / row["label"] / Path(row["path"]).name)
    seen = df[df["split"] == "train"].iloc[0]
    shutil.copy(trained / "data" / seen["path"], ext / "images" / seen["label"] / "seen.png")
    params = Params(ingest=IngestParams(reader="class_folders"),
                    segment=SegmentParams(mode="single_cell", single_cell_crop="centre", fallback_crop_px=96,
                                          crop_size=32))
    result = evaluate_model(trained / "model", data, tmp_path / "eval", TEST_CFG, test_data=ext, params=params)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    e = metrics["external"]
    assert e["dropped_seen_in_training"] == 1 and e["n"] == 40 and e["images"] == 41
    assert abs(e["accuracy"] - metrics["accuracy"]) <= 0.15   # same images, re-cropped from the files
    assert (tmp_path / "eval" / "external" / "confusion_matrix.png").is_file()
    assert (tmp_path / "eval" / "external" / "label_review.csv").is_file()
    assert "external" in result.markdown and result.summary()["external n"] == 40


def test_summary_and_markdown(evaluated):
    _, result = evaluated
    assert result.summary()["split"] == "test" and result.summary()["images"] == 40
    md = result.markdown
    assert "| class | precision | recall | F1 | AUC | support |" in md and "ECE" in md
    assert all(f"| {c} |" in md for c in CLASSES)


def test_re_evaluation_is_identical(evaluated, tmp_path):
    root, _ = evaluated
    evaluate_model(root / "model", root / "data", tmp_path / "eval", TEST_CFG)
    assert (tmp_path / "eval" / "metrics.json").read_text() == (root / "eval" / "metrics.json").read_text()
    assert (tmp_path / "eval" / "predictions.csv").read_text() == (root / "eval" / "predictions.csv").read_text()


def test_horizontal_flip_keeps_the_predicted_class(trained):
    """Cells have no left or right: a mirrored crop is the same cell."""
    df = pd.read_parquet(trained / "data" / "dataset.parquet")
    test = df[df["split"] == "test"]
    model = keras.models.load_model(trained / "model" / "model.keras")
    x = np.stack([load_image(str(trained / "data" / p), 32).numpy() for p in test["path"]])
    same = model.predict(x, verbose=0).argmax(1) == model.predict(tf.image.flip_left_right(x), verbose=0).argmax(1)
    assert same.mean() >= 0.8


def test_scores_match_hand_computed_values():
    overall, per_class, cm = score_predictions(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 0]), ("a", "b", "c"))
    assert overall["accuracy"] == pytest.approx(4 / 6)
    assert overall["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert per_class["a"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                              "f1": pytest.approx(2 / 3), "support": 3}
    assert per_class["c"]["recall"] == 0 and per_class["c"]["support"] == 1
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


# --- bad inputs: each error names the file -------------------------------------------------

@pytest.fixture
def copy(trained, tmp_path) -> Path:
    shutil.copytree(trained / "model", tmp_path / "model")
    shutil.copytree(trained / "data", tmp_path / "data")
    return tmp_path


def test_missing_model(copy):
    (copy / "model" / "model.keras").unlink()
    with pytest.raises(StageInputError, match=r"model\.keras: trained model not found"):
        evaluate_model(copy / "model", copy / "data", copy / "eval", TEST_CFG)


def test_missing_labels(copy):
    (copy / "model" / "labels.json").unlink()
    with pytest.raises(StageInputError, match=r"labels\.json: class labels file not found"):
        evaluate_model(copy / "model", copy / "data", copy / "eval", TEST_CFG)


def test_labels_not_matching_the_model(copy):
    (copy / "model" / "labels.json").write_text(json.dumps([*CLASSES, "platelet"]))
    with pytest.raises(StageInputError, match=r"labels\.json: lists 6 classes but the model outputs 5"):
        evaluate_model(copy / "model", copy / "data", copy / "eval", TEST_CFG)


def test_corrupt_model_file(copy):
    (copy / "model" / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(StageInputError, match=r"model\.keras: cannot be loaded as a Keras model"):
        evaluate_model(copy / "model", copy / "data", copy / "eval", TEST_CFG)


def test_missing_dataset(copy):
    (copy / "data" / "dataset.parquet").unlink()
    with pytest.raises(StageInputError, match=r"dataset\.parquet: augmented dataset table not found"):
        evaluate_model(copy / "model", copy / "data", copy / "eval", TEST_CFG)


def test_dataset_label_unknown_to_the_model(copy):
    df = pd.read_parquet(copy / "data" / "dataset.parquet")
    df.loc[df.index[-1], "label"] = "myeloblast"
    df.to_parquet(copy / "data" / "dataset.parquet", index=False)
    expected = r"dataset\.parquet: 1 row\(s\) have label\(s\) not in the model's labels\.json .*myeloblast"
    with pytest.raises(StageInputError, match=expected):
        evaluate_model(copy / "model", copy / "data", copy / "eval", TEST_CFG)


def test_empty_split(copy):
    df = pd.read_parquet(copy / "data" / "dataset.parquet")
    df[df["split"] != "val"].to_parquet(copy / "data" / "dataset.parquet", index=False)
    with pytest.raises(StageInputError, match=r"dataset\.parquet: no rows with split == 'val'"):
        evaluate_model(copy / "model", copy / "data", copy / "eval", EvaluateParams(split="val"))


def test_undecodable_test_image(copy):
    (copy / "data" / "images" / "test_lymphocyte_003.png").write_bytes(b"garbage")
    with pytest.raises(StageInputError, match=r"test_lymphocyte_003\.png: image listed in dataset\.parquet cannot be decoded"):
        evaluate_model(copy / "model", copy / "data", copy / "eval", TEST_CFG)
