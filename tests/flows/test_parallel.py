"""Batched stages: the serial CLI path and the Prefect flow on Dask write identical files.

The reference is the serial path (hemaflow.tasks.stages.run_stage, as `dvc repro` runs it) on a
small generated dataset; the flow path runs the same stages as subflows whose batches are
Prefect tasks on a real Dask cluster: a local one of 2 worker processes started by the
task runner, or one started here and reached through parallel.dask_address.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hemaflow.config import load_params
from hemaflow.tasks.stages import run_stage
from tests.flows.conftest import ROOT, read_artifacts, task_run_names

# several batches per stage, so batching and result order are exercised
SMALL = {"augment": {"target_per_class": 16}, "parallel": {"n_workers": 2, "batch_size": 3, "augment_batch_size": 9}}
UPSTREAM = ("ingest", "validate_labels")


def _write_params(root: Path, **parallel) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for block, values in SMALL.items():
        params[block].update(values)
    params["parallel"].update(parallel)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "data" / "label_corrections.csv", root / "data" / "label_corrections.csv")
    return path


def _new_project(root: Path, n_fields: int = 12) -> Path:
    from hemaflow.synthetic import generate_dataset

    root.mkdir(parents=True, exist_ok=True)
    params_path = _write_params(root)
    generate_dataset(root / "data" / "raw", n_fields=n_fields, seed=5)
    for stage in UPSTREAM:
        run_stage(stage, load_params(params_path), root)
    return root


def _clone_upstream(src: Path, dest: Path, **parallel) -> Path:
    """A second project with the same raw data and ingest/validate outputs, nothing after."""
    shutil.copytree(src / "data" / "raw", dest / "data" / "raw")
    shutil.copytree(src / "data" / "labels", dest / "data" / "labels")
    shutil.copy(src / "data" / "manifest.parquet", dest / "data" / "manifest.parquet")
    return _write_params(dest, **parallel)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_same_outputs(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.endswith(".parquet"):  # compare the table, not writer metadata
            pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name))
        else:
            assert fa[name] == fb[name], f"{name} differs"


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> Path:
    """Reference: segment, split, augment run serially in-process (the CLI / dvc repro path)."""
    root = _new_project(tmp_path_factory.mktemp("serial"))
    for stage in ("segment", "split", "augment"):
        run_stage(stage, load_params(root / "params.yaml"), root)
    return root


def test_serial_batch_size_does_not_change_outputs(serial, tmp_path):
    params_path = _clone_upstream(serial, tmp_path, batch_size=1, augment_batch_size=1000)
    for stage in ("segment", "split", "augment"):
        run_stage(stage, load_params(params_path), tmp_path)
    assert_same_outputs(serial / "data" / "crops", tmp_path / "data" / "crops")
    assert_same_outputs(serial / "data" / "augmented", tmp_path / "data" / "augmented")
    n_crops = len(pd.read_parquet(serial / "data" / "crops" / "crops.parquet"))
    assert n_crops >= 6  # the comparison covered real work (several batches of 3 fields)


def _progress(key: str) -> float:
    return float(read_artifacts([key])[0]["data"])


@pytest.mark.slow
def test_flow_on_local_dask_cluster_matches_serial(serial, tmp_path, prefect_harness):
    from hemaflow.flows.training import run_batched_stage

    params_path = _clone_upstream(serial, tmp_path)  # dask_address null: the runner starts 2 local workers
    before = len(task_run_names("segment-batch-"))
    assert run_batched_stage("segment", str(params_path)) == {"stage": "segment", "ran": True}
    assert_same_outputs(serial / "data" / "crops", tmp_path / "data" / "crops")
    n_fields = len(pd.read_parquet(tmp_path / "data" / "labels" / "clean.parquet"))
    assert len(task_run_names("segment-batch-")) - before == -(-n_fields // 3)  # one task per batch of 3
    assert _progress("segment-progress") == 100.0

    run_stage("split", load_params(params_path), tmp_path)
    assert run_batched_stage("augment", str(params_path))["ran"]
    assert_same_outputs(serial / "data" / "augmented", tmp_path / "data" / "augmented")
    assert (tmp_path / "data" / "augmented" / "contact_sheet.png").is_file()


@pytest.mark.slow
def test_flow_on_scheduler_address_matches_serial(serial, tmp_path, prefect_harness):
    from hemaflow.flows.parallel import local_cluster
    from hemaflow.flows.training import run_batched_stage

    # a cluster that is not the runner's own (local_cluster: a LocalCluster that leaves os.environ alone)
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        params_path = _clone_upstream(serial, tmp_path, dask_address=cluster.scheduler_address)
        run_batched_stage("segment", str(params_path))
        run_stage("split", load_params(params_path), tmp_path)
        run_batched_stage("augment", str(params_path))
        ran_here = cluster.scheduler.task_prefixes["run_batch"].state_counts["memory"]
        from distributed import Client

        from hemaflow.flows import dask_worker

        with Client(cluster) as client:  # every worker ran the preload (a failed heartbeat is one line)
            assert list(client.run(dask_worker.installed).values()) == [True, True]
    # every batch ran on this cluster's workers, not on a cluster of the runner's own
    n_fields = len(pd.read_parquet(tmp_path / "data" / "labels" / "clean.parquet"))
    n_aug = int(pd.read_parquet(tmp_path / "data" / "augmented" / "dataset.parquet")["augmented"].sum())
    assert ran_here == -(-n_fields // 3) + -(-n_aug // 9)
    assert_same_outputs(serial / "data" / "crops", tmp_path / "data" / "crops")
    assert_same_outputs(serial / "data" / "augmented", tmp_path / "data" / "augmented")


def test_a_failed_worker_heartbeat_is_one_warning_line_not_a_traceback():
    """distributed logs it at ERROR with a traceback though the worker retries; a flow that
    succeeded printed that in its stderr (flows/dask_worker.py)."""
    import io
    import logging

    from hemaflow.flows.dask_worker import HeartbeatHiccup

    logger = logging.getLogger("hemaflow.test.distributed.worker")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.addFilter(HeartbeatHiccup())
    logger.propagate = False
    try:
        try:
            raise OSError("Stream is closed")
        except OSError:
            logger.exception("Failed to communicate with scheduler during heartbeat.")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("Unexpected exception during heartbeat. Closing worker.")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == ("WARNING Failed to communicate with scheduler during heartbeat (OSError: Stream is closed); "
                        "the worker retries at the next heartbeat")
    # any other error keeps its level and traceback
    assert lines[1] == "ERROR Unexpected exception during heartbeat. Closing worker."
    assert lines[2] == "Traceback (most recent call last):" and "RuntimeError: boom" in lines[-1]
