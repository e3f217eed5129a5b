"""Training speed on an accelerator against this CPU: images/s with and without mixed precision.

Why: issue 9 asks for GPU against CPU images/s of the training job, with and without mixed
precision. The GPU machine lent here (one H200) has PyTorch and JAX but no TensorFlow, nothing
can be installed there from a registry, and TensorFlow with its CUDA libraries is far over the
64 MiB that travels to it. So this benchmark runs hemaflow's own Keras 3 model builder
(hemaflow.models, plain Keras layers) on Keras' JAX backend there (torch as a fallback) and on
TensorFlow here; the images are the pipeline's own crops (benchmarks/train.py's work dir:
train/val/test splits and the scored external folder), packed once as uint8 arrays.

- `pack` (here, project venv): the work dir's crops -> one .npz (JPEG q98 bytes, split, class, subtype).
- `measure` (anywhere Keras 3 runs): per precision, model.fit over in-memory tensors for a few
  epochs; images/s is the training images over the median epoch time after the first (compile)
  epoch. With --train-epochs it then trains the recipe for that many epochs (dihedral flips and
  90-degree turns per epoch, AdamW + warm-up/cosine, label smoothing 0.1, on subtypes, last epoch
  kept) and scores the test split and the external folder with 8-view TTA.

    .venv/bin/python benchmarks/train_gpu.py pack [--work-dir ../hemaflow-train-bench] [--out .gpu/pbc64.npz]
    python benchmarks/train_gpu.py measure [--data .gpu/pbc64.npz] [--backend jax|torch|tensorflow]
        [--precision float32 --precision mixed_bfloat16 ...] [--epochs 4] [--batch-size 128]
        [--train-epochs N] [--train-precision mixed_bfloat16] [--set width=48 ...]

It prints a readable table and ends with one JSON line of its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
# the 64 px recipe of the README table (stop 25): the 1.57M resnet_small on subtypes
JPEG_QUALITY = 98  # the packed crops differ from the PNGs by JPEG noise (mean |diff| printed by pack)
RECIPE = {"architecture": "resnet_small", "width": 48, "depth": 2, "stem_stride": 2, "learning_rate": 0.003,
          "weight_decay": 0.05, "label_smoothing": 0.1, "warmup_epochs": 1}


# ------------------------------------------------------------------ pack (needs the project venv)

def read_crop(path: Path, size: int) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"{path}: not a readable image")
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img[:, :, ::-1]  # BGR -> RGB, as tf.io.decode_image gives


def encode_jpeg(x: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """All images as one byte array of JPEGs, each prefixed by its length (uint32): a uint8 array
    of 10k 64 px crops is 90 MiB even compressed, over the 64 MiB that travels to the GPU machine."""
    import cv2

    chunks = []
    for img in x:
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        chunks += [np.array([len(buf)], dtype="<u4").view(np.uint8), buf.ravel()]
    return np.concatenate(chunks)


def decode_jpeg(blob: np.ndarray) -> np.ndarray:
    import cv2

    images, i = [], 0
    while i < len(blob):
        n = int(blob[i:i + 4].view("<u4")[0])
        images.append(cv2.imdecode(blob[i + 4:i + 4 + n], cv2.IMREAD_COLOR)[:, :, ::-1])
        i += 4 + n
    return np.stack(images)


def pack(work: Path, out: Path, size: int, model_tag: str) -> None:
    import pandas as pd

    from hemaflow.subclasses import subtype_labels

    ds = pd.read_parquet(work / "augmented" / "dataset.parquet")
    ds = ds[~ds["augmented"]]
    rows = [(work / "augmented" / p, s, c, sid) for p, s, c, sid in
            zip(ds["path"], ds["split"], ds["label"], ds["source_id"])]
    ext_dir = work / "eval" / model_tag / "external"
    pred = ext_dir / "predictions.csv"
    if not pred.is_file():
        raise SystemExit(f"{pred}: missing; run benchmarks/train.py (it scores the external folder) first")
    ext = pd.read_csv(pred)  # the external images evaluate scored (those seen in training dropped)
    rows += [(ext_dir / "crops" / p, "external", c, Path(p).stem) for p, c in zip(ext["path"], ext["label"])]
    x = np.stack([read_crop(p, size) for p, *_ in rows])
    split = np.array([r[1] for r in rows])
    cls = np.array([CLASSES.index(r[2]) for r in rows], dtype=np.int8)
    fine = np.array(subtype_labels([r[2] for r in rows], [r[3] for r in rows], count_in=list(split == "train")))
    out.parent.mkdir(parents=True, exist_ok=True)
    names = np.array([f"{p.parent.name}/{p.name}" for p, *_ in rows])
    np.savez(out, jpeg=encode_jpeg(x), size=size, split=split, cls=cls, fine=fine, name=names)
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test", "external")}
    diff = np.abs(decode_jpeg(np.load(out)["jpeg"]).astype(np.int16) - x).mean()
    print(f"mean |JPEG - PNG| {diff:.2f} grey levels of 255")
    print(f"packed {len(rows)} crops of {size} px from {work} into {out} ({out.stat().st_size / 2**20:.1f} MiB): {counts}")


# ------------------------------------------------------------------ measure (plain Keras 3)

def load(path: Path):
    d = np.load(path)
    return decode_jpeg(d["jpeg"]), d["split"], d["cls"], d["fine"], d["name"]


def dihedral_np(x: np.ndarray, k: int) -> np.ndarray:
    """View k (0-7) of a batch, as hemaflow.tta.dihedral: k // 4 mirrors, k % 4 quarter turns."""
    if k >= 4:
        x = x[:, :, ::-1]
    return np.rot90(x, k % 4, axes=(1, 2)) if k % 4 else x


