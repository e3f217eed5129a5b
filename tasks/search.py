"""Hyperparameter search as the studies did it: a grid over train params (units, kernels,
kernel size, dropout, optimizer, learning rate, batch size...), each point trained on the
train split and scored on the validation split -- never on test, which stays the honest
figure for the one model that is finally chosen.

Plain functions: `grid_points` expands the grid, `run_trial` trains and scores one point,
`compare_trials` writes the comparison (results.csv, results.md, best_params.yaml).
flows/search.py maps run_trial over the grid as Prefect tasks; `write_back` puts the best
point into the params file's train block without touching its comments.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from hemaflow.config import TrainParams


@dataclass(frozen=True)
class TrialResult:
    trial: str
    point: dict[str, Any]
    metrics: dict[str, float]   # on the validation split
    epochs_run: int
    seconds: float


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, checked against TrainParams (a typo fails at once)."""
    if not grid:
        raise ValueError("search.grid is empty: give at least one train param with a list of values")
    unknown = sorted(set(grid) - set(TrainParams.model_fields))
    if unknown:
        raise ValueError(f"search.grid names unknown train param(s) {unknown}")
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return points


def trial_name(point: dict[str, Any]) -> str:
    return "_".join(f"{k}-{v}" for k, v in point.items()).replace("/", "-")


def run_trial(dataset_dir: Path, out_dir: Path, base: TrainParams, point: dict[str, Any], classes: tuple[str, ...],
              seed: int) -> TrialResult:
    """Train base+point on the train split; score it on the validation split."""
    from hemaflow.scoring import log_loss, score_predictions
    from hemaflow.tasks.evaluate import predict_split
    from hemaflow.tasks.train import train_model

    cfg = base.model_copy(update=point)
    TrainParams.model_validate(cfg.model_dump())  # re-validate the combination
    name = trial_name(point)
    model_dir = Path(out_dir) / "trials" / name
    result = train_model(dataset_dir, model_dir, cfg, classes, seed)
    pred = predict_split(model_dir, dataset_dir, "val")
    overall, _, _ = score_predictions(pred.y_true, pred.y_pred, pred.classes)
    overall["log_loss"] = log_loss(pred.y_true, pred.probs)
    trial = TrialResult(trial=name, point=point, metrics=overall, epochs_run=result.epochs_run,
                        seconds=round(result.seconds, 2))
    (model_dir / "trial.json").write_text(json.dumps(trial.__dict__, indent=2, default=str) + "\n")
    return trial


def compare_trials(trials: list[TrialResult], out_dir: Path, metric: str = "balanced_accuracy") -> dict[str, Any]:
    """results.csv, results.md (best first) and best_params.yaml; returns the best point."""
    if not trials:
        raise ValueError("no trial finished")
    higher_is_better = metric != "log_loss"
    rows = [{"trial": t.trial, **t.point, **{f"val_{k}": round(v, 4) for k, v in t.metrics.items()},
             "epochs": t.epochs_run, "seconds": t.seconds} for t in trials]
    df = pd.DataFrame(rows).sort_values(f"val_{metric}", ascending=not higher_is_better, kind="stable")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "results.csv", index=False)
    best = trials[[t.trial for t in trials].index(df.iloc[0]["trial"])]
    cols = [c for c in df.columns if c != "trial"]
    md = [f"**Grid search**: {len(trials)} trials scored on the validation split by `{metric}`; "
          f"best: `{best.trial}` ({metric} {best.metrics[metric]:.4f})", "",
          "| rank | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for i, (_, r) in enumerate(df.iterrows(), start=1):
        md.append(f"| {i} | " + " | ".join(str(r[c]) for c in cols) + " |")
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    (out_dir / "best_params.yaml").write_text(yaml.safe_dump({"train": best.point}, sort_keys=False))
    return {"best": best.point, "trial": best.trial, "metric": metric, "value": best.metrics[metric],
            "markdown": "\n".join(md) + "\n", "results": str(out_dir / "results.csv")}


def write_back(params_path: Path, point: dict[str, Any]) -> None:
    """Set the best point's values in the params file's `train:` block, keeping every comment
    and every other line as it is (a key the block lacks is appended to it; a file without the
    block, e.g. one that `extends:` another, gets one at its end)."""
    text = Path(params_path).read_text()
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if re.match(r"^train:\s*(#.*)?$", l)), None)
    if start is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += ["\n", "train:\n"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\S", lines[i])), len(lines))
    missing = dict(point)
    for i in range(start + 1, end):
        m = re.match(r"^(  )([A-Za-z_]+):(\s*)([^#\n]*?)(\s*#.*)?$", lines[i].rstrip("\n"))
        if m and m.group(2) in missing:
            value = yaml.safe_dump(missing.pop(m.group(2)), default_flow_style=True).strip().removesuffix("...").strip()
            comment = m.group(5) or ""
            lines[i] = f"  {m.group(2)}: {value}{comment}\n"
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    extra = [f"  {k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             f"                 # written back by hemaflow search\n" for k, v in missing.items()]
    lines[end:end] = extra
    Path(params_path).write_text("".join(lines))
    yaml.safe_load(Path(params_path).read_text())  # still valid YAML
