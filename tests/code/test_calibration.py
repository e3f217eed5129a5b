"""Temperature scaling: recovers a known temperature, and folding it into the softmax layer
gives exactly the rescaled probabilities with the same argmax."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from hemaflow.calibration import T_BOUNDS, apply_temperature, fit_temperature, scale_probs
from hemaflow.scoring import log_loss, reliability


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_fit_recovers_the_temperature_that_miscalibrated_the_probabilities():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2.5, size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in _softmax(z)])       # labels drawn from softmax(z): calibrated
    for true_t in (0.5, 2.0):                                      # 0.5: over-, 2.0: under-confident
        shown = _softmax(z / true_t)
        t = fit_temperature(shown, y)
        assert t == pytest.approx(1 / true_t, rel=0.1)
        fixed = scale_probs(shown, t)
        assert log_loss(y, fixed) < log_loss(y, shown)
        assert reliability(y, fixed)[0] < reliability(y, shown)[0]
        assert (fixed.argmax(1) == shown.argmax(1)).all()


def test_fit_stays_within_bounds_and_needs_data():
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    assert T_BOUNDS[0] <= fit_temperature(probs, np.array([0, 0])) <= T_BOUNDS[1]
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0))


def test_folding_into_the_softmax_layer_matches_scaled_probabilities():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probabilities")(hidden))
    x = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    before = model.predict(x, verbose=0)
    apply_temperature(model, 0.4)
    after = model.predict(x, verbose=0)
    np.testing.assert_allclose(after, scale_probs(before, 0.4), atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all()


def test_a_model_without_the_softmax_layer_is_refused():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(inputs))
    with pytest.raises(ValueError, match="no 'probabilities' softmax layer"):
        apply_temperature(model, 2.0)


def test_fit_on_subtypes_recovers_the_temperature_of_the_summed_classes():
    """A model over subtypes (hemaflow/subclasses.py): T is fitted for the class probabilities."""
    rng = np.random.default_rng(2)
    merge = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    z = rng.normal(0, 2.5, size=(4000, 5))
    y = np.array([rng.choice(3, p=p / p.sum()) for p in _softmax(z) @ merge])  # calibrated classes
    shown = _softmax(z / 2.0)                                                      # under-confident
    t = fit_temperature(shown, y, merge)
    assert t == pytest.approx(0.5, rel=0.1)
    fixed = scale_probs(shown, t, merge)
    assert fixed.shape == (4000, 3)
    np.testing.assert_allclose(fixed.sum(axis=1), 1.0, atol=1e-6)
    assert log_loss(y, fixed) < log_loss(y, shown @ merge)
    assert reliability(y, fixed)[0] < reliability(y, shown @ merge)[0]
