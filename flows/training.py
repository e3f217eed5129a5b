"""The training pipeline flow: every stage in order, each a Prefect task.

ingest -> validate_labels -> segment -> split -> augment -> check_quality -> train -> evaluate -> promote

A stage that DVC reports up to date is skipped (see flows/dvc_state.py); a stage that runs
is recorded in dvc.lock. Retries are for transient I/O (file systems, the model store),
never for bad input or a failed quality gate, which would fail the same way again.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc_state
from flows.artifacts import progress_artifact, publish_summary
from hemaflow.config import load_params
from hemaflow.stages import STAGES, run_stage, stage_paths

RETRIES = {"ingest": 2, "segment": 1, "augment": 1, "promote": 3}


def _transient(task, task_run, state) -> bool:
    """Retry only errors that may pass on their own (I/O, network), not bad data."""
    try:
        state.result()
    except (OSError, TimeoutError, ConnectionError) as exc:
        from hemaflow.errors import StageInputError
        return not isinstance(exc, StageInputError)
    except Exception:
        return False
    return False


def _stage_task(name: str):
    @task(name=name, retries=RETRIES.get(name, 0), retry_delay_seconds=2, retry_condition_fn=_transient,
          cache_policy=NO_CACHE)  # caching is DVC's: see flows/dvc_state.py
    def run(params_path: str, force: bool, use_dvc: bool) -> dict:
        logger = get_run_logger()
        params_file = Path(params_path)
        root = params_file.parent
        if use_dvc and not force and dvc_state.is_up_to_date(root, name):
            logger.info("%s: up to date in dvc.lock, skipped", name)
            publish_summary(name, {"status": "up to date (dvc.lock): skipped"})
            return {"stage": name, "ran": False}
        result = run_stage(name, load_params(params_file), root, progress=progress_artifact(name))
        if use_dvc:
            dvc_state.record_run(root, name)
        summary = result.summary()
        publish_summary(name, summary, getattr(result, "markdown", None))
        logger.info("%s: %s", name, summary)
        return {"stage": name, "ran": True}

    return run


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


@flow(name="hemaflow-training", log_prints=False)
def training_pipeline(params_path: str = "params.yaml", force: bool = False) -> dict:
    """Run every stage in order; returns which ran, the evaluation and the promotion record."""
    params_file = Path(params_path).resolve()
    root = params_file.parent
    use_dvc = dvc_state.dvc_tracks(root) and params_file.name == "params.yaml"
    outcomes = [STAGE_TASKS[name](str(params_file), force, use_dvc) for name in STAGES]
    paths = stage_paths(load_params(params_file), root)
    evaluation = json.loads((paths.eval_dir / "metrics.json").read_text())
    promotion = json.loads(paths.promotion_path.read_text())
    return {
        "ran": [o["stage"] for o in outcomes if o["ran"]],
        "skipped": [o["stage"] for o in outcomes if not o["ran"]],
        "evaluation": evaluation,
        "promotion": promotion,
        "reports": {"metrics": str(paths.eval_dir / "metrics.json"),
                    "confusion": str(paths.eval_dir / "confusion_matrix.png"),
                    "review lists": f"{paths.labels_dir / 'review.csv'}, {paths.crops_dir / 'review.csv'}",
                    "quality": str(paths.quality_dir / "report.md")},
    }
