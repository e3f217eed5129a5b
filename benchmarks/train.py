"""Training on real PBC images through the pipeline's own stages: accuracy, time, speed.

Why: a lab switches to hemaflow only if its model is at least as good as the notebook's on
images it never saw. Targets on this 2-core CPU: at 28x28, accuracy >= 0.985 within 20 minutes
of training; at 64x64, >= 0.99 within 60 minutes; each on the internal test split AND on an
external PBC folder the model never saw, the two within 1 point.

What it does (everything under --work-dir, outside the repository; raw data is only read):
- External folder: unless --test-data is given, --holdout-frac of every PBC class folder
  (seeded) is set aside as an external folder of hard links (or copies); the pipeline's raw
  folder holds the rest. So the held-out images never reach ingest, and evaluate still
  drops any external image whose content hash is in the training data (PBC has duplicates).
- Stages: the params file (default examples/pbc.params.yaml) with its paths moved to the
  work dir; ingest -> validate_labels -> segment -> split -> augment -> check_quality run once
  through hemaflow.tasks.stages.run_stage, then per --model NAME@SIZE: train and evaluate
  (evaluate scores the test split and the external folder, with the params' TTA setting).
- Input pipeline: train images/s out of the real tf.data pipeline (decode, uint8 cache,
  shuffle, augment, batch) against in-memory tensors of the same shape; target ratio >= 0.9.

    .venv/bin/python benchmarks/train.py [--data ../shared/data/pbc] [--model resnet_small@28]
        [--model shallow_cnn@28 ...] [--minutes 20] [--epochs N] [--set key=value] [--test-data FOLDER]
    .venv/bin/python benchmarks/train.py --pool WORK_DIR WORK_DIR ...   (runs on several --seed, pooled)
    .venv/bin/python benchmarks/train.py --compare WORK_DIR_A WORK_DIR_B (two recipes, one --seed, paired)

Every run measured so far, and what it taught: benchmarks/RESULTS.md (add yours there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hemaflow.config import TrainParams, load_params, read_params_dict  # noqa: E402

CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
# the CPU targets per image size: (accuracy on the test split and the external folder, minutes)
TARGETS = {28: (0.985, 20), 64: (0.99, 60)}
UPSTREAM = ("ingest", "validate_labels", "segment", "split", "augment", "check_quality")


def holdout_split(data_dir: Path, work: Path, frac: float, seed: int) -> tuple[Path, Path, dict]:
    """work/raw (links to the kept images) and work/external (the held-out ones), per class folder."""
    rng = np.random.default_rng(seed)
    raw, ext = work / "raw", work / "external"
    counts = {}
    if raw.exists() and ext.exists() and (work / "holdout.json").is_file():
        info = json.loads((work / "holdout.json").read_text())
        if info.get("data") == str(data_dir.resolve()) and info.get("frac") == frac and info.get("seed") == seed:
            return raw, ext, info["counts"]
    import shutil

    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(ext, ignore_errors=True)
    for class_dir in sorted((data_dir / "images").iterdir()):
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        held = set(rng.choice(len(files), size=int(round(frac * len(files))), replace=False).tolist())
        for i, f in enumerate(files):
            dst = (ext if i in held else raw) / "images" / class_dir.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(f, dst)
        counts[class_dir.name] = {"kept": len(files) - len(held), "external": len(held)}
    (work / "holdout.json").write_text(json.dumps({"data": str(data_dir.resolve()), "frac": frac, "seed": seed,
                                                   "counts": counts}, indent=2))
    return raw, ext, counts


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (same bytes, no space; a symlink would point outside the data folder,
    which ingest rightly refuses), or a copy across file systems."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def work_params(base_params: Path, work: Path, raw: Path, external: Path | None) -> dict:
    """The example's params with every path inside the work dir (absolute)."""
    raw_params = read_params_dict(base_params)  # with `extends:` resolved
    raw_params["paths"] = {"raw_dir": str(raw), "manifest_path": str(work / "manifest.parquet"),
                           "labels_dir": str(work / "labels"), "crops_dir": str(work / "crops"),
                           "split_path": str(work / "split.parquet"), "augmented_dir": str(work / "augmented"),
                           "quality_dir": str(work / "quality"), "model_dir": str(work / "models" / "candidate"),
                           "eval_dir": str(work / "eval" / "candidate"),
                           "promotion_path": str(work / "promotion.json"),
                           "test_data": str(external) if external else None}
    return raw_params


