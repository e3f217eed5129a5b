"""Keras model factories for white-cell crops.

Every model takes raw 0-255 RGB images (rescaling is inside the model) so a saved
`model.keras` needs no separate preprocessing contract, and only standard Keras layers
are used so `keras.models.load_model` needs no custom objects.
"""

from __future__ import annotations

import inspect
from typing import Callable

import keras
from keras import layers

ModelBuilder = Callable[..., keras.Model]
# The softmax layer is float32 in every model, so under a mixed-precision policy
# (train.precision: mixed_bfloat16) probabilities and the loss stay float32.

# Cells have no preferred orientation, so any rotation or flip is a valid view of the same class.
ROTATION_FACTOR = 0.5    # fraction of a full turn: +-180 degrees
ZOOM_FACTOR = 0.1
TRANSLATION_FACTOR = 0.1


def build_augmentation(name: str = "online_augmentation") -> keras.Sequential:
    """Random flips/rotations/zooms/shifts; Keras random layers are identity outside training."""
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical"),
            layers.RandomRotation(ROTATION_FACTOR, fill_mode="reflect"),
            layers.RandomZoom(ZOOM_FACTOR, fill_mode="reflect"),
            layers.RandomTranslation(TRANSLATION_FACTOR, TRANSLATION_FACTOR, fill_mode="reflect"),
        ],
        name=name,
    )


def _inputs(input_shape: tuple[int, int, int], online_augmentation: bool):
    """Model input (raw 0-255 RGB) -> optional augmentation -> [0, 1] floats."""
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(f"input_shape must be (height, width, channels) with 1 or 3 channels, got {input_shape}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = build_augmentation()(inputs) if online_augmentation else inputs
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    return inputs, x


def build_small_cnn(input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False) -> keras.Model:
    """Fast default: Conv-BN-ReLU-MaxPool blocks, global average pooling, dropout, softmax.

    BatchNorm momentum is 0.9 (not Keras' 0.99) because the datasets here give only a few
    hundred optimiser steps; with 0.99 the moving statistics used at inference lag behind.
    """
    _check_classes(n_classes)
    inputs, x = _inputs(input_shape, online_augmentation)
    for i, filters in enumerate((16, 32, 64, 128)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        if i < 3:
            x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


STUDY_CNN_MIN_SIZE = 46  # four valid 3x3 convs + 2x2 pools leave a 1x1 map at 46 px


def build_study_cnn(input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False) -> keras.Model:
    """The ALL-IDB study's CNN, layer for layer: Conv2D 32/64/128/128 (3x3, ReLU, valid
    padding) each followed by 2x2 max pooling, Flatten, Dropout(0.5), Dense softmax."""
    _check_classes(n_classes)
    if min(input_shape[:2]) < STUDY_CNN_MIN_SIZE:
        raise ValueError(
            f"study_cnn needs images of at least {STUDY_CNN_MIN_SIZE}x{STUDY_CNN_MIN_SIZE} "
            f"(four valid convolutions and poolings); got {input_shape[0]}x{input_shape[1]}"
        )
    inputs, x = _inputs(input_shape, online_augmentation)
    for i, filters in enumerate((32, 64, 128, 128)):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="study_cnn")


def _classifier_head(x, n_classes: int, dropout: float):
    if dropout > 0:
        x = layers.Dropout(dropout, name="dropout")(x)
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)


def build_mlp(input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False,
              units: int = 128, dropout: float = 0.25) -> keras.Model:
    """The BloodMNIST reports' MLP: flattened pixels, one ReLU hidden layer, dropout, softmax."""
    _check_classes(n_classes)
    inputs, x = _inputs(input_shape, online_augmentation)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(units, activation="relu", name="hidden")(x)
    return keras.Model(inputs, _classifier_head(x, n_classes, dropout), name="mlp")


def build_shallow_cnn(input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False,
                      kernels: int = 64, kernel_size: int = 9, dropout: float = 0.0) -> keras.Model:
    """BloodMNIST report B: one Conv2D (64 kernels 9x9, same padding, ReLU), 2x2 max pool,
    flatten, softmax -- 115,976 params at 28x28x3 with 8 classes."""
    _check_classes(n_classes)
    inputs, x = _inputs(input_shape, online_augmentation)
    x = layers.Conv2D(kernels, kernel_size, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, _classifier_head(x, n_classes, dropout), name="shallow_cnn")


LENET_MIN_SIZE = 16  # two valid 5x5 convs and two 2x2 pools


