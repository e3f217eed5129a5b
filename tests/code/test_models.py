"""Model factories: shapes, the study architecture, in-model rescaling and augmentation, save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from hemaflow.models import MODEL_BUILDERS, STUDY_CNN_MIN_SIZE, build_model, build_study_cnn

RNG = np.random.default_rng(0)


def raw_batch(n: int, size: int) -> np.ndarray:
    """Raw 0-255 RGB pixels, as the model receives them from the data pipeline or a client."""
    return RNG.integers(0, 256, (n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_each_architecture_outputs_class_probabilities(name):
    model = build_model(name, (64, 64, 3), 5)
    probs = model.predict(raw_batch(3, 64), verbose=0)
    assert probs.shape == (3, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    rescale = model.get_layer("rescale")
    assert rescale.scale == pytest.approx(1 / 255)  # the saved model takes raw 0-255 pixels


def test_study_cnn_is_the_published_architecture():
    model = build_study_cnn((64, 64, 3), 5)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.activation.__name__ == "relu" for c in convs)
    kinds = [type(l).__name__ for l in model.layers if not isinstance(l, (keras.layers.InputLayer, keras.layers.Rescaling))]
    assert kinds == ["Conv2D", "MaxPooling2D"] * 4 + ["Flatten", "Dropout", "Dense"]
    assert model.get_layer("dropout").rate == 0.5
    assert model.layers[-1].activation.__name__ == "softmax"


def test_study_cnn_rejects_images_too_small_for_its_four_poolings():
    build_study_cnn((STUDY_CNN_MIN_SIZE, STUDY_CNN_MIN_SIZE, 3), 5)
    with pytest.raises(ValueError, match=f"at least {STUDY_CNN_MIN_SIZE}x{STUDY_CNN_MIN_SIZE}.*got 32x32"):
        build_study_cnn((32, 32, 3), 5)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'; choose one of: small_cnn, study_cnn"):
        build_model("resnet9000", (64, 64, 3), 5)


def test_too_few_classes_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model("small_cnn", (32, 32, 3), 1)


def test_online_augmentation_acts_only_in_training():
    model = build_model("small_cnn", (32, 32, 3), 5, online_augmentation=True)
    aug = model.get_layer("online_augmentation")
    kinds = {type(l).__name__ for l in aug.layers}
    assert kinds == {"RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation"}
    x = raw_batch(4, 32)
    np.testing.assert_array_equal(aug(x, training=False), x)
    assert not np.allclose(aug(x, training=True), x)
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
    assert "online_augmentation" not in [l.name for l in build_model("small_cnn", (32, 32, 3), 5).layers]


def test_saved_model_reloads_without_custom_objects(tmp_path):
    model = build_model("small_cnn", (32, 32, 3), 5, online_augmentation=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = raw_batch(4, 32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # about 6 s each: one real (tiny) training run
@pytest.mark.parametrize("online", [True, False])
def test_train_param_online_augmentation_reaches_the_saved_model(tmp_path, online):
    """params.yaml train.online_augmentation -> train_model -> the saved model.keras."""
    from hemaflow.config import TrainParams
    from hemaflow.tasks.train import train_model
    from tests.code.synthetic_wbc import CLASSES, write_dataset

    write_dataset(tmp_path / "data", {"train": 2, "val": 1}, size=32)
    cfg = TrainParams(image_size=32, epochs=1, batch_size=8, devices="cpu", online_augmentation=online)
    train_model(tmp_path / "data", tmp_path / "model", cfg, CLASSES, seed=0)
    saved = keras.models.load_model(tmp_path / "model" / "model.keras")
    assert ("online_augmentation" in [l.name for l in saved.layers]) is online