def run(stage: str, params_dict: dict, work: Path, path: str = "params.yaml"):
    from hemaflow.tasks.stages import run_stage

    params_file = work / path
    params_file.write_text(yaml.safe_dump(params_dict, sort_keys=False))
    t0 = time.perf_counter()
    result = run_stage(stage, load_params(params_file), work)
    return result, time.perf_counter() - t0


def train_config(base_train: dict, spec: str, args) -> dict:
    """The params' train section with --model NAME@SIZE, --minutes, --epochs and --set applied."""
    name, _, size = spec.partition("@")
    train = {**base_train, "architecture": name or base_train["architecture"],
             "image_size": int(size or base_train["image_size"])}
    if args.minutes is not None:
        train["max_minutes"] = args.minutes
    if args.epochs is not None:
        train["epochs"] = args.epochs
    for kv in args.set:
        key, _, value = kv.partition("=")
        train[key] = yaml.safe_load(value)
    return train


def time_pipeline(dataset_dir: Path, cfg: TrainParams, n_batches: int = 40, seed: int = 42) -> dict:
    """Train images/s out of the tf.data pipeline (warm uint8 cache; with and without the online
    augmentation) vs the same shuffle + batch over in-memory tensors of the same shape."""
    import tensorflow as tf

    from hemaflow.tasks.train import make_image_dataset, online_augment_options

    df = pd.read_parquet(dataset_dir / "dataset.parquet")
    train = df[df["split"] == "train"]
    paths = [str(dataset_dir / p) for p in train["path"]]
    labels = [CLASSES.index(c) for c in train["label"]]
    augment = online_augment_options(cfg)

    def pipeline(aug):
        ds = make_image_dataset(paths, labels, cfg.image_size, cfg.batch_size, shuffle_seed=seed,
                                n_classes=len(CLASSES), augment=aug, augment_seed=seed)
        for _ in ds:  # warm-up pass: decode and fill the cache
            pass
        return ds

    s = cfg.image_size
    x = np.random.default_rng(seed).integers(0, 256, (len(paths), s, s, 3), dtype=np.uint8)
    y = np.eye(len(CLASSES), dtype=np.float32)[labels]
    mem = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(paths), seed=seed)
           .map(lambda a, b: (tf.cast(a, tf.float32), b)).batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE))

    def rate(d) -> float:
        next(iter(d))
        t0, n = time.perf_counter(), 0
        for xb, _ in d.repeat().take(n_batches):
            n += int(xb.shape[0])
        return n / (time.perf_counter() - t0)

    plain_ds, augmented_ds = pipeline(None), pipeline(augment)  # each decoded and cached once
    memory, plain, augmented = rate(mem), rate(plain_ds), rate(augmented_ds)
    fit = fit_rates(augmented_ds if cfg.online_augmentation else plain_ds, mem, cfg, seed)
    return {"tfdata_images_per_s": round(plain), "tfdata_augmented_images_per_s": round(augmented),
            "in_memory_images_per_s": round(memory), "ratio": round(plain / memory, 3),
            "augmented_ratio": round(augmented / memory, 3), **fit}


def fit_rates(pipeline_ds, memory_ds, cfg: TrainParams, seed: int, seconds: float = 10.0, rounds: int = 3) -> dict:
    """What matters for training: images/s of model.fit fed by the real pipeline vs fed by
    in-memory tensors, same model and batch, alternated `rounds` times; the ratio is the median
    of the per-round ratios (each pair measured back to back, so a busy neighbour on the shared
    cores slows both sides of a pair alike). Each measurement runs about `seconds`: 30 fixed
    steps took 5 s at 28 px and the three ratios of one run spread from 0.79 to 1.12."""
    import keras

    from hemaflow.models import build_model

    keras.utils.set_random_seed(seed)
    from hemaflow.devices import resolve_precision

    keras.config.set_dtype_policy(resolve_precision(cfg.precision))
    model = build_model(cfg.architecture, (cfg.image_size, cfg.image_size, 3), len(CLASSES), width=cfg.width,
                        depth=cfg.depth, stem_stride=cfg.stem_stride)
    keras.config.set_dtype_policy("float32")
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(memory_ds.take(3), verbose=0)  # build + trace
    t0 = time.perf_counter()
    model.fit(memory_ds.repeat().take(5), verbose=0)
    steps = max(30, int(seconds * 5 / (time.perf_counter() - t0)))  # steps of about `seconds`

    def fit_rate(ds) -> float:
        t0 = time.perf_counter()
        model.fit(ds.repeat().take(steps), verbose=0)
        return steps * cfg.batch_size / (time.perf_counter() - t0)

    pipe, mem = [], []
    for _ in range(rounds):
        pipe.append(fit_rate(pipeline_ds))
        mem.append(fit_rate(memory_ds))
    ratios = [p / m for p, m in zip(pipe, mem)]
    return {"fit_pipeline_images_per_s": round(float(np.median(pipe)), 1),
            "fit_in_memory_images_per_s": round(float(np.median(mem)), 1),
            "fit_ratio": round(float(np.median(ratios)), 3), "fit_ratios": [round(r, 3) for r in ratios],
            "fit_steps": steps}