def build_lenet(input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False,
                dropout: float = 0.0) -> keras.Model:
    """LeNet-5 on RGB: Conv 6@5x5 - pool - Conv 16@5x5 - pool - Dense 120 - Dense 84 - softmax."""
    _check_classes(n_classes)
    if min(input_shape[:2]) < LENET_MIN_SIZE:
        raise ValueError(f"lenet needs images of at least {LENET_MIN_SIZE}x{LENET_MIN_SIZE}; "
                         f"got {input_shape[0]}x{input_shape[1]}")
    inputs, x = _inputs(input_shape, online_augmentation)
    x = layers.Conv2D(6, 5, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    return keras.Model(inputs, _classifier_head(x, n_classes, dropout), name="lenet")


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _residual_block(x, filters: int, stride: int, name: str):
    """Basic block: two 3x3 conv-BN, identity shortcut or 1x1 conv-BN projection when the shape changes."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{name}_proj", relu=False)
    y = _conv_bn(x, filters, 3, stride, f"{name}_a")
    y = _conv_bn(y, filters, 3, 1, f"{name}_b", relu=False)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def build_study_resnet(input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False,
                       dropout: float = 0.0) -> keras.Model:
    """BloodMNIST report A's small ResNet: conv 64 3x3, two residual blocks doubling the
    filters (128, 256) with stride 2 and 1x1 projection shortcuts, BN, global average pooling, dense."""
    _check_classes(n_classes)
    inputs, x = _inputs(input_shape, online_augmentation)
    x = _conv_bn(x, 64, 3, 1, "stem")
    for i, filters in enumerate((128, 256)):
        x = _residual_block(x, filters, 2, f"block{i + 1}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, _classifier_head(x, n_classes, dropout), name="study_resnet")


def build_resnet_small(input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False,
                       width: int = 32, depth: int = 2, dropout: float = 0.0, stem_stride: int = 1) -> keras.Model:
    """Small-image ResNet: 3x3 stride-1 stem (no early pooling, fine detail of 28 px cells is
    kept), three stages of `depth` basic blocks at width, 2x, 4x filters (stride 2 between
    stages, 1x1 projections), BN, global average pooling, softmax. width 32, depth 2: ~0.7M params.

    stem_stride 2 halves the feature maps after a 3x3 stem that still sees every input pixel:
    a 64 px input then costs about what a 32 px one does at stride 1 (same parameters)."""
    _check_classes(n_classes)
    if width < 1 or depth < 1:
        raise ValueError(f"resnet_small needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
    if stem_stride not in (1, 2):
        raise ValueError(f"resnet_small stem_stride must be 1 or 2, got {stem_stride}")
    inputs, x = _inputs(input_shape, online_augmentation)
    x = _conv_bn(x, width, 3, stem_stride, "stem")
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _residual_block(x, filters, stride, f"stage{stage + 1}_block{block + 1}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, _classifier_head(x, n_classes, dropout), name="resnet_small")


MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "small_cnn": build_small_cnn,
    "study_cnn": build_study_cnn,
    "mlp": build_mlp,
    "shallow_cnn": build_shallow_cnn,
    "lenet": build_lenet,
    "study_resnet": build_study_resnet,
    "resnet_small": build_resnet_small,
}


def _backbone_builder(name: str) -> ModelBuilder:
    def build(input_shape, n_classes, online_augmentation=False, weights_path=None, freeze_base=True):
        from hemaflow.backbones import build_backbone
        return build_backbone(name, input_shape, n_classes, online_augmentation, weights_path, freeze_base)
    return build


from hemaflow.backbones import BACKBONES  # noqa: E402  (keras.applications, chosen by name)

MODEL_BUILDERS.update({name: _backbone_builder(name) for name in BACKBONES})


def build_model(name: str, input_shape: tuple[int, int, int], n_classes: int,
                online_augmentation: bool = False, **options) -> keras.Model:
    """Build the architecture registered under `name` (params.yaml train.architecture).

    `options` (units, kernels, kernel_size, dropout, width, depth, stem_stride: TrainParams fields) go to
    the builders that take them; those a builder has no use for are ignored, so the train
    stage can pass every option whatever the architecture.
    """
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(MODEL_BUILDERS))}") from None
    accepted = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted}
    return builder(tuple(input_shape), n_classes, online_augmentation=online_augmentation, **kwargs)


def _check_classes(n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")


MIXED_POLICIES = ("mixed_bfloat16", "mixed_float16")


def mixed_policy(model: keras.Model) -> str | None:
    """The mixed-precision policy a model was built under (train.precision), or None if float32."""
    names = {layer.dtype_policy.name for layer in _all_layers(model)}
    return next((p for p in MIXED_POLICIES if p in names), None)


def float32_copy(model: keras.Model) -> keras.Model:
    """The same network and weights with every layer computing in float32.

    Why: a model trained with mixed_bfloat16 (GPU, AMX CPU) keeps that policy when saved; on a
    CPU without bf16 instructions its inference is emulated (9x slower measured on an AVX2
    EPYC). The variables of a mixed-precision model are float32 already, so the copy's
    weights are bit-identical and only the arithmetic gets more exact."""
    config = _with_float32_dtypes(model.get_config())
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def resized_copy(model: keras.Model, input_shape: tuple[int, int, int]) -> keras.Model:
    """The same network and weights taking images of another size (progressive resizing: a
    model trained fast at 28 px fine-tuned at 64 px).

    Convolutions, batch norm and global pooling do not depend on the image size, so every
    weight carries over; a network whose weights do (Flatten into Dense, as in the study CNNs)
    raises ValueError."""
    have = tuple(model.input_shape[1:])
    if have[-1] != input_shape[-1]:
        raise ValueError(f"the model takes {have[-1]}-channel images, not {input_shape[-1]}")
    config = _with_input_shape(model.get_config(), tuple(input_shape))
    try:
        copy = model.__class__.from_config(config)
        copy.set_weights(model.get_weights())
    except Exception as exc:  # a layer whose weight shapes follow the image size
        raise ValueError(f"its weights depend on the image size ({type(exc).__name__}: {str(exc)[:200]})") from None
    return copy


def _with_input_shape(config: dict, input_shape: tuple[int, int, int]) -> dict:
    """A functional model's config with its InputLayer's batch_shape set to input_shape."""
    layers_ = [({**layer, "config": {**layer["config"], "batch_shape": [None, *input_shape]}}
                if layer.get("class_name") == "InputLayer" else layer) for layer in config["layers"]]
    return {**config, "layers": layers_}


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _with_float32_dtypes(node):
    """The config tree with each serialized mixed DTypePolicy replaced by float32."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and node.get("config", {}).get("name") in MIXED_POLICIES:
            return {**node, "config": {**node["config"], "name": "float32"}}
        return {k: _with_float32_dtypes(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_float32_dtypes(v) for v in node]
    return "float32" if node in MIXED_POLICIES else node
