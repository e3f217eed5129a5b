"""keras.applications backbones for white-cell crops, from scratch or transfer learning.

With `weights_path` (ImageNet weights cannot be downloaded here: a local file, e.g. the
`*_weights_tf_dim_ordering_tf_kernels_notop.h5` a lab keeps, or any `.weights.h5` saved from
the same base) the base is loaded from that file and frozen, and a Dense(256)-Dropout(0.5)-
softmax head is trained on top (the transfer recipe of the BloodMNIST/PBC studies); train's
fine_tune_epochs then unfreezes the base at a lower learning rate. Each backbone's own input
preprocessing is built from standard layers (no Lambda), so model.keras loads in safe mode.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

# name -> (keras.applications class, preprocessing mode, smallest input side it accepts)
BACKBONES: dict[str, tuple[str, str, int]] = {
    "vgg16": ("VGG16", "caffe", 32),
    "vgg19": ("VGG19", "caffe", 32),
    "resnet50": ("ResNet50", "caffe", 32),
    "inception_v3": ("InceptionV3", "tf", 75),
    "xception": ("Xception", "tf", 71),
    "densenet121": ("DenseNet121", "torch", 32),
    "densenet169": ("DenseNet169", "torch", 32),
    "densenet201": ("DenseNet201", "torch", 32),
    "efficientnet_b0": ("EfficientNetB0", "raw", 32),   # rescales inside the model itself
    "mobilenet_v2": ("MobileNetV2", "tf", 32),
}
BASE_LAYER = "backbone"                                  # name of the base model inside the classifier
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _preprocess(x, mode: str):
    """Raw 0-255 RGB -> what the backbone was trained on, with serialisable layers only."""
    if mode == "tf":
        return layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(x)
    if mode == "torch":
        return layers.Normalization(mean=(_TORCH_MEAN * 255).tolist(), variance=((_TORCH_STD * 255) ** 2).tolist(),
                                    name="preprocess")(x)
    if mode == "caffe":  # RGB -> BGR and subtract the ImageNet mean: one fixed 1x1 convolution
        conv = layers.Conv2D(3, 1, name="preprocess", trainable=False)
        y = conv(x)
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_c, in_c in enumerate((2, 1, 0)):
            kernel[0, 0, in_c, out_c] = 1.0
        conv.set_weights([kernel, -np.array(_CAFFE_MEAN_BGR, np.float32)])
        return y
    return x


def build_backbone(name: str, input_shape: tuple[int, int, int], n_classes: int, online_augmentation: bool = False,
                   weights_path: str | Path | None = None, freeze_base: bool = True, head_units: int = 256,
                   head_dropout: float = 0.5) -> keras.Model:
    """keras.applications `name` without its top, global average pooled, with a new head."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    cls_name, mode, min_side = BACKBONES[name]
    if min(input_shape[:2]) < min_side:
        raise ValueError(f"{name} needs images of at least {min_side}x{min_side}; got "
                         f"{input_shape[0]}x{input_shape[1]} (raise train.image_size)")
    from hemaflow.models import build_augmentation

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = build_augmentation()(inputs) if online_augmentation else inputs
    x = _preprocess(x, mode)
    base = getattr(keras.applications, cls_name)(include_top=False, weights=None, input_shape=tuple(input_shape),
                                                 pooling="avg")
    base.name = BASE_LAYER
    if weights_path is not None:
        load_base_weights(base, Path(weights_path))
    frozen = weights_path is not None and freeze_base
    base.trainable = not frozen
    # a frozen base runs its batch norm in inference mode (and stays so when fine-tuned)
    x = base(x, training=False) if frozen else base(x)
    x = layers.Dense(head_units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(head_dropout, name="head_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def load_base_weights(base: keras.Model, path: Path) -> None:
    """Weights of the base (no top) from a local file; errors name the file and the cause."""
    import warnings

    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base.load_weights(str(path))
        except Exception as exc:  # a file of another network or a corrupt one
            raise ValueError(f"{path}: cannot load as backbone weights ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    # Keras 3 skips the layers it finds no group for with only a warning: a file of another
    # network would leave the base randomly initialised, silently
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message) or "mismatch" in str(w.message)]
    if skipped:
        raise ValueError(f"{path}: cannot load as backbone weights ({len(skipped)} part(s) of the network have "
                         f"no weights in the file, e.g. {skipped[0][:160]}): weights of another network?")


def unfreeze_base(model: keras.Model) -> bool:
    """Make the base trainable for fine-tuning; False if the model has no frozen base."""
    try:
        base = model.get_layer(BASE_LAYER)
    except ValueError:
        return False
    if base.trainable:
        return False
    base.trainable = True
    return True