def print_table(head: tuple, table: list[tuple]) -> None:
    """Columns padded to their widest cell."""
    widths = [max(len(str(h)), *(len(str(row[i])) for row in table)) for i, h in enumerate(head)]
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


# ------------------------------------------------------------------ pooling folders

def _recipe(params_file: Path) -> dict:
    """A run's params without its paths (they name its own work dir): what must match to pool."""
    p = yaml.safe_load(params_file.read_text())
    p.pop("paths", None)
    return p


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b), key=str)
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


PARTS = ("test", "external")  # evaluate's predictions.csv under eval/<tag>/ and eval/<tag>/external/


def _scored(run: dict, part: str, flag: str) -> tuple[set[str], set[str]]:
    """The crops a run scored in part and those it called wrong (paths relative to the crop
    folder, the same in every work dir), from evaluate's predictions.csv."""
    predictions = run["dir"] / "eval" / run["tag"] / ("external" if part == "external" else "") / "predictions.csv"
    if not predictions.is_file():
        raise SystemExit(f"{flag}: {predictions} is missing; the run did not score its {part} images")
    df = pd.read_csv(predictions)
    return set(df["path"]), set(df.loc[df["label"] != df["predicted"], "path"])


def _run_info(d: Path, tag: str | None, flag: str) -> dict:
    """holdout.json and the one evaluated model tag of a benchmarks/train.py work dir."""
    d = d.resolve()
    holdout = d / "holdout.json"
    if not holdout.is_file():
        raise SystemExit(f"{flag} {d}: no holdout.json; not a benchmarks/train.py work dir (or the run "
                         "used --test-data, which has no seed)")
    info = json.loads(holdout.read_text())
    tags = sorted(p.parent.name for p in (d / "eval").glob("*/metrics.json"))
    if tag is not None:
        tags = [t for t in tags if t == tag]
    if len(tags) != 1:
        raise SystemExit(f"{flag} {d}: {'no' if not tags else len(tags)} evaluated model(s) "
                         f"{'named ' + tag if tag else 'under eval/'} ({', '.join(tags) or 'none'}); "
                         "name one with --model NAME@SIZE")
    return {"dir": d, "seed": info["seed"], "data": info["data"], "frac": info["frac"], "tag": tags[0]}


