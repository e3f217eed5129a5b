"""Warm start on a small lab dataset: from scratch vs starting from a model trained on PBC.

Why: labs rarely have more than a few hundred labelled cells per class. This measures what a
promoted hemaflow model is worth as the starting point for a small new dataset with its own
class list (here 4 white-cell types, --per-class images each).

- Source model: the one benchmarks/train.py trained on PBC minus its external holdout
  (run that first; --source-model to point elsewhere). The small dataset and its test images
  come from that holdout, so the source model never saw any of them.
- Small dataset: --per-class images per class (seeded), through the pipeline's own stages
  (ingest -> validate_labels -> segment -> split -> augment -> check_quality); its split keeps
  ~70 % for training. Test: every other holdout image of those classes, scored by evaluate as
  the external folder (--test-data), with TTA as in the params.
- Two trainings on the same data: from scratch (the params' recipe) and warm (paths.init_model
  = the source; a new 4-class head, rows of the shared classes copied; lower learning rate).

    .venv/bin/python benchmarks/warm_start.py [--data ../shared/data/pbc] [--per-class 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train import _link_or_copy, run, work_params  # noqa: E402

CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")  # the 4-type white-cell sets labs have


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    ap.add_argument("--bench-dir", type=Path, default=ROOT.parent / "hemaflow-train-bench",
                    help="benchmarks/train.py's work dir (its holdout and model)")
    ap.add_argument("--source-model", type=Path, default=None)
    ap.add_argument("--params", type=Path, default=ROOT / "examples" / "pbc.params.yaml")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    bench = args.bench_dir.resolve()
    holdout = bench / "external" / "images"
    source = (args.source_model or bench / "models" / "resnet_small_28").resolve()
    if not holdout.is_dir() or not (source / "model.keras").is_file():
        raise SystemExit(f"run benchmarks/train.py first (needs {holdout} and {source}/model.keras)")
    work = bench / "warm_start"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    counts = {}
    for cls in CLASSES:
        files = sorted((holdout / cls).iterdir())
        pick = set(rng.choice(len(files), size=min(args.per_class, len(files)), replace=False).tolist())
        for i, f in enumerate(files):
            dst = work / ("small" if i in pick else "test") / "images" / cls / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(f, dst)
        counts[cls] = {"small": len(pick), "test": len(files) - len(pick)}

    base = work_params(args.params, work, work / "small", work / "test")
    base["base"] = {**base.get("base", {}), "classes": list(CLASSES)}
    syn = base.get("validate_labels", {}).get("synonyms", {})
    base.setdefault("validate_labels", {})["synonyms"] = {c: v for c, v in syn.items() if c in CLASSES}
    base["split"] = {"test_size": 0.1, "val_size": 0.2, "use_source_split": False}
    base["check_quality"] = {"min_per_class": 1, "max_imbalance_ratio": 3.0, "max_kl_divergence": 0.5,
                             "clean_min_per_class": 10}
    for stage in ("ingest", "validate_labels", "segment", "split", "augment", "check_quality"):
        run(stage, base, work)
    image_size = json.loads((source / "train_summary.json").read_text())["params"]["image_size"]
    recipe = {**base["train"], "image_size": image_size, "epochs": args.epochs, "lr_schedule": "cosine",
              "max_minutes": None, "batch_size": 32, "patience": args.epochs}
    runs = {"from scratch": {**recipe},
            "warm start": {**recipe, "learning_rate": recipe["learning_rate"] / 5}}
    rows = []
    for name, train in runs.items():
        tag = name.replace(" ", "_")
        paths = {**base["paths"], "model_dir": str(work / "models" / tag), "eval_dir": str(work / "eval" / tag)}
        if name == "warm start":
            paths["init_model"] = str(source)
        p = {**base, "train": train, "paths": paths}
        result, _ = run("train", p, work, f"params_{tag}.yaml")
        ev, _ = run("evaluate", p, work, f"params_{tag}.yaml")
        ext = ev.external
        rows.append({"run": name, "train_images": result.n_images["train"], "epochs": result.epochs_run,
                     "train_seconds": round(result.seconds, 1), "accuracy": round(ext["accuracy"], 4),
                     "balanced_accuracy": round(ext["balanced_accuracy"], 4), "test_images": ext["n"],
                     "recall": {c: round(v["recall"], 3) for c, v in ext["per_class"].items()}})
    head = ("run", "train imgs", "epochs", "train s", "test acc", "test bal", "test imgs", "recall per class")
    table = [(r["run"], r["train_images"], r["epochs"], r["train_seconds"], f"{r['accuracy']:.4f}",
              f"{r['balanced_accuracy']:.4f}", r["test_images"],
              ", ".join(f"{c} {v:.2f}" for c, v in r["recall"].items())) for r in rows]
    widths = [max(len(str(h)), *(len(str(t[i])) for t in table)) for i, h in enumerate(head)]
    print(f"\nsmall dataset: {args.per_class} PBC holdout images per class of {', '.join(CLASSES)} "
          f"(never seen by the source model {source})")
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    for t in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(t, widths)))
    gain = rows[1]["accuracy"] - rows[0]["accuracy"]
    print(f"warm start gain: {gain:+.4f} accuracy, "
          f"{rows[1]['balanced_accuracy'] - rows[0]['balanced_accuracy']:+.4f} balanced accuracy")
    figures = {"benchmark": "warm_start", "per_class": args.per_class, "classes": list(CLASSES), "runs": rows,
               "gain_accuracy": round(gain, 4), "counts": counts}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
