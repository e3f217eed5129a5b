"""Sharpness-aware minimisation (SAM, Foret et al. 2021) as a Keras model wrapper.

Why: every 64 px PBC run fits its train split to accuracy 1.000 long before the schedule ends,
and the errors left are mostly a boundary the labels themselves draw unevenly (metamyelocyte
against band neutrophil). SAM takes each step with the gradient at the worst point within a
radius rho of the weights, which favours flat minima and is, among the regularisers that cost
no data, the one reported to hold up best under label noise. It doubles the cost of a step.

The wrapper holds the network; `SharpnessAware(net, rho).inner` is `net`, the model that is
saved. TensorFlow backend (hemaflow trains on it); under a distribution strategy each replica
perturbs with its own gradient (the paper's m-sharpness, m = the replica batch).
"""

from __future__ import annotations

import keras


class SharpnessAware(keras.Model):
    """`inner` trained by SAM: per batch, the loss gradient g at w, then the gradient at
    w + rho * g / ||g||, applied at w by the compiled optimizer. Loss and metrics are those of w."""

    def __init__(self, inner: keras.Model, rho: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        if rho <= 0:
            raise ValueError(f"SAM needs a radius rho > 0, got {rho}")
        self.inner = inner
        self.rho = float(rho)
        self.built = inner.built  # its weights are the network's: nothing of its own to build

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def train_step(self, data):
        import tensorflow as tf
        from keras.src import tree
        from keras.src.losses import loss as loss_module

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        weights = self.trainable_weights
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(
                loss_module.unscale_loss_for_distribution(loss),
                sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0])
            loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(loss, weights)
        scale = self.rho / (tf.linalg.global_norm([g for g in grads if g is not None]) + 1e-12)
        steps = [None if g is None else tf.cast(g, w.dtype) * tf.cast(scale, w.dtype) for w, g in zip(weights, grads)]
        for w, e in zip(weights, steps):
            if e is not None:
                w.assign_add(e)  # to the sharpest point within rho
        with tf.GradientTape() as tape:
            perturbed = self._compute_loss(x=x, y=y, y_pred=self(x, training=True), sample_weight=sample_weight,
                                           training=True)
            perturbed = self.optimizer.scale_loss(perturbed)
        grads = tape.gradient(perturbed, weights)
        for w, e in zip(weights, steps):
            if e is not None:
                w.assign_sub(e)  # back to w, where the step is taken
        self.optimizer.apply_gradients(zip(grads, weights))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
