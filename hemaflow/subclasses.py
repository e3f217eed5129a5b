"""Training on the subtypes a dataset's file names carry, scoring on its classes.

PBC's `ig` folder mixes metamyelocytes, myelocytes and promyelocytes (MMY_, MY_, PMY_) and
its `neutrophil` folder band and segmented cells (BNE_, SNE_). Most errors of a 64 px model
are metamyelocytes called neutrophils and band cells called ig: the two subtypes next to
each other in maturation, each inside a class whose other members look nothing like it. With
`train.subclasses: file_prefix` the network learns the subtypes as classes of their own and a
fixed, non-trainable Dense layer after the softmax adds their probabilities back into the
classes, so the saved model still answers in params' classes (labels.json, evaluate,
classify and promote unchanged) and loads as a plain Keras model (safe_mode, no custom layer).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

CLASS_SUM = "class_sum"  # the layer that folds subtype probabilities into class probabilities
MIN_SUBTYPE_IMAGES = 10  # a rarer subtype is trained as its class itself: too few to learn on its own
_PREFIX = re.compile(r"^([A-Za-z]+)_")


def file_prefix(source_id: str) -> str | None:
    """'ig/MMY_261923' -> 'MMY'; None where the file name has no letters-then-underscore prefix."""
    m = _PREFIX.match(str(source_id).replace("\\", "/").rsplit("/", 1)[-1])
    return m.group(1).upper() if m else None


def subtype_labels(labels: list[str], source_ids: list[str], count_in: list[bool] | None = None) -> list[str]:
    """'class:PREFIX' per row, or the class itself where the prefix is missing or names fewer
    than MIN_SUBTYPE_IMAGES of the rows count_in marks (the train split)."""
    fine = [f"{c}:{p}" if (p := file_prefix(s)) else c for c, s in zip(labels, source_ids)]
    counts = Counter(f for f, keep in zip(fine, count_in or [True] * len(fine)) if keep)
    return [f if f == c or counts[f] >= MIN_SUBTYPE_IMAGES else c for f, c in zip(fine, labels)]


def subtype_list(fine: list[str], classes: tuple[str, ...]) -> tuple[str, ...]:
    """The subtypes in params' class order, each class's subtypes sorted."""
    parent = {f: f.split(":", 1)[0] for f in set(fine)}
    return tuple(sorted(parent, key=lambda f: (classes.index(parent[f]), f)))


def class_sum_matrix(subtypes: tuple[str, ...], classes: tuple[str, ...]) -> np.ndarray:
    """(len(subtypes), len(classes)) 0/1 matrix: subtype i belongs to class j."""
    m = np.zeros((len(subtypes), len(classes)), dtype=np.float32)
    for i, f in enumerate(subtypes):
        m[i, classes.index(f.split(":", 1)[0])] = 1.0
    return m


def with_class_sum(model, merge: np.ndarray):
    """model (softmax over subtypes) followed by a frozen Dense with class_sum_matrix's weights,
    which sums them into classes."""
    import keras

    layer = keras.layers.Dense(merge.shape[1], use_bias=False, trainable=False, dtype="float32", name=CLASS_SUM)
    out = layer(model.output)
    layer.set_weights([merge])
    return keras.Model(model.input, out, name=model.name)


def class_accuracy(merge: np.ndarray):
    """A Keras metric on subtype targets that counts a prediction right when its class is
    (merge: class_sum_matrix): training curves and val figures then mean what evaluate reports."""
    import keras
    from keras import ops

    def class_accuracy(y_true, y_pred):
        to_class = ops.convert_to_tensor(merge)
        true = ops.argmax(ops.matmul(ops.cast(y_true, "float32"), to_class), axis=-1)
        pred = ops.argmax(ops.matmul(ops.cast(y_pred, "float32"), to_class), axis=-1)
        return ops.cast(ops.equal(true, pred), "float32")

    return keras.metrics.MeanMetricWrapper(class_accuracy, name="class_accuracy")