def augment_epoch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and transposes per image (all 8 dihedral views), as train's online augmentation."""
    out = x.copy()
    for axis, flips in ((1, rng.random(len(x)) < 0.5), (2, rng.random(len(x)) < 0.5)):
        out[flips] = np.flip(out[flips], axis=axis)
    t = rng.random(len(x)) < 0.5
    out[t] = out[t].transpose(0, 2, 1, 3)
    return out


def build(keras, recipe: dict, size: int, n_out: int, precision: str, steps_per_epoch: int, epochs: int):
    from hemaflow.models import build_model

    keras.config.set_dtype_policy(precision)
    try:
        model = build_model(recipe["architecture"], (size, size, 3), n_out, width=recipe["width"],
                            depth=recipe["depth"], stem_stride=recipe["stem_stride"])
    finally:
        keras.config.set_dtype_policy("float32")
    warmup = int(recipe["warmup_epochs"] * steps_per_epoch)
    lr = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, epochs * steps_per_epoch - warmup),
                                                warmup_target=recipe["learning_rate"], warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=recipe["weight_decay"]),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe["label_smoothing"]))
    return model


def epoch_timer(keras):
    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._t0)

    return EpochTimer()


def speed(keras, x, y, recipe, precision, epochs, batch_size, seed) -> dict:
    """Training images/s on in-memory tensors: median epoch time after the first (compile) one."""
    keras.utils.set_random_seed(seed)
    steps = int(np.ceil(len(x) / batch_size))
    model = build(keras, recipe, x.shape[1], y.shape[1], precision, steps, epochs)
    timer = epoch_timer(keras)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=[timer])
    total = time.perf_counter() - t0
    steady = float(np.median(timer.times[1:])) if len(timer.times) > 1 else timer.times[0]
    return {"precision": precision, "images_per_s": round(len(x) / steady, 1), "first_epoch_s": round(timer.times[0], 2),
            "steady_epoch_s": round(steady, 3), "epochs": epochs, "batch_size": batch_size, "seconds": round(total, 1),
            "params": int(model.count_params())}


