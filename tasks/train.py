"""Train: fit a Keras classifier on the augmented dataset's train split, validate on val.

Images are read with tf.data straight from the PNGs that dataset.parquet lists. The crops
were written by cv2.imwrite from BGR arrays, which stores a standard RGB PNG, so
tf.io.decode_image already yields RGB: no channel swap here (a swap would feed the model
BGR). Clients that read crops with cv2.imread must convert BGR->RGB before predicting.

TensorFlow is imported inside functions: input checks fail fast without it, and the
strategy for `devices: cpu:N` must be chosen before TensorFlow sets up its devices.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hemaflow.config import TrainParams
from hemaflow.errors import StageInputError, read_table, require_file
from hemaflow.model_folder import LABELS_FILE, MODEL_FILE
from hemaflow.progress import Progress
from hemaflow.schema import DATASET_COLUMNS

SPLITS = ("train", "val", "test")


@dataclass
class TrainResult:
    model_dir: Path
    architecture: str
    epochs_run: int
    best_epoch: int                      # 1-based epoch whose weights were kept
    n_images: dict[str, int]             # split -> rows
    seconds: float                       # wall time of model.fit
    images_per_second: float             # train images processed per second of fit
    strategy: dict = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)  # metrics at best_epoch

    def summary(self) -> dict:
        out = {
            "model": str(self.model_dir / MODEL_FILE),
            "architecture": self.architecture,
            "epochs run": self.epochs_run,
            "best epoch": self.best_epoch,
            "images": ", ".join(f"{k}={v}" for k, v in self.n_images.items()),
            "seconds": round(self.seconds, 1),
            "images/s": round(self.images_per_second, 1),
            "strategy": f"{self.strategy.get('strategy')} x{self.strategy.get('replicas')}",
        }
        out.update({k: round(v, 4) for k, v in self.best.items()})
        return out


def read_dataset(dataset_path: Path, classes: tuple[str, ...], classes_from: str = "params classes") -> pd.DataFrame:
    """Load dataset.parquet and check what training/evaluation rely on; errors name the file."""
    df = read_table(dataset_path, "augmented dataset table", DATASET_COLUMNS)
    if df["path"].isna().any():
        raise StageInputError(dataset_path, f"{int(df['path'].isna().sum())} row(s) have no image path")
    unknown = sorted(set(df["label"].astype(str)) - set(classes))
    if unknown:
        n = int((~df["label"].isin(classes)).sum())
        raise StageInputError(dataset_path, f"{n} row(s) have label(s) not in {classes_from} {list(classes)}: {unknown}")
    bad_split = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad_split:
        raise StageInputError(dataset_path, f"unknown split value(s) {bad_split}; expected {list(SPLITS)}")
    missing = [p for p in df["path"] if not (dataset_path.parent / p).is_file()]
    if missing:
        raise StageInputError(dataset_path.parent / missing[0], f"image listed in {dataset_path.name} is missing "
                                                               f"({len(missing)} missing in all)")
    return df.reset_index(drop=True)


def load_image(path, image_size: int):
    """PNG/JPEG file -> float32 (image_size, image_size, 3) RGB in 0-255 (the model rescales).

    Rounded to whole values: exactly the pixels of the uint8 training cache."""
    import tensorflow as tf

    img = model_pixels(tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False), image_size)
    img.set_shape((image_size, image_size, 3))
    return img


def model_pixels(rgb, image_size: int):
    """An RGB image (H, W, 3, 0-255) as the model gets it: tf.image.resize with antialias,
    rounded to whole values (float32). load_image and `hemaflow classify` both go through here."""
    import tensorflow as tf

    img = tf.image.resize(rgb, (image_size, image_size), antialias=True)
    return tf.round(tf.clip_by_value(img, 0.0, 255.0))


def augment_image(image, seed, shift_frac: float = 0.1, colour_jitter: float = 0.1):
    """One random view of a uint8/float (H, W, 3) 0-255 image, from a stateless seed (shape (2,)):
    any of the 8 flips/90-degree rotations, a shift of up to shift_frac of the side (reflected
    border), brightness/contrast/saturation changed by up to colour_jitter. Returns float32 0-255."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7)
    x = tf.cast(image, tf.float32)
    x = tf.image.stateless_random_flip_left_right(x, seeds[0])
    x = tf.image.stateless_random_flip_up_down(x, seeds[1])
    if x.shape[0] == x.shape[1]:  # a transpose + the two flips give all 8 dihedral views
        transpose = tf.random.stateless_uniform((), seeds[2]) < 0.5
        x = tf.cond(transpose, lambda: tf.transpose(x, (1, 0, 2)), lambda: x)
    h, w = x.shape[0], x.shape[1]
    pad = int(round(shift_frac * min(h, w)))
    if pad > 0:
        x = tf.pad(x, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        x = tf.image.stateless_random_crop(x, (h, w, 3), seeds[3])
    if colour_jitter > 0:
        x = tf.image.stateless_random_brightness(x, 255.0 * colour_jitter, seeds[4])
        x = tf.image.stateless_random_contrast(x, 1 - colour_jitter, 1 + colour_jitter, seeds[5])
        x = tf.image.stateless_random_saturation(x, 1 - colour_jitter, 1 + colour_jitter, seeds[6])
        x = tf.clip_by_value(x, 0.0, 255.0)
    return x


def augment_batch_dihedral(images, seed):
    """Each image of a (N, H, W, 3) batch in one of its 8 flips/90-degree rotations, chosen per
    image from a stateless seed (shape (2,)): the same views as augment_image with no shift or
    colour jitter, as three vectorised ops on the whole batch."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    x = tf.image.stateless_random_flip_left_right(images, seeds[0])
    x = tf.image.stateless_random_flip_up_down(x, seeds[1])
    if x.shape[1] is not None and x.shape[1] == x.shape[2]:
        n = tf.shape(x)[0]
        transpose = tf.random.stateless_uniform((n, 1, 1, 1), seeds[2]) < 0.5
        x = tf.where(transpose, tf.transpose(x, (0, 2, 1, 3)), x)
    return x


def augment_batch_rotate(images, seed, max_degrees: float):
    """Each image of a float (N, H, W, 3) batch turned about its centre by its own uniform angle in
    [-max_degrees, max_degrees] (bilinear, reflected border), from a stateless seed (shape (2,)).
    With the 8 flips/90-degree views, 45 degrees reaches every angle: a cell has no 'up'."""
    import math

    import tensorflow as tf

    angle = tf.random.stateless_uniform(tf.shape(images)[:1], seed, -max_degrees, max_degrees)
    return rotate_batch(images, angle * (math.pi / 180.0))


def rotate_batch(images, radians):
    """images (N, H, W, C) float, each turned about its centre by radians[i] (bilinear, reflected border)."""
    import tensorflow as tf

    h, w = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    cos, sin = tf.cos(radians), tf.sin(radians)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    zeros = tf.zeros_like(cos)
    # output (x, y) <- input (cos*(x-cx) - sin*(y-cy) + cx, sin*(x-cx) + cos*(y-cy) + cy)
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zeros, zeros], 1)
    return tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
                                                 fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")


def online_augment_options(cfg: TrainParams) -> dict:
    """make_image_dataset's augment options from the train params (used by training and the benchmark)."""
    return {"shift_frac": cfg.shift_frac, "colour_jitter": cfg.colour_jitter, "rotation_deg": cfg.rotation_deg,
            "mixup_alpha": cfg.mixup_alpha, "cutout_frac": cfg.cutout_frac}


def cutout_batch(images, seed, frac: float):
    """Cutout (DeVries & Taylor 2017) on a float (N, H, W, 3) batch: in each image a square of
    round(frac x side) pixels, centred on a uniform random pixel (so clipped where it crosses the
    border), is set to that image's mean colour. Stateless from a seed of shape (2,), like the
    other online views: a cell the network cannot always see whole must be read from all its parts."""
    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    side = tf.maximum(1, tf.cast(tf.round(frac * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32))
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    cy = tf.random.stateless_uniform((n,), s[0], 0, h, dtype=tf.int32)
    cx = tf.random.stateless_uniform((n,), s[1], 0, w, dtype=tf.int32)
    y0, x0 = cy - side // 2, cx - side // 2
    ys, xs = tf.range(h)[None, :, None], tf.range(w)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + side)[:, None, None])
              & (xs >= x0[:, None, None]) & (xs < (x0 + side)[:, None, None]))
    fill = tf.reduce_mean(images, axis=(1, 2), keepdims=True)
    return tf.where(inside[..., None], fill, images)


