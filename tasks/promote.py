"""promote: publish the candidate model to the model store if it clears the quality gate.

Re-running is safe: when the store's latest version already holds the same model.keras
(by sha256) nothing new is published and that version is reported instead.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hemaflow.config import PromoteParams
from hemaflow.errors import StageInputError, require_file
from hemaflow.progress import Progress
from hemaflow.model_folder import open_model_folder
from hemaflow.store import open_store

REQUIRED_METRICS = ("accuracy", "balanced_accuracy", "per_class")


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool          # the candidate is (now or already) the store's latest version
    published: bool         # this run wrote a new version
    model_name: str
    store_url: str
    sha256: str             # of model.keras
    version: int | None
    uri: str | None
    reason: str
    min_balanced_accuracy: float
    metrics: dict[str, Any] = field(default_factory=dict)  # top-level scalars of metrics.json

    def summary(self) -> dict[str, Any]:
        """The record written to promotion.json."""
        return asdict(self)


def read_metrics(metrics_path: Path) -> dict[str, Any]:
    """metrics.json from evaluate; must carry the figures the gate and card need."""
    require_file(metrics_path, "evaluation metrics")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(metrics_path, f"not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict):
        raise StageInputError(metrics_path, f"expected a JSON object, got {type(metrics).__name__}")
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise StageInputError(metrics_path, f"missing key(s) {', '.join(missing)}; "
                                            f"found {', '.join(sorted(metrics)) or 'none'}")
    for key in ("accuracy", "balanced_accuracy"):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or math.isnan(value) or not 0 <= value <= 1:
            raise StageInputError(metrics_path, f"{key} must be a number in [0, 1], got {value!r}")
    return metrics


def summarize_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Top-level scalars (figures, split, n); per-class detail stays in metrics.json."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def read_git_commit(path: Path) -> str | None:
    """HEAD commit of the repository holding path, or None outside git / before a commit."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_promotion(promotion_path: Path, result: PromotionResult) -> None:
    """Atomic write, so a crash never leaves a half-written record for DVC to cache."""
    promotion_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=promotion_path.parent, prefix=f".{promotion_path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(result.summary(), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, promotion_path)


def promote_model(model_dir: Path, eval_dir: Path, promotion_path: Path, cfg: PromoteParams,
                  *, params: dict[str, Any] | None = None, source_commit: str | None = None,
                  progress: Progress | None = None) -> PromotionResult:
    """Gate on balanced accuracy, then publish model.keras + labels + metrics once.

    params: what to record in the card (the flow passes the full params); defaults to
    the promote block. source_commit: defaults to the git HEAD holding model_dir.
    """
    model_dir, eval_dir, promotion_path = Path(model_dir), Path(eval_dir), Path(promotion_path)
    folder = open_model_folder(model_dir)
    model_path, labels_path = folder.model_path, folder.labels_path
    metrics_path = eval_dir / "metrics.json"
    metrics = read_metrics(metrics_path)
    sha = folder.sha256
    summary = summarize_metrics(metrics)
    base = dict(model_name=cfg.model_name, store_url=cfg.store_url, sha256=sha,
                min_balanced_accuracy=cfg.min_balanced_accuracy, metrics=summary)
    bal = float(metrics["balanced_accuracy"])

    if bal < cfg.min_balanced_accuracy:
        result = PromotionResult(
            promoted=False, published=False, version=None, uri=None,
            reason=f"balanced_accuracy {bal:.4f} is below the threshold "
                   f"min_balanced_accuracy {cfg.min_balanced_accuracy:.4f}; not promoted",
            **base)
        write_promotion(promotion_path, result)
        return result

    store = open_store(cfg.store_url)
    latest = store.latest(cfg.model_name)
    if latest is not None and latest.sha256 == sha:
        result = PromotionResult(
            promoted=True, published=False, version=latest.version, uri=latest.uri,
            reason=f"same model.keras (sha256 {sha[:12]}) is already the latest version "
                   f"{latest.tag}; not re-published",
            **base)
        write_promotion(promotion_path, result)
        return result

    card = {
        "model_name": cfg.model_name,
        "metrics": summary,
        "source_commit": source_commit or read_git_commit(model_dir),
        "params": params if params is not None else {"promote": cfg.model_dump(mode="json")},
    }
    files = {"model.keras": model_path, "labels.json": labels_path, "metrics.json": metrics_path}
    mv = store.publish(cfg.model_name, files, card, progress=progress)
    previous = f"previous latest {latest.tag}" if latest else "first version"
    result = PromotionResult(
        promoted=True, published=True, version=mv.version, uri=mv.uri,
        reason=f"balanced_accuracy {bal:.4f} >= {cfg.min_balanced_accuracy:.4f}; "
               f"published as {mv.tag} ({previous})",
        **base)
    write_promotion(promotion_path, result)
    return result