def predict(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """model(x) in batches, not model.predict: with Keras 3.15.1 on JAX 0.11.2 (CPU, stop 26)
    model.predict of a mixed_bfloat16 model returned NaN for every image while calling the
    model on the same batch gave finite probabilities (TensorFlow's predict was fine)."""
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False), dtype=np.float32)
                           for i in range(0, len(x), batch_size)])


def predict_tta(model, x: np.ndarray) -> np.ndarray:
    return np.mean([predict(model, np.ascontiguousarray(dihedral_np(x, k))) for k in range(8)], axis=0)


def train_and_score(keras, data, recipe, precision, epochs, batch_size, seed, max_minutes: float = 0.0) -> dict:
    """The recipe for `epochs` epochs (last epoch kept), scored on test and external with TTA;
    with max_minutes, training stops after the epoch that crosses it (the cosine then unfinished)."""
    x, split, cls, fine, names = data
    subtypes = sorted(set(fine[split == "train"]), key=lambda f: (CLASSES.index(f.split(":")[0]), f))
    parent = np.array([CLASSES.index(f.split(":")[0]) for f in subtypes])
    index = {f: i for i, f in enumerate(subtypes)}
    tr = split == "train"
    xtr = x[tr].astype(np.float32)
    ytr = np.eye(len(subtypes), dtype=np.float32)[[index[f] for f in fine[tr]]]
    keras.utils.set_random_seed(seed)
    steps = int(np.ceil(len(xtr) / batch_size))
    model = build(keras, recipe, x.shape[1], len(subtypes), precision, steps, epochs)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    done = 0
    for ep in range(epochs):
        model.fit(augment_epoch(xtr, rng), ytr, batch_size=batch_size, epochs=ep + 1, initial_epoch=ep,
                  shuffle=True, verbose=0)
        done = ep + 1
        if done % 25 == 0:
            print(f"  epoch {done}/{epochs}: {time.perf_counter() - t0:.0f} s", flush=True)
        if max_minutes and time.perf_counter() - t0 > max_minutes * 60:
            break
    seconds = time.perf_counter() - t0
    scores = {}
    for part in ("test", "external"):
        m = split == part
        probs = predict_tta(model, x[m].astype(np.float32))
        class_probs = np.zeros((len(probs), len(CLASSES)))
        np.add.at(class_probs.T, parent, probs.T)  # subtype probabilities summed into their class
        pred = class_probs.argmax(1)
        true = cls[m].astype(int)
        recalls = [float((pred[true == c] == c).mean()) for c in range(len(CLASSES)) if (true == c).any()]
        scores[part] = {"n": int(m.sum()), "accuracy": round(float((pred == true).mean()), 4),
                        "balanced_accuracy": round(float(np.mean(recalls)), 4), "errors": int((pred != true).sum()),
                        "wrong": {str(n): f"{CLASSES[p]} {class_probs[i, p]:.3f}" for i, (n, p, t) in
                                  enumerate(zip(names[m], pred, true)) if p != t}}
    return {"precision": precision, "epochs": done, "epochs_planned": epochs, "batch_size": batch_size,
            "training_s": round(seconds, 1), "train_images_per_s": round(done * len(xtr) / seconds, 1), "subtypes": len(subtypes), **scores}


def device_name(backend: str) -> str:
    try:
        if backend == "jax":
            import jax

            return str(jax.devices()[0].device_kind)
        if backend == "torch":
            import torch

            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return gpus[0].name if gpus else "cpu"
    except Exception as exc:  # the device name is decoration; never fail the benchmark on it
        return f"unknown ({exc})"


