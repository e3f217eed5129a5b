"""Keras model factories for white-cell crops.

Every model takes raw 0-255 RGB images (rescaling is inside the model) so a saved
`model.keras` needs no separate preprocessing contract, and only standard Keras layers
are used so `keras.models.load_model` needs no custom objects.
"""

from __future__ import annotations

from typing import Callable

import keras
from keras import layers

ModelBuilder = Callable[..., keras.Model]

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
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
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
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="study_cnn")


MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "small_cnn": build_small_cnn,
    "study_cnn": build_study_cnn,
}


def build_model(name: str, input_shape: tuple[int, int, int], n_classes: int,
                online_augmentation: bool = False) -> keras.Model:
    """Build the architecture registered under `name` (params.yaml train.architecture)."""
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(MODEL_BUILDERS))}") from None
    return builder(tuple(input_shape), n_classes, online_augmentation=online_augmentation)


def _check_classes(n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
