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
from hemaflow.tasks.train import (augment_image, balanced_class_weights, build_optimizer, load_image,
                                  make_image_dataset, replica_batch_size, train_model)
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
    assert calls[0] == (0, CFG.epochs) and calls[-1] == (result.epochs_run, result.epochs_run)  # ends full
    assert [d for d, _ in calls[1 : result.epochs_run + 1]] == list(range(1, result.epochs_run + 1))
    assert all(t == CFG.epochs for _, t in calls[: result.epochs_run + 1])  # no budget: the epoch cap


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



# --- the training recipe: augmentation, optimisers, schedules, class weights ---------------

def _ramp(size: int = 16) -> np.ndarray:
    return np.arange(size * size * 3, dtype=np.uint8).reshape(size, size, 3)


def test_augment_image_is_reproducible_from_its_seed_and_varies_between_seeds():
    import tensorflow as tf

    img = _ramp()
    a = augment_image(img, tf.constant([1, 2])).numpy()
    assert a.dtype == np.float32 and a.shape == img.shape and a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, augment_image(img, tf.constant([1, 2])).numpy())
    views = {augment_image(img, tf.constant([s, 0])).numpy().tobytes() for s in range(8)}
    assert len(views) > 4


def test_augment_image_without_shift_or_jitter_is_a_flip_or_90_degree_rotation():
    import tensorflow as tf

    img = _ramp()
    dihedral = [np.rot90(f, k) for f in (img, img[:, ::-1]) for k in range(4)]
    seen = set()
    for s in range(24):
        out = augment_image(img, tf.constant([s, 7]), shift_frac=0.0, colour_jitter=0.0).numpy()
        match = [i for i, d in enumerate(dihedral) if np.array_equal(out, d)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 6  # all eight views occur; 24 draws see most of them


def _small_train_set(tmp_path) -> tuple[list[str], list[int]]:
    """Two 20 px train images per class on disk: paths and class indices for make_image_dataset."""
    df = write_dataset(tmp_path, {"train": 2}, size=20)
    return [str(tmp_path / p) for p in df["path"]], [CLASSES.index(c) for c in df["label"]]


def test_pipeline_streams_whole_pixel_images_with_one_hot_labels(tmp_path):
    paths, labels = _small_train_set(tmp_path)
    ds = make_image_dataset(paths, labels, 16, 4, shuffle_seed=0, n_classes=len(CLASSES),
                            augment={"shift_frac": 0.1, "colour_jitter": 0.1}, augment_seed=3)
    batches = list(ds)
    assert sum(int(x.shape[0]) for x, _ in batches) == len(paths)
    x, y = batches[0]
    assert x.dtype.name == "float32" and tuple(x.shape[1:]) == (16, 16, 3)
    assert y.shape[1] == len(CLASSES) and np.all(y.numpy().sum(axis=1) == 1)
    plain = make_image_dataset(paths, labels, 16, 100)
    x_plain, y_plain = next(iter(plain))
    np.testing.assert_array_equal(x_plain.numpy(), np.round(x_plain.numpy()))  # uint8 cache: whole values
    assert y_plain.dtype.name == "int32"  # sparse labels unless n_classes is given
    # a new random view every epoch, the same sequence for the same seed
    again = make_image_dataset(paths, labels, 16, 4, shuffle_seed=0, n_classes=len(CLASSES),
                               augment={"shift_frac": 0.1, "colour_jitter": 0.1}, augment_seed=3)
    np.testing.assert_array_equal(next(iter(again))[0].numpy(), x.numpy())
    assert not np.array_equal(list(ds)[0][0].numpy(), x.numpy())


def _lr(opt, step: int) -> float:
    lr = opt._learning_rate
    return float(lr(step)) if callable(lr) else float(lr)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = TrainParams(epochs=10, learning_rate=0.01, lr_schedule="cosine", warmup_epochs=1, optimizer="adamw",
                      weight_decay=0.05)
    opt = build_optimizer(cfg, steps_per_epoch=10)
    assert type(opt).__name__ == "AdamW" and opt.weight_decay == pytest.approx(0.05)
    assert _lr(opt, 0) == pytest.approx(0.0)
    assert _lr(opt, 5) == pytest.approx(0.005)
    assert _lr(opt, 10) == pytest.approx(0.01)
    assert _lr(opt, 55) == pytest.approx(0.005, rel=1e-3)  # half-way through the decay
    assert _lr(opt, 100) == pytest.approx(0.0, abs=1e-7)


def test_constant_schedule_with_warmup_and_sgd():
    cfg = TrainParams(epochs=4, learning_rate=0.1, warmup_epochs=1, optimizer="sgd", momentum=0.8)
    opt = build_optimizer(cfg, steps_per_epoch=4)
    assert type(opt).__name__ == "SGD" and opt.nesterov and opt.momentum == pytest.approx(0.8)
    assert _lr(opt, 2) == pytest.approx(0.05)
    assert _lr(opt, 4) == pytest.approx(0.1) and _lr(opt, 15) == pytest.approx(0.1)
    assert _lr(build_optimizer(TrainParams(learning_rate=0.1), 4), 9) == pytest.approx(0.1)


def test_balanced_class_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = [0] * 6 + [1] * 3 + [2]
    w = balanced_class_weights(labels, 4)
    np.testing.assert_allclose([w[0], w[1], w[2]], compute_class_weight("balanced", classes=np.arange(3), y=labels))
    assert w[3] == 1.0


def test_warmup_must_end_before_training_does():
    with pytest.raises(ValueError, match=r"warmup_epochs \(3.0\) must be less than epochs \(3\)"):
        TrainParams(epochs=3, warmup_epochs=3)


def test_shipped_params_files_still_load():
    from hemaflow.config import load_params

    root = Path(__file__).resolve().parents[2]
    for path in (root / "params.yaml", root / "examples" / "pbc.params.yaml", root / "examples" / "pbc64.params.yaml"):
        assert load_params(path).train.architecture in {"small_cnn", "resnet_small"}


def test_pbc64_example_differs_from_pbc_only_in_crop_network_and_outputs():
    """The 64 px recipe must read, label and split PBC exactly as the 28 px one, or the two
    README rows would not compare like with like."""
    from hemaflow.config import load_params

    root = Path(__file__).resolve().parents[2]
    a, b = (load_params(root / "examples" / f) for f in ("pbc.params.yaml", "pbc64.params.yaml"))
    for section in ("base", "ingest", "validate_labels", "split", "augment", "check_quality", "evaluate"):
        assert getattr(a, section) == getattr(b, section), section
    assert a.segment.model_copy(update={"fallback_crop_px": 256}) == b.segment
    assert (b.train.image_size, b.train.width, b.train.stem_stride, b.train.subclasses) == (64, 48, 2, "file_prefix")
    assert b.train.max_minutes <= 60 and b.promote.model_name != a.promote.model_name
    assert {p.parent for p in (b.paths.model_dir, b.paths.crops_dir)}.isdisjoint({a.paths.model_dir.parent, a.paths.crops_dir.parent})


RECIPE = TrainParams(architecture="resnet_small", width=4, depth=1, image_size=24, epochs=3, batch_size=16,
                     learning_rate=0.01, optimizer="adamw", weight_decay=0.01, label_smoothing=0.1,
                     lr_schedule="cosine", warmup_epochs=1, class_weight="balanced", online_augmentation=True,
                     precision="mixed_bfloat16", dropout=0.1, patience=3, devices="cpu")


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    write_dataset(root / "data", {"train": 6, "val": 2, "test": 2}, size=32)
    result = train_model(root / "data", root / "model", RECIPE, CLASSES, SEED)
    return root, result


def test_recipe_options_train_and_save_a_loadable_model(recipe_run):
    root, result = recipe_run
    summary = json.loads((root / "model" / "train_summary.json").read_text())
    assert summary["params"] == RECIPE.model_dump() and summary["steps_per_epoch"] == 2  # 30 rows / 16
    assert set(summary["class_weight"]) == set(CLASSES) and not summary["stopped_by_time_budget"]
    history = json.loads((root / "model" / "history.json").read_text())
    assert len(history["loss"]) == result.epochs_run == 3 and all(np.isfinite(history["loss"]))
    model = keras.models.load_model(root / "model" / "model.keras")
    assert model.name == "resnet_small" and "online_augmentation" not in [l.name for l in model.layers]
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    probs = model.predict(np.zeros((2, 24, 24, 3), np.float32), verbose=0)
    assert probs.dtype == np.float32 and probs.shape == (2, len(CLASSES))


def test_recipe_with_online_augmentation_is_reproducible(recipe_run, tmp_path):
    root, _ = recipe_run
    train_model(root / "data", tmp_path / "model", RECIPE, CLASSES, SEED)
    first = json.loads((root / "model" / "history.json").read_text())
    second = json.loads((tmp_path / "model" / "history.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert second[key] == first[key], key


def test_time_budget_stops_after_the_epoch_that_passes_it(small_data, tmp_path):
    cfg = CFG.model_copy(update={"max_minutes": 1e-6, "epochs": 5})
    result = train_model(small_data, tmp_path / "model", cfg, CLASSES, SEED)
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert result.epochs_run == 1 and summary["stopped_by_time_budget"]


def test_time_cosine_anneals_within_the_budget(tmp_path):
    """lr_schedule cosine_time: the rate falls over the wall-clock budget, however many epochs fit."""
    import pytest as _pytest

    from hemaflow.config import TrainParams as _TP
    from hemaflow.tasks.train import train_model as _train
    from tests.code.synthetic_wbc import CLASSES as _C, write_dataset as _write

    with _pytest.raises(ValueError, match="cosine_time needs max_minutes"):
        _TP(lr_schedule="cosine_time")
    _write(tmp_path / "data", per_split={"train": 8, "val": 2, "test": 1}, size=32)
    cfg = _TP(image_size=28, epochs=500, batch_size=8, learning_rate=0.01, lr_schedule="cosine_time",
              max_minutes=0.25, patience=500, warmup_epochs=1)
    calls: list[tuple[int, int]] = []
    result = _train(tmp_path / "data", tmp_path / "model", cfg, _C, seed=0, progress=lambda d, t: calls.append((d, t)))
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    lr = history["learning_rate"]
    assert result.epochs_run < 500 and sum(history["epoch_seconds"]) <= 0.25 * 60 + 5
    assert max(lr) <= 0.01 + 1e-9 and lr[-1] < 0.25 * max(lr)   # annealed by the end of the budget
    # progress counts against the epochs that fit in the budget, not the cap of 500
    assert calls[-1] == (result.epochs_run, result.epochs_run)
    assert all(t < 500 for _, t in calls[2:]) and calls[len(calls) // 2][1] <= 2 * result.epochs_run


def test_time_cosine_anneals_by_the_epoch_cap_when_it_comes_first(tmp_path):
    """A host (or GPU) fast enough to reach the epoch cap long before the time budget ends must
    still end on an annealed rate, not stop at the rate the clock had reached."""
    from hemaflow.config import TrainParams as _TP
    from hemaflow.tasks.train import train_model as _train
    from tests.code.synthetic_wbc import CLASSES as _C, write_dataset as _write

    _write(tmp_path / "data", per_split={"train": 8, "val": 2, "test": 1}, size=32)
    cfg = _TP(image_size=28, epochs=6, batch_size=8, learning_rate=0.01, lr_schedule="cosine_time",
              max_minutes=30, patience=500, warmup_epochs=1)
    result = _train(tmp_path / "data", tmp_path / "model", cfg, _C, seed=0)
    lr = json.loads((tmp_path / "model" / "history.json").read_text())["learning_rate"]
    assert result.epochs_run == 6 and max(lr) == pytest.approx(0.01, rel=1e-3)
    assert all(a >= b for a, b in zip(lr[1:], lr[2:]))  # falls after the warm-up
    assert lr[-1] < 0.01 * 0.01   # on time alone (seconds of a 30-minute budget) it would still be ~0.01
    # the hold (half of 30 minutes) never ended: the annealed last epoch is the one kept
    assert json.loads((tmp_path / "model" / "train_summary.json").read_text())["best_epoch"] == 6


def test_batched_dihedral_augmentation_gives_one_of_the_eight_views_per_image():
    import tensorflow as tf

    from hemaflow.tasks.train import augment_batch_dihedral

    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3)).astype("float32")
    out = augment_batch_dihedral(tf.constant(x), tf.constant([3, 4], tf.int64)).numpy()
    views = lambda im: [np.rot90(v, k) for v in (im, im[:, ::-1]) for k in range(4)]  # noqa: E731
    kinds = set()
    for a, b in zip(x, out):
        match = [i for i, v in enumerate(views(a)) if np.array_equal(v, b)]
        assert match, "not a flip/rotation of its input"
        kinds.add(match[0])
    assert len(kinds) >= 3  # chosen per image, not one view for the whole batch


def test_temperature_calibration_rescales_the_same_training(trained, tmp_path):
    """Same seed, same data: the calibrated model is the plain one with softmax(z / T)."""
    from hemaflow.calibration import scale_probs
    from hemaflow.tasks.train import read_dataset

    root, _, _ = trained
    train_model(root / "data", tmp_path / "cal", CFG.model_copy(update={"calibrate": "temperature"}), CLASSES, SEED)
    summary = json.loads((tmp_path / "cal" / "train_summary.json").read_text())
    cal = summary["calibration"]
    assert cal["method"] == "temperature" and cal["val_images"] > 0
    assert cal["val_log_loss_after"] <= cal["val_log_loss_before"] + 1e-4
    val = read_dataset(root / "data" / "dataset.parquet", CLASSES).query("split == 'val'")
    x = np.stack([load_image(str(root / "data" / p), CFG.image_size).numpy() for p in val["path"]])
    plain = keras.models.load_model(root / "model" / "model.keras").predict(x, verbose=0)
    calibrated = keras.models.load_model(tmp_path / "cal" / "model.keras").predict(x, verbose=0)
    np.testing.assert_allclose(calibrated, scale_probs(plain, cal["temperature"]), atol=2e-3)
    assert json.loads((root / "model" / "train_summary.json").read_text())["calibration"] is None


@pytest.mark.parametrize("schedule, after, spent, stops_at", [
    ("cosine_time", 0.5, 0.0, None),    # first half of the budget: no best, never stops
    ("cosine_time", 0.5, 400.0, 1),     # a resumed job already past half the budget stops as usual
    ("cosine_time", 0.0, 0.0, 1),
    ("cosine", 0.5, 0.0, 1),            # epoch-based schedules: plain early stopping
])
def test_early_stopping_waits_for_the_time_schedule_to_anneal(schedule, after, spent, stops_at):
    from hemaflow.tasks.train import _early_stopping

    cfg = TrainParams(epochs=50, patience=1, lr_schedule=schedule, max_minutes=10, early_stop_after=after)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    stopper = _early_stopping(cfg, "val_loss", spent)
    stopper.set_model(model)
    stopper.on_train_begin()
    stopped = None
    for epoch, loss in enumerate([1.0, 2.0, 3.0, 4.0]):
        stopper.on_epoch_end(epoch, {"val_loss": loss})
        if getattr(model, "stop_training", False) and stopped is None:
            stopped = epoch
    assert stopped == stops_at
    if stops_at is None:  # still mid-schedule: nothing to restore, the last weights are kept
        assert stopper.tracked_from is None and stopper.best_weights is None
    else:
        assert stopper.tracked_from == 1 and stopper.best == 1.0 and stopper.best_weights is not None


def test_a_dip_in_the_validation_loss_mid_schedule_is_not_the_best_epoch(monkeypatch):
    """cosine_time: an epoch that ends before early_stop_after of the budget cannot be the best
    (a 64 px PBC run kept epoch 101 of 220, at half the peak rate, for such a dip)."""
    import time as _time

    from hemaflow.tasks.train import _early_stopping

    clock = iter(range(0, 10_000, 100))  # every call to the clock: 100 s later
    monkeypatch.setattr(_time, "perf_counter", lambda: float(next(clock)))
    cfg = TrainParams(epochs=50, patience=50, lr_schedule="cosine_time", max_minutes=10, early_stop_after=0.5)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    stopper = _early_stopping(cfg, "val_loss")
    stopper.set_model(model)
    stopper.on_train_begin()                                  # t = 0; the hold lasts 300 s
    for epoch, loss in enumerate([0.5, 2.0, 1.0, 1.5]):       # epochs end at 100, 200, 300, 400 s
        stopper.on_epoch_end(epoch, {"val_loss": loss})
    assert stopper.tracked_from == 3 and stopper.best == 1.0 and stopper.best_epoch == 2


def test_any_angle_rotation_turns_each_image_about_its_centre():
    import tensorflow as tf

    from hemaflow.tasks.train import augment_batch_rotate, rotate_batch

    x = np.random.default_rng(0).integers(0, 256, (2, 9, 9, 3)).astype("float32")
    quarter = rotate_batch(tf.constant(x), tf.constant([np.pi / 2, 0.0], tf.float32)).numpy()
    assert (np.allclose(quarter[0], np.rot90(x[0], 1), atol=1e-3)
            or np.allclose(quarter[0], np.rot90(x[0], 3), atol=1e-3))  # a 90-degree turn is exact
    np.testing.assert_allclose(quarter[1], x[1], atol=1e-4)

    # a horizontal bar through the centre: its measured direction is the drawn angle, within range, per image
    bar = np.zeros((32, 33, 33, 3), np.float32)
    bar[:, 15:18, 4:29] = 255.0
    out = augment_batch_rotate(tf.constant(bar), tf.constant([5, 6], tf.int64), 30.0).numpy()[..., 0]
    angles = []
    for im in out:
        ys, xs = np.nonzero(im > 127)
        cov = np.cov(np.stack([xs - xs.mean(), ys - ys.mean()]))
        vals, vecs = np.linalg.eigh(cov)
        vx, vy = vecs[:, -1]
        angles.append(np.degrees(np.arctan(vy / vx)))
    angles = np.array(angles)
    assert np.all(np.abs(angles) <= 32) and angles.std() > 8  # uniform in +-30: sd ~17
    again = augment_batch_rotate(tf.constant(bar), tf.constant([5, 6], tf.int64), 30.0).numpy()[..., 0]
    np.testing.assert_array_equal(again, out)  # stateless: the same seed, the same views


def test_pipeline_rotation_keeps_shapes_and_is_only_for_training(tmp_path):
    paths, labels = _small_train_set(tmp_path)
    aug = {"shift_frac": 0.0, "colour_jitter": 0.0, "rotation_deg": 45.0}
    ds = make_image_dataset(paths, labels, 16, 4, shuffle_seed=0, n_classes=len(CLASSES), augment=aug, augment_seed=3)
    x, y = next(iter(ds))
    assert x.dtype.name == "float32" and tuple(x.shape[1:]) == (16, 16, 3) and y.shape[1] == len(CLASSES)
    assert float(x.numpy().min()) >= 0 and float(x.numpy().max()) <= 255
    assert aug["rotation_deg"] == 45.0  # the caller's dict is not consumed
    assert not np.array_equal(np.round(x.numpy()), x.numpy())  # bilinear: in-between values, unlike the plain cache


def test_mixup_blends_each_image_and_its_target_with_the_same_partner_and_weight():
    import tensorflow as tf

    from hemaflow.tasks.train import mixup_batch

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (32, 6, 6, 3)).astype("float32")
    y = np.eye(4, dtype="float32")[np.arange(32) % 4]
    xm, ym = (t.numpy() for t in mixup_batch(tf.constant(x), tf.constant(y), tf.constant([1, 2], tf.int64), 0.2))
    assert xm.shape == x.shape and ym.shape == y.shape
    np.testing.assert_allclose(ym.sum(1), 1.0, atol=1e-6)   # still a distribution over the classes
    mixed = 0
    for i in range(32):  # xm[i] = w x[i] + (1 - w) x[j]; the label is mixed with the same w and j
        fits = [(j, w) for j in range(32) for w in [_blend_weight(x[i], x[j], xm[i])]
                if w is not None and np.allclose(w * y[i] + (1 - w) * y[j], ym[i], atol=1e-4)]
        assert fits, f"image {i} is not a blend of two batch images matching its label"
        mixed += any(1e-3 < w < 1 - 1e-3 and j != i for j, w in fits)
    assert mixed >= 8  # Beta(0.2, 0.2) sits near 0 or 1 but not always
    again = mixup_batch(tf.constant(x), tf.constant(y), tf.constant([1, 2], tf.int64), 0.2)[0].numpy()
    np.testing.assert_array_equal(again, xm)  # stateless: the same seed, the same mix


def test_cutout_sets_one_clipped_square_per_image_to_its_mean_colour():
    import tensorflow as tf

    from hemaflow.tasks.train import cutout_batch

    x = np.random.default_rng(2).integers(0, 256, (24, 20, 20, 3)).astype("float32")
    out = cutout_batch(tf.constant(x), tf.constant([3, 4], tf.int64), 0.25).numpy()  # a 5x5 square
    areas = []
    for i in range(len(x)):
        mean = x[i].mean(axis=(0, 1))
        cut = np.all(np.isclose(out[i], mean, atol=1e-3), axis=-1)
        np.testing.assert_array_equal(out[i][~cut], x[i][~cut])  # the rest of the image is untouched
        ys, xs = np.nonzero(cut)
        assert cut.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # one axis-aligned rectangle
        assert np.ptp(ys) < 5 and np.ptp(xs) < 5
        areas.append(int(cut.sum()))
    assert 25 in areas and min(areas) < 25  # whole squares inside, clipped ones at the border
    again = cutout_batch(tf.constant(x), tf.constant([3, 4], tf.int64), 0.25).numpy()
    np.testing.assert_array_equal(again, out)  # stateless: the same seed, the same squares


def test_cutout_runs_in_the_training_pipeline_and_needs_online_augmentation(tmp_path):
    with pytest.raises(ValueError, match="cutout_frac .* needs online_augmentation"):
        TrainParams(cutout_frac=0.25)
    paths, labels = _small_train_set(tmp_path)
    aug = {"shift_frac": 0.0, "colour_jitter": 0.0, "rotation_deg": 0.0, "cutout_frac": 0.5}
    x = next(iter(make_image_dataset(paths, labels, 16, len(paths), n_classes=len(CLASSES), augment=aug)))[0].numpy()
    plain = next(iter(make_image_dataset(paths, labels, 16, len(paths), n_classes=len(CLASSES))))[0].numpy()
    assert x.shape == plain.shape and aug["cutout_frac"] == 0.5
    assert not np.array_equal(np.sort(x.ravel()), np.sort(plain.ravel()))  # pixels were replaced, not only moved


def _blend_weight(a, b, out):
    """w with out = w a + (1 - w) b (least squares), or None if no such w fits."""
    d = (a - b).ravel()
    if not d.any():
        return 1.0 if np.allclose(a, out, atol=1e-2) else None
    w = float(np.dot(out.ravel() - b.ravel(), d) / np.dot(d, d))
    return w if np.allclose(w * a + (1 - w) * b, out, atol=1e-2) else None


def test_mixup_runs_in_the_training_pipeline_and_needs_online_augmentation(tmp_path):
    with pytest.raises(ValueError, match="mixup_alpha .* needs online_augmentation"):
        TrainParams(mixup_alpha=0.2)
    paths, labels = _small_train_set(tmp_path)
    aug = {"shift_frac": 0.0, "colour_jitter": 0.0, "rotation_deg": 0.0, "mixup_alpha": 0.4}
    ds = make_image_dataset(paths, labels, 16, len(paths), shuffle_seed=0, n_classes=len(CLASSES), augment=aug)
    x, y = next(iter(ds))
    assert tuple(x.shape[1:]) == (16, 16, 3) and aug["mixup_alpha"] == 0.4
    y = y.numpy()
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-6)
    assert ((y > 1e-3) & (y < 1 - 1e-3)).any()  # soft targets: some images were blended
    plain = make_image_dataset(paths, labels, 16, len(paths), n_classes=len(CLASSES))
    assert set(np.unique(next(iter(plain))[1].numpy())) == {0.0, 1.0}  # no mixing outside training


def test_keep_last_weights_keeps_the_final_epoch_not_the_lowest_val_loss(trained, tmp_path):
    root, result, _ = trained
    cfg = CFG.model_copy(update={"keep_weights": "last", "patience": CFG.epochs})
    last = train_model(root / "data", tmp_path / "model", cfg, CLASSES, SEED)
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert last.best_epoch == last.epochs_run == summary["best_epoch"] and summary["keep_weights"] == "last"
    assert summary["lowest_monitor_epoch"] == int(np.argmin(history["val_loss"])) + 1
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    val = pd.read_parquet(root / "data" / "dataset.parquet").query("split == 'val'")
    x = np.stack([load_image(str(root / "data" / p), CFG.image_size).numpy() for p in val["path"]])
    acc = float(np.mean(model.predict(x, verbose=0).argmax(1) == [CLASSES.index(c) for c in val["label"]]))
    assert acc == pytest.approx(history["val_accuracy"][-1])  # the final epoch's weights
