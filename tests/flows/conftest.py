"""A throw-away copy of the project (git + DVC) on a small generated dataset, and a Prefect harness."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Small but real: the same stages on fewer fields, fewer epochs. Batches of 8 give the
# ~120 train images 15 steps an epoch (at batch 32 BatchNorm's moving statistics had not
# settled), and 8 epochs (at 4 the restored best epoch was still near chance on an AVX2
# EPYC host: 0.29 on 7 test images).
SMALL = {"augment": {"target_per_class": 24}, "train": {"epochs": 8, "image_size": 32, "batch_size": 8},
         "check_quality": {"min_per_class": 1, "max_imbalance_ratio": 5.0, "max_kl_divergence": 1.0},
         # a few test images: the gate's size and recall floors are for real test sets
         "promote": {"min_balanced_accuracy": 0.0, "min_class_recall": 0.0, "min_test_size": 1},
         # fixed batch sizes: sized by work, 40 small fields are one in-process batch, and these
         # tests check that the flow sends segment and augment batches to Dask
         "parallel": {"batch_size": 10, "augment_batch_size": 40}}


def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def hemaflow(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """The `hemaflow` command of this virtualenv, run in cwd with a Prefect home of its own there."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(cwd / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([str(BIN / "hemaflow"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def make_project(dest: Path, n_fields: int = 40) -> Path:
    """Copy code + pipeline files, generate data, track it with data.dvc, commit to git."""
    for name in ("hemaflow", "tasks", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "data/label_corrections.csv"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for block, values in SMALL.items():
        params[block].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=dest)
    sh("dvc", "init", "-q", cwd=dest)
    sh("dvc", "config", "core.analytics", "false", cwd=dest)
    from hemaflow.synthetic import generate_dataset
    generate_dataset(dest / "data" / "raw", n_fields=n_fields, seed=7)
    sh("dvc", "add", "-q", "data/raw", cwd=dest)
    track_as_data_dvc(dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=dest)
    return dest


def track_as_data_dvc(root: Path) -> None:
    """`dvc add data/raw` writes data/raw.dvc; the project keeps it at the top as data.dvc."""
    meta = yaml.safe_load((root / "data" / "raw.dvc").read_text())
    meta["outs"][0]["path"] = "data/raw"
    (root / "data.dvc").write_text(yaml.safe_dump(meta, sort_keys=False))
    (root / "data" / "raw.dvc").unlink()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


def read_artifacts(keys: list[str] | None = None) -> list[dict]:
    """Artifacts on the current Prefect API, newest first, as JSON rows.

    A raw request: this Prefect server refuses the null filters that
    PrefectClient.read_artifacts() sends by default (HTTP 422).
    """
    import asyncio

    from prefect.client.orchestration import get_client

    body: dict = {"sort": "CREATED_DESC", "limit": 200}
    if keys:
        body["artifacts"] = {"key": {"any_": list(keys)}}

    async def read():
        async with get_client() as client:
            res = await client._client.post("/artifacts/filter", json=body)
            return res.json()

    return asyncio.run(read())


def task_run_names(prefix: str) -> list[str]:
    """Names of the task runs whose name starts with prefix."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix)),
                                               sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
            return [r.name for r in runs if r.name.startswith(prefix)]

    return asyncio.run(read())
