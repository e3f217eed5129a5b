"""Scheduled retraining: the training flow served on a cron and on a data-changed event.

`hemaflow serve` registers two deployments with a Prefect server and runs them:
- `hemaflow-training/retrain`: cron from params `schedule`, plus a trigger on the
  `hemaflow.data.changed` event. A run with nothing changed costs seconds: every stage is
  up to date in dvc.lock and skipped.
- `hemaflow-data-watch/watch-data`: every `schedule.watch_interval_s`, compares the raw
  data version in data.dvc with the one the last ingest ran on (dvc.lock) and emits the
  event when they differ, so new data (`dvc add data/raw` or a `git pull` that moved
  data.dvc) starts a retraining without waiting for the cron.

The retrain deployment runs `retrain`: when the raw data's DVC version (data.dvc) and the
model-shaping params equal those recorded in the production model's card, it skips
training altogether (a Prefect markdown artifact says why); otherwise it runs the training
pipeline, whose promote stage gates the new model against production.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron, Interval

from hemaflow.flows.training import training_pipeline
from hemaflow.config import Params, load_params
from hemaflow.provenance import data_version, params_fingerprint

DATA_CHANGED = "hemaflow.data.changed"
RETRAIN_DEPLOYMENT = "retrain"


def dataset_resource(root: Path) -> str:
    return f"hemaflow.dataset.{root.resolve().name}"


def _out_md5(dvc_file: Path, path: str) -> str | None:
    """md5 that data.dvc records for `path` (the versioned raw data)."""
    if not dvc_file.is_file():
        return None
    for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None


def _trained_md5(lock_file: Path, path: str) -> str | None:
    """md5 of `path` as the last ingest run saw it (dvc.lock), None if it never ran."""
    if not lock_file.is_file():
        return None
    ingest = ((yaml.safe_load(lock_file.read_text()) or {}).get("stages") or {}).get("ingest") or {}
    for dep in ingest.get("deps", []):
        if dep.get("path") == path:
            return dep.get("md5")
    return None


def data_change(root: Path, params: Params) -> dict:
    """Compare the versioned raw data with what the pipeline last trained on."""
    raw = params.paths.raw_dir.as_posix()
    versioned = _out_md5(root / "data.dvc", raw)
    trained = _trained_md5(root / "dvc.lock", raw)
    return {"raw_dir": raw, "versioned_md5": versioned, "trained_md5": trained,
            "changed": versioned is not None and versioned != trained}


def production_matches(root: Path, params: Params) -> dict:
    """Are the raw data's DVC version and the model-shaping params those of the production model?"""
    from hemaflow.store import StoreError, open_store

    url = params.promote.store_url
    if "://" not in url and not Path(url).is_absolute():
        url = str(root / url)
    data = data_version(root / params.paths.raw_dir)
    status = {"production": None, "data_md5": data["md5"], "production_data_md5": None,
              "params_fingerprint": params_fingerprint(params.model_dump(mode="json")),
              "production_params_fingerprint": None, "current": False}
    try:
        prod = open_store(url).production(params.promote.model_name)
    except StoreError as exc:  # an unreachable store must not stop a retraining
        status["error"] = str(exc)
        return status
    if prod is None:
        return status
    card = prod.card
    status.update(production=prod.tag, production_data_md5=(card.get("data_version") or {}).get("md5"),
                  production_params_fingerprint=card.get("params_fingerprint"))
    status["current"] = (status["data_md5"] is not None and status["data_md5"] == status["production_data_md5"]
                         and status["params_fingerprint"] == status["production_params_fingerprint"])
    return status


@flow(name="hemaflow-training", log_prints=False)
def retrain(params_path: str = "params.yaml", force: bool = False) -> dict:
    """The scheduled retraining: skip when data and params are production's, else train (and gate)."""
    params_file = Path(params_path).resolve()
    status = production_matches(params_file.parent, load_params(params_file))
    if status["current"] and not force:
        from prefect.artifacts import create_markdown_artifact

        text = (f"raw data {status['data_md5']} and params {status['params_fingerprint'][:12]} are those of "
                f"production {status['production']}: training skipped")
        get_run_logger().info(text)
        create_markdown_artifact(markdown=f"## Retraining skipped\n\n{text}\n", key="retrain-skipped",
                                 description="retraining: nothing new to train on")
        return {"ran": [], "skipped": ["training"], "skipped_training": True, "reason": text, "status": status}
    return training_pipeline.fn(params_path=str(params_file), force=force)


def retraining_under_way() -> bool:
    """A retrain run is due, pending or running: it will pick the new data up, do not ask again."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, FlowRunFilter,
                                                FlowRunFilterExpectedStartTime, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    # due now (an event's run waits in Scheduled until `serve` picks it up), not the cron's future runs
    active = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(timezone.utc)))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=active, limit=1, sort=FlowRunSort.ID_DESC, deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[RETRAIN_DEPLOYMENT])))
    return bool(runs)


@flow(name="hemaflow-data-watch")
def watch_data(params_path: str = "params.yaml") -> dict:
    """Emit `hemaflow.data.changed` when data.dvc names raw data the pipeline has not run on."""
    params_file = Path(params_path).resolve()
    root = params_file.parent
    status = data_change(root, load_params(params_file))
    logger = get_run_logger()
    if status["changed"] and retraining_under_way():
        logger.info("raw data changed; a retraining is already under way and will take it")
        status["requested"] = False
    elif status["changed"]:
        status["requested"] = True
        # one event id per data change: two watcher runs that start together (an interval
        # schedule catching up) both see "no retraining yet"; Prefect's trigger service drops an
        # event id it has already seen, so the change starts exactly one retraining
        import uuid

        change = f"{dataset_resource(root)}:{status['trained_md5']}->{status['versioned_md5']}"
        emit_event(event=DATA_CHANGED, id=uuid.uuid5(uuid.NAMESPACE_URL, change),
                   resource={"prefect.resource.id": dataset_resource(root), "prefect.resource.name": root.name},
                   payload=status)
        logger.info("raw data changed (%s -> %s): retraining requested", status["trained_md5"], status["versioned_md5"])
    else:
        logger.info("raw data unchanged (%s)", status["versioned_md5"])
    return status


def retraining_deployments(params_file: Path) -> list:
    """The two deployments `hemaflow serve` runs (see module docstring)."""
    params_file = params_file.resolve()
    root = params_file.parent
    sched = load_params(params_file).schedule
    args = {"params_path": str(params_file)}
    retrain_deployment = retrain.to_deployment(
        name=RETRAIN_DEPLOYMENT,
        schedules=[Cron(sched.cron, timezone=sched.timezone)],
        parameters=args,
        concurrency_limit=1,  # a cron run and an event run never train at the same time
        triggers=[DeploymentEventTrigger(name="retrain-on-new-data", expect={DATA_CHANGED},
                                         match={"prefect.resource.id": dataset_resource(root)},
                                         parameters=args)],
        description="Retrain, evaluate and promote (stages up to date in dvc.lock are skipped).",
        tags=["hemaflow"],
    )
    watch = watch_data.to_deployment(name="watch-data", schedules=[Interval(sched.watch_interval_s)], parameters=args,
                                     description="Emit hemaflow.data.changed when data.dvc moves.",
                                     tags=["hemaflow"])
    return [retrain_deployment, watch]
