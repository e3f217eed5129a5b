"""The training pipeline flow: every stage in order, each a Prefect task.

ingest -> validate_labels -> segment -> split -> augment -> check_quality -> train -> evaluate -> promote

A stage that DVC reports up to date is skipped (see flows/dvc_state.py); a stage that runs
is recorded in dvc.lock. Retries are for transient I/O (file systems, the model store),
never for bad input or a failed quality gate, which would fail the same way again.

The batched stages (segment, augment) are subflows instead of tasks: the same stage code,
its batches run as tasks on a DaskTaskRunner built from params.yaml `parallel`
(flows/parallel.py), with a progress artifact updated as batches complete.

With params `train_job.mode: work_pool`, train and evaluate run as one job on a GPU work
pool instead (flows/gpu_job.py): the `train-job` task submits the job deployment and waits.
Every stage with pictures (contact sheets, training curves, evaluation plots) publishes them
as a `<stage>-pictures` markdown artifact, and promote its decision (flows/artifacts.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hemaflow.flows import dvc_state
from hemaflow.flows.artifacts import publish_pictures, publish_promotion, publish_summary, stage_progress
from hemaflow.flows.gpu_job import JOB_STAGES, submit_training
from hemaflow.flows.parallel import (FlowCluster, dask_task_runner, flow_cluster, is_transient, prefect_batch_runner,
                                     workers_share_prefect_api)
from hemaflow.config import load_params, require_no_extends
from hemaflow.tasks.stages import BATCHED_STAGES, STAGES, run_stage, stage_paths

RETRIES = {"ingest": 2, "promote": 3}  # segment and augment retry per batch (flows/parallel.py)


def _publish_outputs(name: str, params_file: Path) -> None:
    """The stage's pictures (and promote's decision) from its outputs on disk, run or skipped."""
    paths = stage_paths(load_params(params_file), params_file.parent)
    publish_pictures(name, paths)
    if name == "promote":
        publish_promotion(paths.promotion_path)


def _run_or_skip(name: str, params_path: str, force: bool, use_dvc: bool, batched: bool = False) -> dict:
    """Skip the stage if dvc.lock says it is up to date, else run it and record it in dvc.lock."""
    logger = get_run_logger()
    params_file = Path(params_path)
    root = params_file.parent
    if use_dvc and not force and dvc_state.is_up_to_date(root, name):
        logger.info("%s: up to date in dvc.lock, skipped", name)
        publish_summary(name, {"status": "up to date (dvc.lock): skipped"})
        if not batched:  # a batched stage is a subflow: the parent publishes (see _run)
            _publish_outputs(name, params_file)
        return {"stage": name, "ran": False}
    result = run_stage(name, load_params(params_file), root, progress=stage_progress(name),
                       batch_runner=prefect_batch_runner(name) if batched else None)
    if use_dvc:
        dvc_state.record_run(root, name)
    summary = result.summary()
    publish_summary(name, summary, getattr(result, "markdown", None))
    if not batched:
        _publish_outputs(name, params_file)
    logger.info("%s: %s", name, summary)
    return {"stage": name, "ran": True}


@task(name="train-job", cache_policy=NO_CACHE)  # no retries: a failed job is reported, not resubmitted
def train_on_work_pool(params_path: str, force: bool, use_dvc: bool) -> list[dict]:
    """train + evaluate as one run of the job deployment on its work pool (params train_job)."""
    logger = get_run_logger()
    params_file = Path(params_path)
    root = params_file.parent
    if use_dvc and not force and all(dvc_state.is_up_to_date(root, s) for s in JOB_STAGES):
        for name in JOB_STAGES:
            logger.info("%s: up to date in dvc.lock, skipped", name)
            publish_summary(name, {"status": "up to date (dvc.lock): skipped"})
            _publish_outputs(name, params_file)
        return [{"stage": s, "ran": False} for s in JOB_STAGES]
    params = load_params(params_file)
    result = submit_training(params, root, JOB_STAGES)
    where = f"work pool {result['work_pool']}, host {result.get('host')}, flow run {result['job_flow_run_name']}"
    for name in JOB_STAGES:
        if use_dvc:
            dvc_state.record_run(root, name)
        publish_summary(name, {**result["summaries"][name], "ran on": where}, (result.get("reports") or {}).get(name))
        _publish_outputs(name, params_file)
        logger.info("%s (%s): %s", name, where, result["summaries"][name])
    return [{"stage": s, "ran": True, "job": {k: result.get(k) for k in ("job_flow_run_id", "work_pool", "host")}}
            for s in JOB_STAGES]


def _stage_task(name: str):
    @task(name=name, retries=RETRIES.get(name, 0), retry_delay_seconds=2, retry_condition_fn=is_transient,
          cache_policy=NO_CACHE)  # caching is DVC's: see flows/dvc_state.py
    def run(params_path: str, force: bool, use_dvc: bool) -> dict:
        return _run_or_skip(name, params_path, force, use_dvc)

    return run


def _stage_flow(name: str):
    @flow(name=name, log_prints=False)  # task runner set per run from params: see run_batched_stage
    def run(params_path: str, force: bool, use_dvc: bool) -> dict:
        return _run_or_skip(name, params_path, force, use_dvc, batched=True)

    return run


STAGE_TASKS = {name: _stage_task(name) for name in STAGES if name not in BATCHED_STAGES}
STAGE_FLOWS = {name: _stage_flow(name) for name in BATCHED_STAGES}


def run_batched_stage(name: str, params_path: str, force: bool = False, use_dvc: bool = False,
                      cluster: FlowCluster | None = None) -> dict:
    """Run a batched stage as a subflow whose batches are tasks on Dask (params `parallel`):
    on the flow run's cluster when given, else on the scheduler in params or a cluster of its own."""
    runner = dask_task_runner(load_params(params_path).parallel, address=cluster.address() if cluster else None)
    with workers_share_prefect_api():
        return STAGE_FLOWS[name].with_options(task_runner=runner)(str(params_path), force, use_dvc)


