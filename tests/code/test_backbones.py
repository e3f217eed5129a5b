"""keras.applications backbones: every one builds and saves loadably; weights come from a
local file (written by the test, as no ImageNet download is possible here); frozen base +
Dense(256)-Dropout(0.5)-softmax head, then fine-tuning; warm start from a hemaflow model."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from hemaflow.backbones import BACKBONES, BASE_LAYER, build_backbone
from hemaflow.config import TrainParams
from hemaflow.errors import StageInputError
from hemaflow.tasks.train import train_model
from hemaflow.warm_start import warm_start_model
from tests.code.synthetic_wbc import CLASSES, write_dataset

RNG = np.random.default_rng(0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_backbone_builds_at_its_smallest_input(name):
    side = max(32, BACKBONES[name][2])
    model = build_backbone(name, (side, side, 3), 8)
    probs = model.predict(RNG.integers(0, 256, (2, side, side, 3)).astype("float32"), verbose=0)
    assert probs.shape == (2, 8) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert [l.name for l in model.layers[-3:]] == ["head_dense", "head_dropout", "probabilities"]
    assert model.get_layer("head_dense").units == 256 and model.get_layer("head_dropout").rate == 0.5


def test_too_small_input_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match="inception_v3 needs images of at least 75x75"):
        build_backbone("inception_v3", (64, 64, 3), 8)


def test_caffe_preprocessing_is_bgr_minus_mean_and_reloads_in_safe_mode(tmp_path):
    model = build_backbone("resnet50", (32, 32, 3), 2)
    pre = keras.Model(model.input, model.get_layer("preprocess").output)
    x = np.zeros((1, 32, 32, 3), np.float32)
    x[..., 0], x[..., 1], x[..., 2] = 200.0, 100.0, 50.0  # R, G, B
    out = pre.predict(x, verbose=0)[0, 0, 0]
    assert out == pytest.approx([50 - 103.939, 100 - 116.779, 200 - 123.68], abs=1e-3)
    mobile = build_backbone("mobilenet_v2", (32, 32, 3), 2)
    mobile.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    batch = RNG.integers(0, 256, (2, 32, 32, 3)).astype("float32")
    assert np.allclose(again.predict(batch, verbose=0), mobile.predict(batch, verbose=0), atol=1e-5)


def _base_weights_file(tmp_path: Path, legacy: bool) -> tuple[Path, list[np.ndarray]]:
    """A notop weights file for MobileNetV2 at 32 px, as a lab would keep the ImageNet one:
    the Keras 3 .weights.h5 format, or the legacy keras.applications .h5 layout."""
    keras.utils.set_random_seed(123)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    if legacy:
        from keras.src.legacy.saving import legacy_h5_format

        path = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, base)
    else:
        path = tmp_path / "mobilenet_v2_notop.weights.h5"
        base.save_weights(path)
    return path, [w.copy() for w in base.get_weights()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backbone-data")
    write_dataset(root, per_split={"train": 6, "val": 2, "test": 2}, size=48)
    return root


@pytest.mark.parametrize("legacy", [False, True], ids=["weights.h5", "legacy-h5"])
def test_transfer_learning_loads_the_local_weights_and_keeps_the_base_frozen(tmp_path, dataset, legacy):
    weights, expected = _base_weights_file(tmp_path, legacy)
    cfg = TrainParams(architecture="mobilenet_v2", image_size=32, epochs=1, batch_size=8)
    train_model(dataset, tmp_path / "model", cfg, CLASSES, seed=1, backbone_weights=weights)
    model = keras.models.load_model(tmp_path / "model" / "model.keras", safe_mode=True)
    base = model.get_layer(BASE_LAYER)
    assert all(np.array_equal(a, b) for a, b in zip(base.get_weights(), expected))  # loaded, and frozen
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["backbone_weights"]["path"] == str(weights) and summary["backbone_weights"]["frozen_first"]


def test_fine_tuning_phase_moves_the_base(tmp_path, dataset):
    weights, expected = _base_weights_file(tmp_path, legacy=False)
    cfg = TrainParams(architecture="mobilenet_v2", image_size=32, epochs=1, batch_size=8, fine_tune_epochs=1,
                      fine_tune_learning_rate=1e-3)
    result = train_model(dataset, tmp_path / "model", cfg, CLASSES, seed=1, backbone_weights=weights)
    base = keras.models.load_model(tmp_path / "model" / "model.keras").get_layer(BASE_LAYER)
    assert not all(np.array_equal(a, b) for a, b in zip(base.trainable_weights, expected))
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert result.epochs_run == 2 and summary["fine_tune_from_epoch"] == 1


def test_weights_of_another_network_are_refused_naming_the_file(tmp_path, dataset):
    other = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "densenet.weights.h5"
    other.save_weights(path)
    cfg = TrainParams(architecture="mobilenet_v2", image_size=32, epochs=1, batch_size=8)
    with pytest.raises(StageInputError, match=r"densenet\.weights\.h5: cannot load as backbone weights"):
        train_model(dataset, tmp_path / "model", cfg, CLASSES, seed=1, backbone_weights=path)
    with pytest.raises(StageInputError, match=r"missing\.h5: backbone weights file not found"):
        train_model(dataset, tmp_path / "model", cfg, CLASSES, seed=1, backbone_weights=tmp_path / "missing.h5")


# --- warm start from a hemaflow model ---------------------------------------------------

@pytest.fixture(scope="module")
def source_model(tmp_path_factory, dataset) -> Path:
    out = tmp_path_factory.mktemp("source") / "model"
    train_model(dataset, out, TrainParams(image_size=32, epochs=2, batch_size=8), CLASSES, seed=3)
    return out


def test_warm_start_new_head_copies_the_shared_classes(source_model):
    source = keras.models.load_model(source_model / "model.keras")
    classes = ("lymphocyte", "neutrophil", "blast")
    model, info = warm_start_model(source, CLASSES, classes, (32, 32, 3))
    old_k, old_b = source.get_layer("probabilities").get_weights()
    new_k, new_b = model.get_layer("probabilities").get_weights()
    assert new_k.shape[1] == 3 and info["new_classes"] == ["blast"]
    assert np.array_equal(new_k[:, 0], old_k[:, CLASSES.index("lymphocyte")])
    assert np.array_equal(new_k[:, 1], old_k[:, CLASSES.index("neutrophil")])
    shared_layer = source.layers[-3].name
    assert all(np.array_equal(a, b) for a, b in zip(model.get_layer(shared_layer).get_weights(),
                                                    source.get_layer(shared_layer).get_weights()))


def test_warm_start_trains_from_the_promoted_model(tmp_path, source_model, dataset):
    classes = ("neutrophil", "lymphocyte", "monocyte")  # a lab's smaller class list
    import pandas as pd

    df = pd.read_parquet(dataset / "dataset.parquet")
    sub = tmp_path / "data"
    sub.mkdir()
    (sub / "images").symlink_to(dataset / "images")
    df[df["label"].isin(classes)].to_parquet(sub / "dataset.parquet", index=False)
    train_model(sub, tmp_path / "model", TrainParams(image_size=32, epochs=1, batch_size=4), classes, seed=1,
                init_model=source_model)
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["warm_start"]["head"] == "new" and summary["warm_start"]["shared_classes"] == list(classes)
    assert json.loads((tmp_path / "model" / "labels.json").read_text()) == list(classes)


def test_warm_start_at_another_image_size_keeps_every_weight(tmp_path, source_model, dataset):
    """Progressive resizing: the 32 px model (convolutions + global pooling) continues at 48 px."""
    source = keras.models.load_model(source_model / "model.keras")
    model, info = warm_start_model(source, CLASSES, CLASSES, (48, 48, 3))
    assert model.input_shape == (None, 48, 48, 3) and info["resized"] == {"from_image_size": 32, "to_image_size": 48}
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), source.get_weights()))
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3)).astype("float32")
    assert np.allclose(model.predict(images, verbose=0).sum(axis=1), 1.0, atol=1e-3)
    train_model(dataset, tmp_path / "model", TrainParams(image_size=48, epochs=1, batch_size=8), CLASSES, seed=1,
                init_model=source_model)
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["warm_start"]["resized"] == {"from_image_size": 32, "to_image_size": 48}
    assert keras.models.load_model(tmp_path / "model" / "model.keras").input_shape == (None, 48, 48, 3)


def test_warm_start_refuses_a_model_whose_weights_follow_the_image_size(tmp_path, dataset):
    flat = tmp_path / "flat"  # shallow_cnn: Flatten into the softmax, so the head's kernel is sized by the image
    train_model(dataset, flat, TrainParams(architecture="shallow_cnn", kernels=4, kernel_size=3, image_size=32,
                                           epochs=1, batch_size=8), CLASSES, seed=3)
    with pytest.raises(StageInputError, match=r"model\.keras: the warm-start model takes 32x32x3 images .* cannot be "
                                              r"resized: its weights depend on the image size"):
        train_model(dataset, tmp_path / "m2", TrainParams(architecture="shallow_cnn", image_size=48, epochs=1,
                                                          batch_size=4), CLASSES, seed=1, init_model=flat)
