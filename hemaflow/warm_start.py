"""Warm start: a hemaflow model (e.g. the promoted production model) as the starting point
for a new, small dataset. Labs rarely have more than a few hundred labelled cells per
class; features learned on a large set (PBC) carry over to another lab's stain and scanner.

Same class list: every weight is kept and training continues. Other classes: the network up
to the softmax is kept and a new softmax head is made, with the rows of classes both lists
share copied from the old head (so neutrophil stays neutrophil), the rest freshly initialised.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from hemaflow.models import resized_copy

HEAD = "probabilities"  # the softmax layer of every hemaflow model (hemaflow/models.py)


def warm_start_model(source: keras.Model, source_classes: tuple[str, ...], classes: tuple[str, ...],
                     input_shape: tuple[int, int, int], seed: int = 0) -> tuple[keras.Model, dict]:
    """The model to train, built from `source`; and what was reused (for train_summary.json)."""
    have = tuple(source.input_shape[1:])
    resized = None
    if have != tuple(input_shape):
        try:
            source = resized_copy(source, tuple(input_shape))
        except ValueError as exc:
            raise ValueError(f"the warm-start model takes {have[0]}x{have[1]}x{have[2]} images but train.image_size "
                             f"gives {input_shape[0]}x{input_shape[1]}x{input_shape[2]}, and it cannot be resized: "
                             f"{exc}; set train.image_size: {have[0]}") from None
        resized = {"from_image_size": have[0], "to_image_size": input_shape[0]}
    model, info = _with_head(source, source_classes, classes, seed)
    return model, {**info, **({"resized": resized} if resized else {})}


def _with_head(source: keras.Model, source_classes: tuple[str, ...], classes: tuple[str, ...],
               seed: int) -> tuple[keras.Model, dict]:
    """source itself when the class lists match, else source with a new softmax head."""
    if tuple(source_classes) == tuple(classes):
        return source, {"head": "kept", "shared_classes": list(classes), "new_classes": []}
    try:
        old_head = source.get_layer(HEAD)
    except ValueError:
        raise ValueError(f"the warm-start model has no '{HEAD}' softmax layer: not a hemaflow model") from None
    features = old_head.input
    new_head = layers.Dense(len(classes), activation="softmax", dtype="float32", name=HEAD,
                            kernel_initializer=keras.initializers.GlorotUniform(seed=seed))
    outputs = new_head(features)
    model = keras.Model(source.input, outputs, name=f"{source.name}_warm")
    old_kernel, old_bias = old_head.get_weights()
    kernel, bias = new_head.get_weights()
    shared = [c for c in classes if c in source_classes]
    for c in shared:
        kernel[:, classes.index(c)] = old_kernel[:, source_classes.index(c)]
        bias[classes.index(c)] = old_bias[source_classes.index(c)]
    new_head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model, {"head": "new", "shared_classes": shared, "new_classes": [c for c in classes if c not in shared]}