def measure(args) -> dict:
    os.environ["KERAS_BACKEND"] = args.backend
    import keras

    recipe = dict(RECIPE)
    for kv in args.set:
        key, _, value = kv.partition("=")
        recipe[key] = type(RECIPE.get(key, ""))(value) if key in RECIPE else value
    data = load(args.data)
    if args.limit:  # a smoke run: N random rows of each split
        rng = np.random.default_rng(args.seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(data[1] == s))[:args.limit] for s in np.unique(data[1])])
        data = tuple(a[np.sort(keep)] for a in data)
    x, split, cls, fine, _ = data
    tr = split == "train"
    xtr = x[tr].astype(np.float32)
    ytr = np.eye(len(CLASSES), dtype=np.float32)[cls[tr].astype(int)]
    device = device_name(args.backend)
    print(f"backend {keras.backend.backend()} on {device}; {int(tr.sum())} training crops of {x.shape[1]} px; "
          f"model {recipe['architecture']} width {recipe['width']} depth {recipe['depth']}", flush=True)
    rows = []
    for precision in (args.precision or ["float32", "mixed_bfloat16"]) if args.epochs > 0 else []:
        for bs in args.batch_size or [128]:
            r = speed(keras, xtr, ytr, recipe, precision, args.epochs, bs, args.seed)
            rows.append(r)
            print(f"  {precision:<15} batch {bs:<5} {r['images_per_s']:>10,.0f} images/s "
                  f"(first epoch {r['first_epoch_s']} s, then {r['steady_epoch_s']} s)", flush=True)
    trained = None
    if args.train_epochs:
        trained = train_and_score(keras, data, recipe, args.train_precision, args.train_epochs,
                                  (args.batch_size or [128])[0], args.seed, args.train_minutes)
    print()
    head = ("precision", "batch", "images/s", "first epoch s", "epoch s", "params")
    table = [(r["precision"], r["batch_size"], f"{r['images_per_s']:,.0f}", r["first_epoch_s"], r["steady_epoch_s"],
              f"{r['params']:,}") for r in rows]
    widths = [max([len(str(h))] + [len(str(t[i])) for t in table]) for i, h in enumerate(head)]
    if rows:
        print(f"training speed, {keras.backend.backend()} on {device}:")
        print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
        for t in table:
            print("  ".join(str(v).ljust(w) for v, w in zip(t, widths)))
    if trained:
        print(f"\nrecipe trained {trained['epochs']} of {trained['epochs_planned']} epochs ({trained['precision']}) in {trained['training_s']} s "
              f"({trained['train_images_per_s']:,.0f} images/s incl. per-epoch augmentation): "
              f"test {trained['test']['accuracy']} ({trained['test']['errors']} errors of {trained['test']['n']}), "
              f"external {trained['external']['accuracy']} ({trained['external']['errors']} errors of "
              f"{trained['external']['n']})")
    figures = {"benchmark": "train_gpu", "backend": keras.backend.backend(), "device": device, "recipe": recipe,
               "speed": rows, "trained": trained}
    print(json.dumps(figures), flush=True)
    return figures


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="the pipeline's crops -> one .npz (run here, in the project venv)")
    p.add_argument("--work-dir", type=Path, default=ROOT.parent / "hemaflow-train-bench")
    p.add_argument("--model-tag", default="resnet_small_64", help="eval/<tag>/external holds the scored external crops")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / ".gpu" / "pbc64.npz")
    m = sub.add_parser("measure", help="images/s per precision (and optionally a full recipe run)")
    m.add_argument("--data", type=Path, default=ROOT / ".gpu" / "pbc64.npz")
    m.add_argument("--backend", default="jax", choices=("jax", "torch", "tensorflow"))
    m.add_argument("--precision", action="append", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    m.add_argument("--batch-size", type=int, action="append")
    m.add_argument("--epochs", type=int, default=4, help="epochs per speed measurement (the first compiles); 0: no speed rows")
    m.add_argument("--train-epochs", type=int, default=0, help="then train the recipe this long and score it")
    m.add_argument("--train-precision", default="mixed_bfloat16")
    m.add_argument("--train-minutes", type=float, default=0.0, help="stop the recipe run after this long")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a RECIPE entry")
    m.add_argument("--seed", type=int, default=42)
    m.add_argument("--limit", type=int, default=0, help="smoke run: at most N images per split")
    args = ap.parse_args(argv)
    if args.command == "pack":
        return pack(args.work_dir.resolve(), args.out, args.size, args.model_tag)
    return measure(args)


if __name__ == "__main__":
    main()
