"""Model factories: shapes, the study architecture, in-model rescaling and augmentation, save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from hemaflow.backbones import BACKBONES
from hemaflow.models import (LENET_MIN_SIZE, MODEL_BUILDERS, STUDY_CNN_MIN_SIZE, build_lenet, build_model,
                             build_resnet_small, build_shallow_cnn, build_study_cnn, build_study_resnet)

RNG = np.random.default_rng(0)


def raw_batch(n: int, size: int) -> np.ndarray:
    """Raw 0-255 RGB pixels, as the model receives them from the data pipeline or a client."""
    return RNG.integers(0, 256, (n, size, size, 3)).astype("float32")


OWN = sorted(set(MODEL_BUILDERS) - set(BACKBONES))  # keras.applications backbones: tests/code/test_backbones.py


@pytest.mark.parametrize("name", OWN)
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
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'; choose one of: densenet121, .*lenet, mlp, "
                                         "mobilenet_v2, resnet50, resnet_small, shallow_cnn, small_cnn, study_cnn, "
                                         "study_resnet, vgg16, vgg19, xception"):
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
def test_train_param_augmentation_layers_reach_the_saved_model(tmp_path, online):
    """params.yaml train.augmentation_layers -> train_model -> the saved model.keras;
    train.online_augmentation augments in tf.data and leaves the saved model clean."""
    from hemaflow.config import TrainParams
    from hemaflow.tasks.train import train_model
    from tests.code.synthetic_wbc import CLASSES, write_dataset

    write_dataset(tmp_path / "data", {"train": 2, "val": 1}, size=32)
    cfg = TrainParams(image_size=32, epochs=1, batch_size=8, devices="cpu", augmentation_layers=online,
                      online_augmentation=True)
    train_model(tmp_path / "data", tmp_path / "model", cfg, CLASSES, seed=0)
    saved = keras.models.load_model(tmp_path / "model" / "model.keras")
    assert ("online_augmentation" in [l.name for l in saved.layers]) is online


# --- the model zoo -------------------------------------------------------------------------

SMALL = {"units": 16, "kernels": 4, "kernel_size": 3, "width": 4, "depth": 1}


@pytest.mark.parametrize("name", sorted(set(OWN) - {"study_cnn"}))
def test_each_architecture_takes_28px_bloodmnist_images(name):
    model = build_model(name, (28, 28, 3), 8, **SMALL)
    assert model.input_shape == (None, 28, 28, 3) and model.output_shape == (None, 8)
    probs = model.predict(raw_batch(2, 28), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_shallow_cnn_has_the_published_parameter_count():
    """Report B: 64 kernels 9x9, max-pool 2x2, softmax: 115,976 params at 28x28x3, 8 classes."""
    model = build_model("shallow_cnn", (28, 28, 3), 8)
    assert model.count_params() == 115_976
    conv = model.get_layer("conv1")
    assert conv.filters == 64 and conv.kernel_size == (9, 9) and conv.padding == "same"
    assert build_shallow_cnn((28, 28, 3), 8, kernels=128, kernel_size=3).get_layer("conv1").filters == 128


def test_study_cnn_has_the_published_parameter_count():
    assert build_model("study_cnn", (128, 128, 3), 2).count_params() == 250_050


def test_mlp_options():
    model = build_model("mlp", (28, 28, 3), 8, units=32, dropout=0.25)
    assert model.get_layer("hidden").units == 32 and model.get_layer("dropout").rate == 0.25
    assert model.count_params() == 28 * 28 * 3 * 32 + 32 + 32 * 8 + 8


def test_lenet_is_two_conv_pool_stages_and_three_dense_layers():
    model = build_lenet((28, 28, 3), 8)
    assert [c.filters for c in model.layers if isinstance(c, keras.layers.Conv2D)] == [6, 16]
    assert [d.units for d in model.layers if isinstance(d, keras.layers.Dense)] == [120, 84, 8]
    with pytest.raises(ValueError, match=f"at least {LENET_MIN_SIZE}x{LENET_MIN_SIZE}.*got 12x12"):
        build_lenet((12, 12, 3), 8)


def _convs(model):
    return [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]


def test_study_resnet_doubles_filters_with_strided_projection_shortcuts():
    model = build_study_resnet((28, 28, 3), 8)
    convs = {l.name: l for l in _convs(model)}
    assert convs["stem_conv"].filters == 64 and convs["stem_conv"].strides == (1, 1)
    for name, filters in (("block1", 128), ("block2", 256)):
        proj = convs[f"{name}_proj_conv"]
        assert proj.kernel_size == (1, 1) and proj.strides == (2, 2) and proj.filters == filters
        assert convs[f"{name}_a_conv"].strides == (2, 2)
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)
    assert model.get_layer("gap").output.shape[1:] == (256,)


def test_resnet_small_keeps_full_resolution_in_the_first_stage():
    model = build_resnet_small((28, 28, 3), 8)
    assert 600_000 < model.count_params() < 800_000  # the probe's ~0.7M
    assert not any(isinstance(l, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)) for l in model.layers)
    stem = model.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1)
    assert model.get_layer("stage1_block2_out").output.shape[1:] == (28, 28, 32)
    assert model.get_layer("stage2_block1_out").output.shape[1:] == (14, 14, 64)
    assert model.get_layer("stage3_block2_out").output.shape[1:] == (7, 7, 128)
    assert len([l for l in model.layers if isinstance(l, keras.layers.Add)]) == 6


def test_resnet_small_width_and_depth_are_options():
    model = build_model("resnet_small", (28, 28, 3), 8, width=8, depth=1)
    assert len([l for l in model.layers if isinstance(l, keras.layers.Add)]) == 3
    assert model.get_layer("gap").output.shape[1:] == (32,)
    with pytest.raises(ValueError, match="width >= 1 and depth >= 1"):
        build_resnet_small((28, 28, 3), 8, depth=0)


def test_resnet_small_stem_stride_2_halves_the_maps_with_the_same_parameters():
    one = build_model("resnet_small", (64, 64, 3), 8, width=8, depth=1)
    two = build_model("resnet_small", (64, 64, 3), 8, width=8, depth=1, stem_stride=2)
    assert one.get_layer("stem_relu").output.shape[1:] == (64, 64, 8)
    assert two.get_layer("stem_relu").output.shape[1:] == (32, 32, 8)
    assert two.get_layer("stage3_block1_out").output.shape[1:] == (8, 8, 32)
    assert one.count_params() == two.count_params()
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        build_resnet_small((64, 64, 3), 8, stem_stride=3)


def test_options_a_builder_does_not_take_are_ignored():
    a = build_model("small_cnn", (32, 32, 3), 5, units=7, width=3, kernel_size=5)
    assert a.count_params() == build_model("small_cnn", (32, 32, 3), 5).count_params()


def test_mixed_precision_models_output_float32_probabilities(tmp_path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_model("resnet_small", (28, 28, 3), 8, width=4, depth=1)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    assert model.get_layer("probabilities").compute_dtype == "float32"
    model.save(tmp_path / "m.keras")
    probs = keras.models.load_model(tmp_path / "m.keras").predict(raw_batch(2, 28), verbose=0)
    assert probs.dtype == np.float32 and probs.shape == (2, 8)