def pool_runs(work_dirs: list[Path], tag: str | None = None) -> dict:
    """Pool the held-out figures of several benchmark runs of one recipe on different folders.

    Why: one folder of ~1,000 images puts a 0.99 accuracy anywhere in 0.982-0.995 (Wilson), so
    a target at the edge of what the labels allow is only judged on several folders. Each run
    must be a full benchmarks/train.py work dir with its own holdout seed (the same seed is the
    same folder: counting it twice is not evidence) and the same recipe (params equal apart from
    paths). Errors are summed over runs; images that more than one folder's model got wrong are
    listed (shared errors point at the labels, not the model). Internal test splits of different
    folders overlap (the split is re-drawn on each remainder), so the pooled interval is a little
    too narrow; the distinct image counts say how much.
    """
    runs = [_run_info(d, tag, "--pool") for d in work_dirs]
    if len(runs) < 2:
        raise SystemExit("--pool needs at least two work dirs")
    first = runs[0]
    for r in runs[1:]:
        if r["tag"] != first["tag"]:
            raise SystemExit(f"--pool: {r['dir']} evaluated {r['tag']}, {first['dir']} {first['tag']}")
        if (r["data"], r["frac"]) != (first["data"], first["frac"]):
            raise SystemExit(f"--pool: {r['dir']} held out {r['frac']} of {r['data']}, "
                             f"{first['dir']} {first['frac']} of {first['data']}")
    seen: dict[int, Path] = {}
    for r in runs:
        if r["seed"] in seen:
            raise SystemExit(f"--pool: {seen[r['seed']]} and {r['dir']} both held out seed {r['seed']}, "
                             "the same external folder; pool runs on different seeds")
        seen[r["seed"]] = r["dir"]
    recipe = _recipe(first["dir"] / f"params_{first['tag']}.yaml")
    for r in runs[1:]:
        diff = _differences(recipe, _recipe(r["dir"] / f"params_{r['tag']}.yaml"))
        if diff:
            raise SystemExit(f"--pool: {r['dir']} ran another recipe than {first['dir']}: " + "; ".join(diff[:8]))

    from hemaflow.scoring import accuracy_interval

    tag = first["tag"]
    target = TARGETS.get(recipe["train"]["image_size"])
    rows, pooled = [], {}
    wrong_in: dict[str, dict[str, list[int]]] = {"test": {}, "external": {}}
    for r in runs:
        summary = json.loads((r["dir"] / "models" / tag / "train_summary.json").read_text())
        row = {"dir": str(r["dir"]), "seed": r["seed"], "training_minutes": round(summary["seconds"] / 60, 2)}
        for part in PARTS:
            scored, wrong = _scored(r, part, "--pool")
            row[f"{part}_n"], row[f"{part}_errors"] = len(scored), len(wrong)
            row[f"{part}_accuracy"] = round(1 - len(wrong) / len(scored), 4)
            for name in wrong:
                wrong_in[part].setdefault(name, []).append(r["seed"])
            agg = pooled.setdefault(part, {"n": 0, "errors": 0, "images": set()})
            agg["n"] += len(scored)
            agg["errors"] += len(wrong)
            agg["images"] |= scored
        rows.append(row)
    accuracy = {part: 1 - agg["errors"] / agg["n"] for part, agg in pooled.items()}  # unrounded: the verdict's
    figures = {}
    for part, agg in pooled.items():
        low, high = accuracy_interval(agg["n"] - agg["errors"], agg["n"])
        figures[part] = {"n": agg["n"], "distinct_images": len(agg["images"]), "errors": agg["errors"],
                         "accuracy": round(accuracy[part], 4), "accuracy_ci95": [round(low, 4), round(high, 4)],
                         "wrong_in_several_folders": sorted(k for k, v in wrong_in[part].items() if len(v) > 1)}
    meets = None
    if target:
        meets = bool(all(acc >= target[0] for acc in accuracy.values())
                     and max(r["training_minutes"] for r in rows) <= target[1])
    return {"benchmark": "train_pool", "model": tag, "recipe_train": recipe.get("train"), "runs": rows,
            "pooled": figures, "target": list(target) if target else None, "meets_target": meets}


def print_pool(result: dict) -> None:
    head = ("seed", "train min", "test acc", "test errors", "ext acc", "ext errors", "work dir")
    table = [(r["seed"], f"{r['training_minutes']:.1f}", f"{r['test_accuracy']:.4f}",
              f"{r['test_errors']}/{r['test_n']}", f"{r['external_accuracy']:.4f}",
              f"{r['external_errors']}/{r['external_n']}", r["dir"]) for r in result["runs"]]
    t, e = result["pooled"]["test"], result["pooled"]["external"]
    table.append(("pooled", "", f"{t['accuracy']:.4f}", f"{t['errors']}/{t['n']}", f"{e['accuracy']:.4f}",
                  f"{e['errors']}/{e['n']}", f"{len(result['runs'])} folders"))
    print(f"{result['model']} pooled over {len(result['runs'])} held-out folders (one recipe, different seeds):")
    print_table(head, table)
    for part, label in (("test", "internal test"), ("external", "external")):
        p = result["pooled"][part]
        print(f"{label}: {p['accuracy']:.4f} (Wilson 95% {p['accuracy_ci95'][0]:.4f}-{p['accuracy_ci95'][1]:.4f}) "
              f"over {p['n']:,} predictions of {p['distinct_images']:,} distinct images; wrong in more than one "
              f"folder: {', '.join(p['wrong_in_several_folders']) or 'none'}")
    if result["target"]:
        print(f"target {result['target'][0]} on both within {result['target'][1]} min: "
              f"{'met' if result['meets_target'] else 'not met'} (pooled)")