def mixup_batch(images, labels, seed, alpha: float):
    """MixUp (Zhang et al. 2018): each image of a float (N, H, W, 3) batch and its one-hot label
    blended with another image of the batch, weight w ~ Beta(alpha, alpha) per image, targets alike.
    Stateless TF ops from a seed of shape (2,), as the other online views, so a run repeats
    (keras.layers.MixUp draws from a stateful SeedGenerator and takes no per-batch seed)."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    n = tf.shape(images)[0]
    partner = tf.argsort(tf.random.stateless_uniform((n,), s[0]))
    a = tf.random.stateless_gamma((n,), s[1], alpha)
    b = tf.random.stateless_gamma((n,), s[2], alpha)
    w = a / tf.maximum(a + b, 1e-12)   # Beta(alpha, alpha) as a ratio of gammas
    x = w[:, None, None, None] * images + (1.0 - w[:, None, None, None]) * tf.gather(images, partner)
    wl = tf.cast(w[:, None], labels.dtype)
    return x, wl * labels + (1 - wl) * tf.gather(labels, partner)


def make_image_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int,
                       shuffle_seed: int | None = None, drop_remainder: bool = False, n_classes: int | None = None,
                       augment: dict | None = None, augment_seed: int = 0):
    """tf.data pipeline streaming from the files: decode + resize once, cached as uint8 (a
    quarter of float32's memory), optionally shuffled per epoch and augmented (augment:
    augment_image keyword arguments, plus rotation_deg for augment_batch_rotate, cutout_frac for
    cutout_batch and mixup_alpha for mixup_batch; a fresh random
    view every epoch, reproducible from augment_seed), batched, prefetched. Labels are one-hot
    when n_classes is given."""
    import tensorflow as tf

    augment = dict(augment) if augment is not None else None
    rotation_deg = augment.pop("rotation_deg", 0.0) if augment is not None else 0.0
    mixup_alpha = augment.pop("mixup_alpha", 0.0) if augment is not None else 0.0
    cutout_frac = augment.pop("cutout_frac", 0.0) if augment is not None else 0.0
    if mixup_alpha > 0 and n_classes is None:
        raise ValueError("mixup needs one-hot labels (n_classes)")

    def with_seeds(ds, seed: int, fn):
        """ds mapped by fn(x, y, s), s a fresh stateless seed (shape (2,)) per element and epoch."""
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        return tf.data.Dataset.zip(ds, seeds).map(lambda xy, s: fn(xy[0], xy[1], s),
                                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, dtype=np.int32)))
    ds = ds.map(lambda p, y: (tf.cast(load_image(p, image_size), tf.uint8), y),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    dihedral_only = augment is not None and not augment.get("shift_frac") and not augment.get("colour_jitter")
    if augment is not None and not dihedral_only:
        ds = with_seeds(ds, augment_seed, lambda x, y, s: (augment_image(x, s, **augment), y))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if dihedral_only:  # flips and 90-degree turns only: one vectorised op per batch, not per image
        ds = with_seeds(ds, augment_seed, lambda x, y, s: (augment_batch_dihedral(x, s), y))

    # on whole batches, after the flips: per-image maps here halved training speed, and turning
    # uint8 rather than float32 pixels moves a quarter of the bytes (at 64 px the float32 flips
    # took CPU from training on 2 cores)
    def finish(x, y):
        return tf.cast(x, tf.float32), (tf.one_hot(y, n_classes) if n_classes is not None else y)

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if rotation_deg > 0:  # one projective transform per batch (per-image angles), on float pixels
        ds = with_seeds(ds, augment_seed + 1, lambda x, y, s: (augment_batch_rotate(x, s, rotation_deg), y))
    if cutout_frac > 0:  # per batch, on float pixels, before mixing
        ds = with_seeds(ds, augment_seed + 3, lambda x, y, s: (cutout_batch(x, s, cutout_frac), y))
    if mixup_alpha > 0:  # last: mixes the augmented views, per batch
        ds = with_seeds(ds, augment_seed + 2, lambda x, y, s: mixup_batch(x, y, s, mixup_alpha))
    return ds.prefetch(tf.data.AUTOTUNE)


def build_optimizer(cfg: TrainParams, steps_per_epoch: int):
    """cfg.optimizer with its learning-rate schedule: linear warm-up over cfg.warmup_epochs,
    then constant or cosine decay to 0 at cfg.epochs (built-in Keras schedules only, so the
    saved model.keras loads without custom objects)."""
    import keras

    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine_time":
        lr = cfg.learning_rate  # a plain variable: _time_cosine sets it before every step
    elif cfg.lr_schedule == "cosine" or warmup:
        # CosineDecay with alpha=1 stays at the peak: a constant rate after the warm-up
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else cfg.learning_rate, decay_steps=max(1, total - warmup),
            alpha=0.0 if cfg.lr_schedule == "cosine" else 1.0,
            warmup_target=cfg.learning_rate if warmup else None, warmup_steps=warmup)
    decay = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True, weight_decay=decay)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(lr, weight_decay=decay)


def balanced_class_weights(labels: list[int], n_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights: n_samples / (n_classes x count); absent classes get 1."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes)
    present = int((counts > 0).sum())
    return {i: (len(labels) / (present * c) if c else 1.0) for i, c in enumerate(counts)}


def replica_batch_size(batch_size: int, n_rows: int, replicas: int) -> int:
    """Global batch size that splits evenly across replicas.

    Keras 3 builds a distributed model by reducing the first batch across replicas, which
    fails on an uneven split (keras-team/keras#19246), and a replica left with an empty
    final batch fails too; so the global batch is rounded up to a multiple of the replica
    count and capped at the largest multiple <= n_rows. train_model also drops the last
    partial train batch (a different remainder each shuffled epoch) and trims val to a
    multiple of the replica count, so every batch splits evenly.
    """
    if replicas <= 1:
        return batch_size
    size = -(-batch_size // replicas) * replicas
    return max(replicas, min(size, (n_rows // replicas) * replicas))


def find_unreadable(paths: list[str]) -> tuple[str, str] | None:
    """First (path, error) that TensorFlow cannot decode, or None: turns a mid-epoch
    decode failure into an error that names the file."""
    import tensorflow as tf

    for p in paths:
        try:
            load_image(p, 8)
        except (tf.errors.OpError, ValueError) as exc:
            return p, getattr(exc, "message", str(exc)).splitlines()[0]
    return None


def prepare_output_dir(out_dir: Path, *inputs: Path) -> None:
    """Empty out_dir so no file from an earlier run survives; refuse if an input lives inside it."""
    out = out_dir.resolve()
    for inp in inputs:
        if inp.resolve() == out or inp.resolve().is_relative_to(out):
            raise StageInputError(out_dir, f"output directory contains the input {inp}; refusing to clear it")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def _progress_callback(progress: Progress, epochs: int, timer=None, max_minutes: float | None = None,
                       spent_seconds: float = 0.0):
    import keras

    class EpochProgress(keras.callbacks.Callback):
        """Reports (epochs done, epochs expected) after each epoch. Under a time budget the
        expected count is what fits in the time left at this run's mean epoch time (from the
        EpochTimer `timer`, which runs before this callback; capped at `epochs`), so the bar
        tracks the budget instead of stalling at a fraction of the cap."""

        def on_train_begin(self, logs=None):
            progress(0, epochs)

        def on_epoch_end(self, epoch, logs=None):
            expected = epochs
            if max_minutes and timer is not None and timer.seconds:
                elapsed = sum(timer.seconds)
                left = 60 * max_minutes - spent_seconds - elapsed
                expected = min(epochs, epoch + 1 + max(0, int(left / (elapsed / len(timer.seconds)))))
            progress(epoch + 1, expected)

    return EpochProgress()


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t0)

    return EpochTimer()


def _time_cosine(cfg: TrainParams, steps_per_epoch: int, spent_seconds: float = 0.0, start_step: int = 0):
    """lr_schedule cosine_time: linear warm-up over warmup_epochs (in steps), then cosine decay
    over the wall-clock budget or the epoch cap, whichever ends training first:
    lr = peak * (1 + cos(pi * frac)) / 2, frac = max(spent / budget, steps done / steps of the cap).
    On time alone a fast host that reached the cap (PBC at 1,550 images/s: 200 epochs in 15.4 of
    19 minutes) stopped with the rate still at 9 % of its peak, and a GPU job would barely decay."""
    import math

    import keras

    budget = 60.0 * cfg.max_minutes
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    cap_steps = cfg.epochs * steps_per_epoch

    class TimeCosine(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self._t0 = time.perf_counter()
            self._step = start_step
            self._warm_end_s: float | None = None

        def on_train_batch_begin(self, batch, logs=None):
            now = spent_seconds + time.perf_counter() - self._t0
            if self._step < warmup_steps:
                lr = cfg.learning_rate * (self._step + 1) / warmup_steps
            else:
                if self._warm_end_s is None:
                    self._warm_end_s = now if warmup_steps and self._step == warmup_steps else 0.0
                span = max(1.0, budget - self._warm_end_s)
                by_steps = (self._step - warmup_steps + 1) / max(1, cap_steps - warmup_steps)
                frac = min(1.0, max(0.0, (now - self._warm_end_s) / span, by_steps))
                lr = cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * frac))
            self.model.optimizer.learning_rate.assign(lr)
            self._step += 1

    return TimeCosine()


def _early_stopping(cfg: TrainParams, monitor: str, spent_seconds: float = 0.0):
    """EarlyStopping with best-weights restore. Under lr_schedule cosine_time it neither stops nor
    counts an epoch as the best until early_stop_after of the max_minutes budget is spent: while the
    rate is high the validation loss jumps from epoch to epoch. Patience 15 cut a 64 px PBC run at
    epoch 52 of about 140 (external accuracy 0.980), and a lucky dip picked epoch 101 of 220, at
    half the peak rate (val accuracy 0.982 against 0.987 at the annealed end). tracked_from is
    the first epoch (1-based) that could be the best; None if the hold never ended (the last
    epoch's weights are kept then)."""
    import keras

    hold_until = (60.0 * cfg.max_minutes * cfg.early_stop_after
                  if cfg.lr_schedule == "cosine_time" and cfg.max_minutes else 0.0)

    class BudgetAwareEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self._t0 = time.perf_counter()
            self.tracked_from = None

        def on_epoch_end(self, epoch, logs=None):
            if spent_seconds + time.perf_counter() - self._t0 < hold_until:
                return  # mid-schedule: neither a candidate for the best nor a reason to stop
            if self.tracked_from is None:
                self.tracked_from = epoch + 1
            return super().on_epoch_end(epoch, logs)

    return BudgetAwareEarlyStopping(monitor=monitor, patience=cfg.patience,
                                    restore_best_weights=cfg.keep_weights == "best")


def _time_budget(max_minutes: float, spent_seconds: float = 0.0):
    import keras

    class TimeBudget(keras.callbacks.Callback):
        """Stops training once another epoch would end past max_minutes (judged by the slowest
        epoch so far, not counting the first, which also decodes and caches the images)."""

        def on_train_begin(self, logs=None):
            self._t0 = time.perf_counter()
            self._durations: list[float] = []
            self.stopped_epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            self._durations.append(now - self._epoch_t0)
            if spent_seconds + now - self._t0 + max(self._durations[1:] or self._durations) > 60 * max_minutes:
                self.stopped_epoch = epoch + 1
                self.model.stop_training = True

    return TimeBudget()


def _model_file(folder: Path | None) -> Path | None:
    return None if folder is None else Path(folder) / MODEL_FILE


RESUME_SUFFIX = ".resume"   # <model_dir>.resume beside the model folder: survives its clearing


def resume_dir(model_dir: Path) -> Path:
    """Where a running job keeps its last checkpoint (weights + optimizer + epoch) and its
    per-epoch log, so that a killed job continues when run again with the same inputs."""
    return model_dir.parent / f".{model_dir.name}{RESUME_SUFFIX}"


def training_fingerprint(cfg: TrainParams, classes: tuple[str, ...], seed: int, dataset_path: Path,
                         extra_inputs: dict[str, str] | None = None) -> str:
    """What makes two runs 'the same job': params, classes, seed, the dataset table's bytes
    (and the sha256 of a warm-start model or backbone weights file)."""
    import hashlib

    from hemaflow.model_folder import sha256_file

    blob = json.dumps({"params": cfg.model_dump(mode="json"), "classes": list(classes), "seed": seed,
                       "dataset": sha256_file(dataset_path), "inputs": extra_inputs or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_resume_dir(model_dir: Path, fingerprint: str) -> tuple[Path, list[dict]]:
    """The resume folder for this job: a checkpoint of the same job is kept (returns its
    epoch log), one of another job (other params or data) is discarded."""
    folder = resume_dir(model_dir)
    marker = folder / "fingerprint.txt"
    if folder.exists() and (not marker.is_file() or marker.read_text().strip() != fingerprint):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")
    return folder, read_epoch_log(folder / "epochs.jsonl")


def repair_checkpoint(folder: Path) -> str:
    """Make a checkpoint folder that a kill cut mid-save loadable again: 'ok', 'previous' or 'discarded'.

    keras.callbacks.BackupAndRestore truncates training_metadata.json before it writes it, and
    falls back to its previous (.bkp) checkpoint only when the weights file is torn (OSError), so
    a kill between the truncation and the write (the test kills right after an epoch is logged,
    which is when the checkpoint is saved) left an empty file on which the next run died with a
    JSONDecodeError. Here the previous weights + metadata pair replaces a torn metadata file; with
    no readable previous pair the checkpoint is dropped and the job starts over (nothing else to trust)."""
    meta, weights = folder / "training_metadata.json", folder / "latest.weights.h5"
    if not meta.exists() or _metadata_epoch(meta) is not None:
        return "ok"
    prev_meta, prev_weights = Path(f"{meta}.bkp"), Path(f"{weights}.bkp")
    if _metadata_epoch(prev_meta) is not None and prev_weights.is_file():
        shutil.copyfile(prev_weights, weights)
        shutil.copyfile(prev_meta, meta)
        return "previous"
    for path in (meta, weights, prev_meta, prev_weights):
        path.unlink(missing_ok=True)
    return "discarded"


def _metadata_epoch(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_epoch(folder: Path, checkpoint: str = "checkpoint") -> int:
    """Epochs completed by a checkpoint in a resume folder (0: none, start from scratch)."""
    epoch = _metadata_epoch(folder / checkpoint / "training_metadata.json")
    return epoch if epoch is not None and (folder / checkpoint / "latest.weights.h5").is_file() else 0


# the first phase of a two-phase job (frozen base, then fine-tuning), kept in the resume folder
PHASE1_WEIGHTS, PHASE1_MARKER, FINE_TUNE_CHECKPOINT = "phase1.weights.h5", "phase1.json", "fine_tune_checkpoint"


def save_first_phase(model, folder: Path) -> int:
    """Keep the finished first phase (its kept weights and optimizer state) so that a kill
    during fine-tuning does not redo it; the marker is written last. Returns its epochs."""
    epochs = len(read_epoch_log(folder / "epochs.jsonl"))
    model.save_weights(folder / PHASE1_WEIGHTS)
    (folder / PHASE1_MARKER).write_text(json.dumps({"epochs": epochs}) + "\n")
    return epochs


def finished_first_phase(folder: Path) -> dict | None:
    """{epochs} of a first phase this job already finished, or None (run it)."""
    try:
        info = json.loads((folder / PHASE1_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if (folder / PHASE1_WEIGHTS).is_file() and int(info.get("epochs", 0)) > 0 else None


def read_epoch_log(path: Path) -> list[dict]:
    """Per-epoch records, last write per epoch wins (an epoch redone after a kill)."""
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        rows[int(row["epoch"])] = row
    return [rows[k] for k in sorted(rows)]


def _epoch_log(path: Path):
    import keras

    class EpochLog(keras.callbacks.Callback):
        """Appends {epoch, metrics, seconds} per epoch, flushed to disk before the checkpoint."""

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._t0, 4),
                   **{k: float(v) for k, v in (logs or {}).items()}}
            try:  # the rate at the end of the epoch (a schedule is evaluated at the current step)
                row["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))
            except (AttributeError, TypeError, ValueError):
                pass
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    return EpochLog()


def train_model(dataset_dir: Path, model_dir: Path, cfg: TrainParams, classes: tuple[str, ...], seed: int,
                progress: Progress | None = None, init_model: Path | None = None,
                backbone_weights: Path | None = None) -> TrainResult:
    """Train cfg.architecture (or continue from the hemaflow model folder init_model, or a
    backbone with its weights from a local file); write model.keras, labels.json,
    history.json, training_curves.png and train_summary.json into model_dir.

    A killed job resumes from its last epoch when run again with the same inputs (the
    checkpoint lives beside model_dir, see resume_dir), in either phase: a kill during
    fine-tuning keeps the finished first phase and continues the second."""
    dataset_dir, model_dir = Path(dataset_dir), Path(model_dir)
    dataset_path = dataset_dir / "dataset.parquet"
    df = read_dataset(dataset_path, classes)
    train_df, val_df = df[df["split"] == "train"], df[df["split"] == "val"]
    if train_df.empty:
        raise StageInputError(dataset_path, "no rows with split == 'train'")

    # Device setup first: cpu:N must configure logical devices before any TF op runs.
    from hemaflow.devices import describe_strategy, resolve_precision, select_strategy

    strategy = select_strategy(cfg.devices)
    precision = resolve_precision(cfg.precision, strategy)
    import keras
    import tensorflow as tf

    prepare_output_dir(model_dir, dataset_dir)
    from hemaflow.model_folder import sha256_file

    if backbone_weights is not None:
        require_file(backbone_weights, "backbone weights file")
    if init_model is not None:
        require_file(Path(init_model) / MODEL_FILE, "warm-start model")
    extra_inputs = {name: sha256_file(path) for name, path in (("init_model", _model_file(init_model)),
                                                              ("backbone_weights", backbone_weights)) if path}
    backup, done_before = open_resume_dir(model_dir, training_fingerprint(cfg, classes, seed, dataset_path,
                                                                          extra_inputs))
    phase1 = finished_first_phase(backup) if cfg.fine_tune_epochs else None
    for checkpoint in ("checkpoint", FINE_TUNE_CHECKPOINT):
        repair_checkpoint(backup / checkpoint)
    resumed_from = checkpoint_epoch(backup, FINE_TUNE_CHECKPOINT if phase1 else "checkpoint") or (
        phase1["epochs"] if phase1 else 0)
    done_before = [r for r in done_before if r["epoch"] <= resumed_from]
    if not resumed_from:
        (backup / "epochs.jsonl").unlink(missing_ok=True)
    keras.utils.set_random_seed(seed)
    # the network's outputs: params' classes, or their subtypes (hemaflow/subclasses.py)
    targets, label_of, merge = classes, df["label"].astype(str), None
    if cfg.subclasses == "file_prefix":
        from hemaflow.subclasses import class_sum_matrix, subtype_labels, subtype_list

        label_of = pd.Series(subtype_labels(list(label_of), list(df["source_id"].astype(str)),
                                            list(df["split"] == "train")), index=df.index)
        targets = subtype_list(list(label_of), classes)
        merge = class_sum_matrix(targets, classes) if targets != classes else None  # subtypes -> classes
    index = {c: i for i, c in enumerate(targets)}
    replicas = strategy.num_replicas_in_sync
    if len(train_df) < replicas:
        raise StageInputError(dataset_path, f"{len(train_df)} train row(s) cannot feed {replicas} replicas")
    val_unused = len(val_df) % replicas  # see replica_batch_size; always 0 on one device
    val_df = val_df.iloc[: len(val_df) - val_unused]
    global_batch = replica_batch_size(cfg.batch_size, len(train_df), replicas)
    per_epoch = len(train_df) // global_batch * global_batch if replicas > 1 else len(train_df)

    augment = online_augment_options(cfg) if cfg.online_augmentation else None

    def as_dataset(part: pd.DataFrame, shuffle: bool):
        paths = [str(dataset_dir / p) for p in part["path"]]
        return make_image_dataset(paths, [index[c] for c in label_of[part.index]], cfg.image_size,
                                  replica_batch_size(cfg.batch_size, len(part), replicas),
                                  shuffle_seed=seed if shuffle else None, drop_remainder=shuffle and replicas > 1,
                                  n_classes=len(targets), augment=augment if shuffle else None, augment_seed=seed)

    train_ds = as_dataset(train_df, shuffle=True)
    val_ds = as_dataset(val_df, shuffle=False) if len(val_df) else None
    monitor = "val_loss" if val_ds is not None else "loss"
    steps_per_epoch = len(train_df) // global_batch if replicas > 1 else -(-len(train_df) // global_batch)
    train_labels = [index[c] for c in label_of[train_df.index]]
    class_weight = balanced_class_weights(train_labels, len(targets)) if cfg.class_weight == "balanced" else None

    with strategy.scope():
        previous_policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(precision)
        try:
            model, warm = _initial_model(cfg, targets, seed, init_model, backbone_weights)
        finally:
            keras.config.set_dtype_policy(previous_policy)
        if cfg.sam_rho:  # trains through the wrapper; the network itself is what is saved
            from hemaflow.sharpness import SharpnessAware

            model = SharpnessAware(model, cfg.sam_rho)
        model.compile(optimizer=build_optimizer(cfg, steps_per_epoch),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                      metrics=_metrics(merge))

    timer = _epoch_timer()
    spent_before = sum(r["seconds"] for r in done_before)
    stopper = _early_stopping(cfg, monitor, spent_before)
    budget = _time_budget(cfg.max_minutes, spent_before) if cfg.max_minutes else None
    # the epoch log is written before the checkpoint: a kill in between redoes that epoch,
    # and read_epoch_log keeps its last record
    restore = keras.callbacks.BackupAndRestore(str(backup / "checkpoint"), save_freq="epoch", double_checkpoint=True)
    callbacks = [_epoch_log(backup / "epochs.jsonl"), restore, stopper, timer] + ([budget] if budget else []) + (
        [_progress_callback(progress, cfg.epochs, timer, cfg.max_minutes, spent_before)] if progress else [])
    if cfg.lr_schedule == "cosine_time":
        callbacks.append(_time_cosine(cfg, steps_per_epoch, spent_before, resumed_from * steps_per_epoch))
    t0 = time.perf_counter()
    fit_history: dict = {}
    try:
        if phase1:  # killed while fine-tuning: the first phase's result is kept, not redone
            with strategy.scope():
                model.optimizer.build(model.trainable_variables)  # its state is in the file too
            model.load_weights(backup / PHASE1_WEIGHTS)
        else:
            fit_history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks,
                                    shuffle=False, verbose=0, class_weight=class_weight).history
        phase2_from = None
        if cfg.fine_tune_epochs and not (budget and budget.stopped_epoch):
            phase2_from = phase1["epochs"] if phase1 else save_first_phase(model, backup)
            _fine_tune(model, strategy, cfg, train_ds, val_ds, class_weight, phase2_from, monitor,
                       [_epoch_log(backup / "epochs.jsonl"), keras.callbacks.BackupAndRestore(
                           str(backup / FINE_TUNE_CHECKPOINT), save_freq="epoch", double_checkpoint=True), timer],
                       _metrics(merge))
    except tf.errors.OpError:
        bad = find_unreadable([str(dataset_dir / p) for p in df["path"]])
        if bad:
            raise StageInputError(bad[0], f"image listed in {dataset_path.name} cannot be decoded: {bad[1]}") from None
        raise
    seconds = time.perf_counter() - t0

    log = read_epoch_log(backup / "epochs.jsonl")
    keys = list(dict.fromkeys([*fit_history, *(k for r in log for k in r if k not in ("epoch", "seconds"))]))
    history = {k: [float(r.get(k, float("nan"))) for r in log] for k in keys}
    history["epoch_seconds"] = [r["seconds"] for r in log]
    epochs_run = len(log)
    # the kept weights are the best of this run's epochs (a resumed job restarts early stopping)
    if phase2_from is not None:
        first = resumed_from if phase2_from <= resumed_from < epochs_run else phase2_from
    else:
        first = resumed_from if resumed_from < epochs_run else 0
    tracked_from = getattr(stopper, "tracked_from", None)  # None: cosine_time's hold never ended
    if phase2_from is None and tracked_from is not None:
        first = max(first, tracked_from - 1)
    held_throughout = phase2_from is None and tracked_from is None
    lowest_epoch = epochs_run if held_throughout else first + int(np.argmin(history[monitor][first:])) + 1
    best_epoch = epochs_run if cfg.keep_weights == "last" else lowest_epoch  # the epoch whose weights are kept
    if progress and epochs_run < cfg.epochs:
        progress(epochs_run, epochs_run)  # stopped early (patience or time budget): training is complete

    if cfg.sam_rho:
        model = model.inner
    calibration = (calibrate_model(model, val_ds, [classes.index(c) for c in val_df["label"]], merge)
                   if cfg.calibrate == "temperature" and val_ds is not None else None)
    if merge is not None:  # subtype probabilities summed into params' classes
        from hemaflow.subclasses import with_class_sum

        model = with_class_sum(model, merge)
    model.save(model_dir / MODEL_FILE)
    (model_dir / LABELS_FILE).write_text(json.dumps(list(classes), indent=2) + "\n")
    (model_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    plot_training_curves(history, best_epoch, model_dir / "training_curves.png", title=cfg.architecture)

    n_images = {s: int((df["split"] == s).sum()) for s in SPLITS}
    result = TrainResult(
        model_dir=model_dir, architecture=cfg.architecture, epochs_run=epochs_run, best_epoch=best_epoch,
        n_images=n_images, seconds=seconds + spent_before,
        images_per_second=per_epoch * (epochs_run - resumed_from) / seconds,
        strategy=describe_strategy(strategy),
        best={k: v[best_epoch - 1] for k, v in history.items() if k != "epoch_seconds"},
    )
    steady = timer.seconds[1:] or timer.seconds  # epoch 1 also decodes and caches the images
    summary = {
        "params": cfg.model_dump(), "classes": list(classes), "seed": seed,
        "n_images": n_images,
        "n_images_per_class_train": train_df["label"].value_counts().reindex(classes, fill_value=0).to_dict(),
        "epochs_run": epochs_run, "best_epoch": best_epoch, "keep_weights": cfg.keep_weights,
        "lowest_monitor_epoch": lowest_epoch, "monitor": monitor, "best_metrics": result.best,
        "global_batch_size": global_batch, "train_images_per_epoch": per_epoch,
        "val_rows_unused": val_unused, "steps_per_epoch": steps_per_epoch,
        "class_weight": {targets[i]: round(w, 4) for i, w in class_weight.items()} if class_weight else None,
        "subtypes_train": (label_of[train_df.index].value_counts().reindex(targets, fill_value=0).to_dict()
                           if merge is not None else None),
        "stopped_by_time_budget": bool(budget and budget.stopped_epoch),
        "resumed_from_epoch": resumed_from,
        "warm_start": ({**warm, "init_model": str(init_model), "init_model_sha256": extra_inputs["init_model"]}
                       if init_model else None),
        "backbone_weights": ({"path": str(backbone_weights), "sha256": extra_inputs["backbone_weights"],
                              "frozen_first": cfg.freeze_base} if backbone_weights else None),
        "fine_tune_from_epoch": phase2_from, "precision": precision,
        "calibration": calibration,
        "seconds": round(seconds, 3), "images_per_second": round(result.images_per_second, 1),
        "images_per_second_steady": round(per_epoch / float(np.median(steady)), 1),
        "model_parameters": int(model.count_params()),
        **result.strategy, "tensorflow": tf.__version__, "keras": keras.__version__,
    }
    (model_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(backup, ignore_errors=True)  # the job is complete: nothing to resume
    return result


def calibrate_model(model, val_ds, val_labels: list[int], merge: np.ndarray | None = None) -> dict:
    """Temperature scaling on the validation split (hemaflow/calibration.py), in place; the
    val log-loss and ECE before and after go into train_summary.json. With merge (a model
    over subtypes), val_labels are class indices and T is fitted for the summed classes."""
    from hemaflow.calibration import apply_temperature, fit_temperature, scale_probs
    from hemaflow.scoring import log_loss, reliability

    probs = model.predict(val_ds, verbose=0)
    y = np.asarray(val_labels)
    t = fit_temperature(probs, y, merge)
    apply_temperature(model, t)
    after = scale_probs(probs, t, merge)
    probs = probs if merge is None else probs @ merge
    return {"method": "temperature", "temperature": round(t, 4), "val_images": int(len(y)),
            "val_log_loss_before": round(log_loss(y, probs), 4), "val_log_loss_after": round(log_loss(y, after), 4),
            "val_ece_before": round(reliability(y, probs)[0], 4), "val_ece_after": round(reliability(y, after)[0], 4)}


def _initial_model(cfg: TrainParams, classes: tuple[str, ...], seed: int, init_model: Path | None,
                   backbone_weights: Path | None):
    """The network before training: built from params, or continued from a hemaflow model."""
    from hemaflow.config import ConfigError
    from hemaflow.models import build_model

    shape = (cfg.image_size, cfg.image_size, 3)
    if init_model is not None:
        import keras

        from hemaflow.model_folder import open_model_folder
        from hemaflow.warm_start import warm_start_model

        source = open_model_folder(init_model)  # sha256-checked against its card when pulled
        try:
            loaded = keras.models.load_model(source.model_path, compile=False, safe_mode=True)
        except Exception as exc:
            raise StageInputError(source.model_path, f"cannot be loaded as a Keras model: {exc}") from exc
        try:
            return warm_start_model(loaded, source.classes, classes, shape, seed)
        except ValueError as exc:
            raise StageInputError(source.model_path, str(exc)) from None
    try:
        model = build_model(cfg.architecture, shape, len(classes), online_augmentation=cfg.augmentation_layers,
                            units=cfg.units, kernels=cfg.kernels, kernel_size=cfg.kernel_size, dropout=cfg.dropout,
                            width=cfg.width, depth=cfg.depth, stem_stride=cfg.stem_stride,
                            weights_path=backbone_weights,
                            freeze_base=cfg.freeze_base)
    except FileNotFoundError as exc:
        raise StageInputError(backbone_weights, "backbone weights file not found") from exc
    except ValueError as exc:
        if backbone_weights is not None and str(backbone_weights) in str(exc):
            raise StageInputError(backbone_weights, str(exc).split(": ", 1)[-1]) from None
        raise ConfigError(f"train: {exc}") from None
    return model, None


def _metrics(merge: np.ndarray | None) -> list:
    """accuracy over the network's outputs, and over params' classes when those are subtypes
    (merge: hemaflow/subclasses.py's class_sum_matrix)."""
    import keras

    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if merge is not None:
        from hemaflow.subclasses import class_accuracy

        metrics.append(class_accuracy(merge))
    return metrics


def _fine_tune(model, strategy, cfg: TrainParams, train_ds, val_ds, class_weight, start_epoch: int, monitor: str,
               callbacks: list, metrics: list) -> None:
    """Second phase: the whole network (a frozen base unfrozen) at fine_tune_learning_rate."""
    import keras

    from hemaflow.backbones import unfreeze_base

    with strategy.scope():
        unfreeze_base(getattr(model, "inner", model))  # the network itself, also inside SharpnessAware
        optimizer = (keras.optimizers.AdamW(cfg.fine_tune_learning_rate, weight_decay=cfg.weight_decay)
                     if cfg.optimizer == "adamw" else keras.optimizers.Adam(cfg.fine_tune_learning_rate))
        model.compile(optimizer=optimizer,
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                      metrics=metrics)
    stopper = keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.patience,
                                            restore_best_weights=cfg.keep_weights == "best")
    model.fit(train_ds, validation_data=val_ds, initial_epoch=start_epoch, epochs=start_epoch + cfg.fine_tune_epochs,
              callbacks=callbacks + [stopper], shuffle=False, verbose=0, class_weight=class_weight)


def plot_training_curves(history: dict[str, list[float]], best_epoch: int, png_path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train vs val, with the kept (best) epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    accuracy = ("class_accuracy", "Accuracy (classes; trained on subtypes)") if "class_accuracy" in history else (
        "accuracy", "Accuracy")
    for ax, (metric, label) in zip(axes, (("loss", "Loss (cross-entropy)"), accuracy)):
        ax.plot(epochs, history[metric], "o-", color="tab:blue", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "s-", color="tab:orange", label="validation")
        kept = history.get(f"val_{metric}", history[metric])[best_epoch - 1]
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1,
                   label=f"kept: epoch {best_epoch} ({'val ' if f'val_{metric}' in history else ''}{kept:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_yscale("log")  # early spikes would flatten the part that matters, the tail
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axes[0].yaxis.set_major_formatter(plain)
    axes[0].yaxis.set_minor_formatter(plain)
    axes[1].set_ylim(0, 1.02)
    fig.suptitle(f"Training curves {title}".strip())
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
