"""Training as a job: train (+ evaluate) as a run of its own deployment on a work pool.

The CPU stages run wherever the training flow runs; with params `train_job.mode: work_pool`
the flow hands train and evaluate to the `hemaflow-train-job` flow deployed on a GPU work
pool (prefect.yaml: Kubernetes, Docker or a process worker) and waits for it:

    flow (CPU)                                    job (GPU node)
    augmented_dir -> <transfer>/<run>/inputs/augmented -> pulled, run_stage("train"),
                                                          run_stage("evaluate")
    model_dir, eval_dir <- <transfer>/<run>/outputs/{model,eval,result.json} <- pushed

<transfer> is params `train_job.transfer_url`: s3://bucket/prefix (boto3; AWS_ENDPOINT_URL
for MinIO or another S3-compatible store) or a folder both machines mount. The job's
return value is not relied on (Prefect results are not persisted across machines by
default): it writes outputs/result.json, which the flow reads.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from hemaflow.config import Params, PathParams
from hemaflow.flows.artifacts import publish_pictures, publish_summary, stage_progress
from hemaflow.tasks.stages import run_stage, stage_paths

JOB_FLOW = "hemaflow-train-job"
JOB_STAGES = ("train", "evaluate")
RESULT_FILE = "result.json"
# what run_stage("train"/"evaluate") reads besides paths (evaluate reads an external test_data
# folder with the ingest, validate_labels and segment settings)
JOB_PARAM_BLOCKS = ("base", "ingest", "validate_labels", "segment", "train", "evaluate")
# optional inputs of train/evaluate besides the augmented dataset (params paths; a file or a
# folder), sent along when set: a model to continue from, local backbone weights, a test set
EXTRA_INPUTS = ("init_model", "backbone_weights", "test_data")


class TrainJobError(RuntimeError):
    """The training job did not complete, or its outputs are missing."""


# ---------------------------------------------------------------------------------------
# Transfer: a folder to/from s3://bucket/prefix or a shared local folder
# ---------------------------------------------------------------------------------------

def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def _s3():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5}))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def upload_dir(local: Path, url: str) -> int:
    """Copy every file under local to url (replacing what is there); returns the file count."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    if url.startswith("s3://"):
        bucket, prefix = _split_s3(url)
        client = _s3()
        for f in files:
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")
    else:
        dest = Path(url)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(local, dest)
    return len(files)


def upload_file(local: Path, url: str) -> None:
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        _s3().upload_file(str(local), bucket, key)
    else:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, url)


def download_dir(url: str, local: Path) -> int:
    """Replace local with the files under url; returns the file count (0: nothing there)."""
    local = Path(local)
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    if url.startswith("s3://"):
        bucket, prefix = _split_s3(url)
        client = _s3()
        n = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                dest = local / obj["Key"][len(prefix) + 1:]
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(dest))
                n += 1
        return n
    src = Path(url)
    if not src.is_dir():
        return 0
    shutil.copytree(src, local, dirs_exist_ok=True)
    return sum(1 for p in local.rglob("*") if p.is_file())


def write_text(url: str, text: str) -> None:
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        _s3().put_object(Bucket=bucket, Key=key, Body=text.encode())
    else:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        Path(url).write_text(text)


def read_text(url: str) -> str | None:
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        try:
            return _s3().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except Exception as exc:  # botocore ClientError NoSuchKey
            if "NoSuchKey" in str(exc) or "404" in str(exc):
                return None
            raise
    path = Path(url)
    return path.read_text() if path.is_file() else None


# ---------------------------------------------------------------------------------------
# The job (runs on the work pool's machine)
# ---------------------------------------------------------------------------------------

def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