# ------------------------------------------------------------------ comparing two recipes

def compare_runs(work_a: Path, work_b: Path, tag: str | None = None) -> dict:
    """Two recipes on the same held-out folder, image by image: the exact McNemar test of the
    promotion gate (hemaflow/gate.py) on the images both runs scored.

    Why: on ~1,000 external and ~1,800 internal images two recipes a few errors apart are
    usually noise; what decides is how many images only one of them gets right. Both runs
    must hold out the same folder (same --seed, data and fraction); their internal test splits
    are the same where the recipes split alike, else only the shared images are compared.
    """
    from hemaflow.gate import mcnemar

    a, b = _run_info(work_a, tag, "--compare"), _run_info(work_b, tag, "--compare")
    if (a["seed"], a["data"], a["frac"]) != (b["seed"], b["data"], b["frac"]):
        raise SystemExit(f"--compare: {a['dir']} held out seed {a['seed']} ({a['frac']} of {a['data']}), "
                         f"{b['dir']} seed {b['seed']} ({b['frac']} of {b['data']}): not the same folder; "
                         "compare runs of one --seed")
    recipe_a = _recipe(a["dir"] / f"params_{a['tag']}.yaml")
    recipe_b = _recipe(b["dir"] / f"params_{b['tag']}.yaml")
    parts = {}
    for part in PARTS:
        (scored_a, wrong_a), (scored_b, wrong_b) = _scored(a, part, "--compare"), _scored(b, part, "--compare")
        shared = sorted(scored_a & scored_b)
        right_a = np.array([name not in wrong_a for name in shared], bool)
        right_b = np.array([name not in wrong_b for name in shared], bool)
        test = mcnemar(right_a, right_b)  # b: right only in A, c: right only in B
        parts[part] = {"n": len(shared), "only_a": len(scored_a) - len(shared), "only_b": len(scored_b) - len(shared),
                       "errors_a": int((~right_a).sum()), "errors_b": int((~right_b).sum()),
                       "right_only_a": test["b"], "right_only_b": test["c"], "p_value": round(test["p_value"], 4),
                       "wrong_in_both": sorted(wrong_a & wrong_b & set(shared))}
    return {"benchmark": "train_compare", "a": str(a["dir"]), "b": str(b["dir"]), "seed": a["seed"],
            "models": [a["tag"], b["tag"]], "recipe_differences": _differences(recipe_a, recipe_b), "parts": parts}