def _run(name: str, params_path: str, force: bool, use_dvc: bool, cluster: FlowCluster | None = None) -> dict:
    if name in STAGE_FLOWS:
        outcome = run_batched_stage(name, params_path, force, use_dvc, cluster)
        _publish_outputs(name, Path(params_path))  # on the training run's page, not only the subflow's
        return outcome
    return STAGE_TASKS[name](params_path, force, use_dvc)


def _batched_work_ahead(root: Path, force: bool, use_dvc: bool) -> bool:
    """Will a batched stage run? (Not when dvc.lock says both are up to date: a no-op rerun
    must not start a cluster.)"""
    return force or not use_dvc or not all(dvc_state.is_up_to_date(root, name) for name in BATCHED_STAGES)


@flow(name="hemaflow-training", log_prints=False)
def training_pipeline(params_path: str = "params.yaml", force: bool = False) -> dict:
    """Run every stage in order; returns which ran, the evaluation and the promotion record."""
    params_file = Path(params_path).resolve()
    root = params_file.parent
    use_dvc = dvc_state.dvc_tracks(root) and params_file.name == "params.yaml"
    if use_dvc:
        require_no_extends(params_file)
    params = load_params(params_file)
    outcomes = []
    on_pool = params.train_job.mode == "work_pool"
    with flow_cluster(params.parallel, needed=_batched_work_ahead(root, force, use_dvc)) as cluster:
        for name in STAGES:
            if on_pool and name in JOB_STAGES:
                if name == JOB_STAGES[0]:
                    outcomes += train_on_work_pool(str(params_file), force, use_dvc)
                continue
            outcomes.append(_run(name, str(params_file), force, use_dvc, cluster))
            if cluster is not None and name == BATCHED_STAGES[-1]:
                cluster.close()  # training needs the cores and the memory
                cluster = None
    paths = stage_paths(params, root)
    evaluation = json.loads((paths.eval_dir / "metrics.json").read_text())
    promotion = json.loads(paths.promotion_path.read_text())
    return {
        "ran": [o["stage"] for o in outcomes if o["ran"]],
        "skipped": [o["stage"] for o in outcomes if not o["ran"]],
        "evaluation": evaluation,
        "promotion": promotion,
        "train_job": next((o["job"] for o in outcomes if "job" in o), None),
        "reports": {"metrics": str(paths.eval_dir / "metrics.json"),
                    "confusion": str(paths.eval_dir / "confusion_matrix.png"),
                    "review lists": f"{paths.labels_dir / 'review.csv'}, {paths.crops_dir / 'review.csv'}, "
                                    f"{paths.eval_dir / 'label_review.csv'}",
                    "label review": str(paths.eval_dir / "label_review.png"),
                    "quality": str(paths.quality_dir / "report.md")},
    }