@flow(name=JOB_FLOW, log_prints=False)
def train_job(transfer_url: str, params: dict, stages: list[str] = list(JOB_STAGES),
              extra_inputs: dict[str, str] | None = None) -> dict:
    """Pull the augmented dataset from transfer_url/inputs, run the stages, push model and
    evaluation to transfer_url/outputs; returns (and writes to outputs/result.json) the
    stages' summaries. Training uses the devices this machine has (params train.devices)."""
    logger = get_run_logger()
    unknown = [s for s in stages if s not in JOB_STAGES]
    if unknown:
        raise ValueError(f"a training job runs {', '.join(JOB_STAGES)}, not {', '.join(unknown)}")
    # the job's own folder layout: the submitter's paths mean nothing on this machine
    p = Params.model_validate(params).model_copy(update={"paths": PathParams()})
    with tempfile.TemporaryDirectory(prefix="hemaflow-job-") as tmp:
        root = Path(tmp)
        overrides = {}
        for name, rel in (extra_inputs or {}).items():  # see submit_training
            local = root / "inputs" / name
            if not download_dir(join(transfer_url, "inputs", name), local):
                raise TrainJobError(f"input {name} missing at {join(transfer_url, 'inputs', name)}")
            overrides[name] = local / rel if rel else local
        paths = stage_paths(p, root, overrides)
        n = download_dir(join(transfer_url, "inputs", "augmented"), paths.augmented_dir)
        if not n:
            raise TrainJobError(f"no training inputs at {join(transfer_url, 'inputs', 'augmented')}")
        logger.info("pulled %d input files from %s", n, transfer_url)
        summaries, reports = {}, {}
        for name in stages:
            result = run_stage(name, p, root, overrides, progress=stage_progress(name))
            summaries[name] = _jsonable(result.summary())
            reports[name] = getattr(result, "markdown", None)
            publish_summary(name, result.summary(), reports[name])
            publish_pictures(name, paths)
            logger.info("%s: %s", name, summaries[name])
        pushed = {"model": upload_dir(paths.model_dir, join(transfer_url, "outputs", "model"))}
        if "evaluate" in stages:
            pushed["eval"] = upload_dir(paths.eval_dir, join(transfer_url, "outputs", "eval"))
    from prefect.runtime import flow_run

    result = {"stages": list(stages), "summaries": summaries, "reports": reports, "pushed_files": pushed,
              "host": socket.gethostname(), "flow_run_id": str(flow_run.id) if flow_run.id else None}
    write_text(join(transfer_url, "outputs", RESULT_FILE), json.dumps(result, indent=2))
    logger.info("pushed %s to %s", pushed, transfer_url)
    return result


# ---------------------------------------------------------------------------------------
# The submitting side (runs in the training flow)
# ---------------------------------------------------------------------------------------

def _cancel(flow_run_id, message: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(message=message), force=True)
    except Exception as exc:  # the error that follows matters more than this one
        get_run_logger().warning("could not cancel training job %s: %s", flow_run_id, exc)


def submit_training(params: Params, root: Path, stages: tuple[str, ...] = JOB_STAGES) -> dict:
    """Push the inputs, run the job deployment on its work pool, wait, pull model and evaluation.

    Raises TrainJobError when the job run does not complete (failed, crashed, cancelled, or
    still not finished after train_job.timeout_s)."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    logger = get_run_logger()
    cfg = params.train_job
    paths = stage_paths(params, root)
    run_key = str(flow_run.id) if flow_run.id else uuid.uuid4().hex
    where = join(cfg.transfer_url, run_key)
    n = upload_dir(paths.augmented_dir, join(where, "inputs", "augmented"))
    extra = {}
    for name in EXTRA_INPUTS:
        src = getattr(paths, name, None)
        if src is None:
            continue
        src = Path(src)
        if src.is_dir():
            n += upload_dir(src, join(where, "inputs", name))
            extra[name] = ""
        else:  # a missing file fails here, naming it, rather than on the GPU node
            upload_file(src, join(where, "inputs", name, src.name))
            n += 1
            extra[name] = src.name
    logger.info("pushed %d input files to %s; submitting %s to %s", n, where, "+".join(stages), cfg.deployment)
    # only the blocks the job reads: an image built from another commit then fails only on a
    # difference that matters, and loudly (the job validates them)
    job_params = params.model_dump(mode="json", include=set(JOB_PARAM_BLOCKS))
    run = run_deployment(cfg.deployment, parameters={"transfer_url": where, "params": job_params,
                                                     "stages": list(stages), "extra_inputs": extra},
                         timeout=cfg.timeout_s, job_variables=cfg.job_variables or None,
                         flow_run_name=f"train-job-{run_key[:8]}", tags=["hemaflow", "train-job"])
    state = run.state
    if state is not None and not state.is_final():  # timed out: do not leave it to train unobserved
        _cancel(run.id, f"hemaflow: no result within train_job.timeout_s={cfg.timeout_s:.0f} s")
    if state is None or not state.is_completed():
        name = state.name if state else "unknown"
        hint = (f" after {cfg.timeout_s:.0f} s, cancelled (is a worker polling the pool?)"
                if state and not state.is_final() else "")
        raise TrainJobError(f"training job {run.name} ({run.id}) on {cfg.deployment} ended {name}{hint}: "
                            f"{state.message if state else ''}")
    text = read_text(join(where, "outputs", RESULT_FILE))
    if text is None:
        raise TrainJobError(f"training job {run.name} completed but wrote no {join(where, 'outputs', RESULT_FILE)}")
    result = json.loads(text)
    if not download_dir(join(where, "outputs", "model"), paths.model_dir):
        raise TrainJobError(f"training job {run.name}: no model at {join(where, 'outputs', 'model')}")
    if "evaluate" in stages and not download_dir(join(where, "outputs", "eval"), paths.eval_dir):
        raise TrainJobError(f"training job {run.name}: no evaluation at {join(where, 'outputs', 'eval')}")
    logger.info("training job %s completed on %s (work pool %s)", run.name, result.get("host"), run.work_pool_name)
    result.update(job_flow_run_id=str(run.id), job_flow_run_name=run.name, work_pool=run.work_pool_name,
                  transfer=where)
    return result