def print_compare(result: dict) -> None:
    print(f"A: {result['a']}\nB: {result['b']}\nsame held-out folder (seed {result['seed']}); "
          f"recipe differences: {'; '.join(result['recipe_differences']) or 'none'}")
    head = ("split", "images", "errors A", "errors B", "right only in A", "right only in B", "McNemar p", "wrong in both")
    table = [(part, p["n"], p["errors_a"], p["errors_b"], p["right_only_a"], p["right_only_b"], f"{p['p_value']:.3f}",
              len(p["wrong_in_both"])) for part, p in result["parts"].items()]
    print_table(head, table)
    for part, p in result["parts"].items():
        if p["only_a"] or p["only_b"]:
            print(f"{part}: {p['only_a']} image(s) scored only by A, {p['only_b']} only by B (the splits differ); "
                  "compared on the shared ones")
    print("p >= 0.05: the two recipes cannot be told apart on this folder")


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    ap.add_argument("--params", type=Path, default=ROOT / "examples" / "pbc.params.yaml")
    ap.add_argument("--work-dir", type=Path, default=ROOT.parent / "hemaflow-train-bench",
                    help="datasets and models are written here (outside the repository)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME@SIZE",
                    help="architecture and image size (default: the params file's)")
    ap.add_argument("--minutes", type=float, default=None, help="training time budget (default: params)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train param (YAML value), e.g. --set learning_rate=0.002")
    ap.add_argument("--holdout-frac", type=float, default=0.1, help="share of PBC set aside as the external folder")
    ap.add_argument("--test-data", type=Path, default=None, help="external labelled folder (instead of a holdout)")
    ap.add_argument("--seed", type=int, default=42,
                    help="seed of the held-out external folder (another seed holds out other images)")
    ap.add_argument("--init-model", type=Path, default=None, metavar="MODEL_DIR",
                    help="start from this hemaflow model folder (warm start; another image size is progressive "
                         "resizing, e.g. a 28 px model fine-tuned at 64 px): its training minutes count towards "
                         "the target")
    ap.add_argument("--pipeline-only", action="store_true",
                    help="only the input-pipeline figures, on the work dir's augmented data (run once without first)")
    ap.add_argument("--pool", nargs="+", type=Path, default=None, metavar="WORK_DIR",
                    help="no training: pool the test and external figures of earlier runs (one recipe, "
                         "different --seed) into one accuracy per split with its interval")
    ap.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("WORK_DIR_A", "WORK_DIR_B"),
                    help="no training: two recipes' runs on the same held-out folder (same --seed), image by "
                         "image, with the McNemar test")
    args = ap.parse_args(argv)
    spec = (args.model or [None])[0]  # --pool / --compare: which evaluated model of the work dirs
    picked = None if spec is None else "_".join(spec.split("@"))
    if args.compare:
        result = compare_runs(*args.compare, picked)
        print_compare(result)
        print(json.dumps(result))
        return result
    if args.pool:
        result = pool_runs(args.pool, picked)
        print_pool(result)
        print(json.dumps(result))
        return result
    if args.pipeline_only:
        kept = args.work_dir.resolve() / "params.yaml"
        if not kept.is_file():
            ap.error(f"--pipeline-only reads {kept}, which a full run with this --work-dir writes; "
                     "run once without --pipeline-only first")
        base = yaml.safe_load(kept.read_text())
        cfg = TrainParams(**train_config(base["train"], (args.model or [""])[0], args))
        pipe = time_pipeline(args.work_dir.resolve() / "augmented", cfg, seed=args.seed)
        print(f"input pipeline ({cfg.architecture}, {cfg.image_size} px, batch {cfg.batch_size}):")
        for k, v in pipe.items():
            print(f"  {k:<32} {v}")
        print(json.dumps({"benchmark": "train", "pipeline": pipe}))
        return {"pipeline": pipe}
    if not (args.data / "images").is_dir():
        raise SystemExit(f"PBC data not found at {args.data} (expected images/<class>/)")
    work = args.work_dir.resolve()
    if work == ROOT or work.is_relative_to(ROOT):
        raise SystemExit(f"--work-dir {work} is inside the repository; data never goes into the repo")
    work.mkdir(parents=True, exist_ok=True)
    if args.test_data:
        raw, external, holdout = args.data.resolve(), args.test_data.resolve(), None
    else:
        raw, external, holdout = holdout_split(args.data, work, args.holdout_frac, args.seed)
    if args.init_model and not args.init_model.resolve().is_relative_to(work / "models"):
        raise SystemExit(f"--init-model {args.init_model} was not trained in --work-dir {work}: a model from another "
                         f"split may have seen the held-out folder; train it here first (e.g. --model NAME@28)")
    base = work_params(args.params, work, raw, external)

    stage_seconds = {}
    for stage in UPSTREAM:
        _, stage_seconds[stage] = run(stage, base, work)
        print(f"{stage}: {stage_seconds[stage]:.1f} s", flush=True)

    specs = args.model or [f"{base['train']['architecture']}@{base['train']['image_size']}"]
    rows = []
    for spec in specs:
        train = train_config(base["train"], spec, args)
        name = train["architecture"]
        tag = f"{name}_{train['image_size']}"
        init_minutes = 0.0
        if args.init_model:
            tag += "_from_" + args.init_model.resolve().name
            init_minutes = json.loads((args.init_model / "train_summary.json").read_text())["seconds"] / 60
        p = {**base, "train": train, "paths": {**base["paths"], "model_dir": str(work / "models" / tag),
                                               "eval_dir": str(work / "eval" / tag),
                                               "init_model": str(args.init_model.resolve()) if args.init_model else None}}
        result, train_s = run("train", p, work, f"params_{tag}.yaml")
        ev, eval_s = run("evaluate", p, work, f"params_{tag}.yaml")
        summary = json.loads((work / "models" / tag / "train_summary.json").read_text())
        ext = ev.external or {}
        target = TARGETS.get(train["image_size"])
        rows.append({"model": name, "image_size": train["image_size"], "tta": bool(ev.metrics.get("tta")),
                     "test_accuracy": round(ev.metrics["accuracy"], 4),
                     "test_accuracy_ci95": [round(ev.metrics["accuracy_ci95_low"], 4),
                                            round(ev.metrics["accuracy_ci95_high"], 4)],
                     "test_balanced_accuracy": round(ev.metrics["balanced_accuracy"], 4),
                     "external_accuracy": round(ext["accuracy"], 4) if ext else None,
                     "external_accuracy_ci95": [round(ext["accuracy_ci95_low"], 4),
                                                round(ext["accuracy_ci95_high"], 4)] if ext else None,
                     "external_balanced_accuracy": round(ext["balanced_accuracy"], 4) if ext else None,
                     "external_n": ext.get("n"), "external_dropped_seen": ext.get("dropped_seen_in_training"),
                     "params": summary["model_parameters"], "epochs_run": result.epochs_run,
                     "best_epoch": result.best_epoch, "training_minutes": round(result.seconds / 60, 2),
                     "init_model": str(args.init_model) if args.init_model else None,
                     "init_model_minutes": round(init_minutes, 2),
                     "total_training_minutes": round(result.seconds / 60 + init_minutes, 2),
                     "train_images_per_s": round(result.images_per_second, 1),
                     "macro_auc": round(ev.metrics["macro_auc"], 4), "ece": round(ev.metrics["ece"], 4),
                     "recall": {c: round(v["recall"], 4) for c, v in ev.per_class.items()},
                     "target": list(target) if target else None,
                     "meets_target": (bool(ev.metrics["accuracy"] >= target[0]
                                           and result.seconds + init_minutes * 60 <= target[1] * 60
                                           and (not ext or ext["accuracy"] >= target[0])) if target else None)})
        print(f"{tag}: trained {result.seconds / 60:.1f} min"
              + (f" (+{init_minutes:.1f} min for {args.init_model})" if args.init_model else "")
              + f", test {ev.metrics['accuracy']:.4f}"
              + (f", external {ext['accuracy']:.4f}" if ext else ""), flush=True)

    cfg = TrainParams(**train_config(base["train"], specs[0], args))  # the first model's own settings
    pipe = time_pipeline(work / "augmented", cfg, seed=args.seed)

    head = ("model", "size", "test acc", "test bal", "ext acc", "ext bal", "params", "epochs", "train min", "img/s")
    table = [(r["model"], r["image_size"], f"{r['test_accuracy']:.4f}", f"{r['test_balanced_accuracy']:.4f}",
              f"{r['external_accuracy']:.4f}" if r["external_accuracy"] is not None else "-",
              f"{r['external_balanced_accuracy']:.4f}" if r["external_balanced_accuracy"] is not None else "-",
              f"{r['params']:,}", f"{r['epochs_run']} (best {r['best_epoch']})",
              f"{r['training_minutes']:.1f}" + (f" (+{r['init_model_minutes']:.1f})" if r["init_model"] else ""),
              f"{r['train_images_per_s']:.0f}") for r in rows]
    print()
    if holdout:
        print(f"external folder: {sum(c['external'] for c in holdout.values())} PBC images held out "
              f"({args.holdout_frac:.0%} per class, seed {args.seed}); trained on the other "
              f"{sum(c['kept'] for c in holdout.values())}")
    print_table(head, table)
    print("accuracy 95% intervals (Wilson; one run above or below a target inside them is not a verdict): "
          + "; ".join(f"{r['model']}@{r['image_size']} test {r['test_accuracy_ci95'][0]:.4f}-{r['test_accuracy_ci95'][1]:.4f}"
                      + (f", external {r['external_accuracy_ci95'][0]:.4f}-{r['external_accuracy_ci95'][1]:.4f}"
                         if r["external_accuracy_ci95"] else "") for r in rows))
    print(f"\ninput pipeline (train split, batch {cfg.batch_size}, {cfg.image_size} px): tf.data "
          f"{pipe['tfdata_images_per_s']:,} images/s (with online augmentation {pipe['tfdata_augmented_images_per_s']:,}); "
          f"in-memory tensors {pipe['in_memory_images_per_s']:,} images/s; ratio {pipe['ratio']} "
          f"(augmented {pipe['augmented_ratio']}); training fed by the pipeline {pipe['fit_pipeline_images_per_s']:,} "
          f"images/s vs by in-memory tensors {pipe['fit_in_memory_images_per_s']:,}: ratio {pipe['fit_ratio']} "
          f"(target >= 0.9)")
    print(f"stages before training: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items()))
    figures = {"benchmark": "train", "models": rows, "pipeline": pipe, "stage_seconds": stage_seconds,
               "holdout": holdout, "targets": {str(k): list(v) for k, v in TARGETS.items()}}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
