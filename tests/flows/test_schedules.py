"""Scheduled retraining against a real Prefect server: cron deployment + data-changed trigger.

`hemaflow serve` runs in a subprocess; new raw data (data.dvc moved) must start a
retraining flow run on its own, through the watcher's event and the server's automation.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.prefect_server import BIN, prefect_server  # noqa: F401  (fixture)
from tests.flows.conftest import make_project, sh

pytestmark = pytest.mark.slow


def _client_call(api_url: str, fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(go())


def _retrain_runs(api_url: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def read(client):
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50)
    return _client_call(api_url, read)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"hemaflow serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(2)
    text = log.read_text()
    interesting = "\n".join(line for line in text.splitlines()
                            if any(w in line for w in ("changed", "retrain", "ERROR", "Error", "Crashed", "Failed")))
    raise AssertionError(f"timed out waiting for {what}:\n{interesting[-4000:]}\n...\n{text[-1500:]}")


def _completed(runs, n: int) -> bool:
    return sum(1 for r in runs if r.state and r.state.is_completed()) >= n


def test_serve_retrains_on_cron_deployment_and_new_data(prefect_server, tmp_path):  # noqa: F811
    root = make_project(tmp_path / "proj", n_fields=40)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["schedule"] = {"cron": "0 4 1 1 *", "timezone": "Europe/Madrid", "watch_interval_s": 10}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("hemaflow", "data-status", cwd=root)

    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "hemaflow"), "serve"], cwd=root, env=prefect_server.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        api = prefect_server.api_url

        def deployment():
            async def read(client):
                try:
                    return await client.read_deployment_by_name("hemaflow-training/retrain")
                except Exception:
                    return None
            return _client_call(api, read)

        dep = _wait_for(deployment, 120, "the retrain deployment", proc, log)
        crons = [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules]
        assert crons == [("0 4 1 1 *", "Europe/Madrid")]
        automations = _wait_for(lambda: _client_call(api, lambda c: c.read_automations_by_name("retrain-on-new-data")),
                                60, "the retrain-on-new-data automation", proc, log)
        assert automations[0].enabled

        # never trained: the watcher sees data.dvc ahead of (absent) dvc.lock and the event starts a run
        _wait_for(lambda: _completed(_retrain_runs(api), 1), 420, "the first event-triggered retraining", proc, log)
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        assert json.loads((root / "reports" / "promotion.json").read_text())["version"] == 1
        first_md5 = next(d["md5"] for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/raw")

        # unchanged data: further watcher runs request nothing
        time.sleep(25)
        started = [r for r in _retrain_runs(api) if r.state_type.value != "SCHEDULED"]  # cron pre-schedules runs
        assert len(started) == 1, [(r.name, r.state_name) for r in started]

        # new data arrives and is versioned: a second retraining runs on it
        from hemaflow.synthetic import generate_dataset
        generate_dataset(root / "data" / "raw", n_fields=40, seed=8)
        sh("dvc", "commit", "-f", "-q", "data.dvc", cwd=root)
        _wait_for(lambda: _completed(_retrain_runs(api), 2), 420, "the retraining on new data", proc, log)
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        new_md5 = next(d["md5"] for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/raw")
        assert new_md5 != first_md5
        assert new_md5 == yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
