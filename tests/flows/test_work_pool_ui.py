"""The team road, for real, on one machine: a `prefect server` on 127.0.0.1, the work pools made
from infra/'s templates, `prefect deploy --all` of prefect.yaml, a process worker polling the
GPU-job pool, the training flow submitting train + evaluate to it through an S3 server (moto),
and the flow run's artifacts (summaries, pictures, promotion decision) opened in headless
Chromium. The Kubernetes and Docker pools are created and deployed to, not run (no cluster
here): tests/infra/test_job_templates.py renders their jobs.

The screenshots are test outputs: $HEMAFLOW_UI_SCREENSHOTS, else reports/ui/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.prefect_server import BIN, PrefectServer, running_prefect_server
from tests.fixtures.s3 import s3_server  # noqa: F401  (fixture)
from tests.flows.conftest import ROOT, make_project, sh

pytestmark = pytest.mark.slow

POOLS = {  # name -> (type, base job template or None for the type's default)
    "hemaflow-cpu": ("process", None),
    "hemaflow-gpu-process": ("process", None),
    "hemaflow-gpu-k8s": ("kubernetes", ROOT / "infra" / "kubernetes" / "base-job-template.json"),
    "hemaflow-gpu-docker": ("docker", ROOT / "infra" / "docker" / "base-job-template.json"),
}
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED")
SCREENSHOTS = Path(os.environ.get("HEMAFLOW_UI_SCREENSHOTS", ROOT / "reports" / "ui"))


def _api(server: PrefectServer, fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        return asyncio.run(go())


def _post(server: PrefectServer, path: str, body: dict) -> list[dict]:
    async def go(client):
        res = await client._client.post(path, json=body)
        res.raise_for_status()
        return res.json()
    return _api(server, go)


@pytest.fixture(scope="module")
def team(tmp_path_factory, s3_server):  # noqa: F811
    """Server, pools, deployments and a project configured to train on the process pool."""
    home = tmp_path_factory.mktemp("prefect-ui-home")
    with running_prefect_server(home) as server:
        bucket = s3_server.new_bucket("hemaflow")
        root = make_project(tmp_path_factory.mktemp("team") / "proj", n_fields=40)
        shutil.copy(ROOT / "prefect.yaml", root / "prefect.yaml")
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train_job"].update(mode="work_pool", deployment="hemaflow-train-job/process",
                                   transfer_url=f"s3://{bucket}/jobs", timeout_s=900)
        params["promote"]["store_url"] = f"s3://{bucket}/models"
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**server.env, **{k: os.environ[k] for k in AWS_VARS if k in os.environ},
               "HEMAFLOW_ROOT": str(root), "PREFECT_WORKER_QUERY_SECONDS": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}
        for name, (kind, template) in POOLS.items():
            args = ["prefect", "work-pool", "create", name, "--type", kind, "--overwrite"]
            if template:
                args += ["--base-job-template", str(template)]
            _run(args, root, env)
        deploy = _run(["prefect", "--no-prompt", "deploy", "--all"], root, env, timeout=300)
        yield {"server": server, "root": root, "env": env, "bucket": bucket, "deploy": deploy, "s3": s3_server}


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} exited {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def test_work_pools_from_templates_and_prefect_deploy_all(team):
    server = team["server"]
    pools = {p.name: p for p in _api(server, lambda c: c.read_work_pools())}
    assert {n: pools[n].type for n in POOLS} == {n: kind for n, (kind, _) in POOLS.items()}
    k8s_vars = pools["hemaflow-gpu-k8s"].base_job_template["variables"]["properties"]
    assert {"gpu_limit", "node_selector", "tolerations"} <= set(k8s_vars)
    docker_vars = pools["hemaflow-gpu-docker"].base_job_template["variables"]["properties"]
    assert docker_vars["container_create_kwargs"]["default"]["device_requests"][0]["capabilities"] == [["gpu"]]

    async def deployments(client):
        return {name: await client.read_deployment_by_name(name) for name in (
            "hemaflow-training/retrain", "hemaflow-data-watch/watch-data", "hemaflow-train-job/gpu",
            "hemaflow-train-job/gpu-docker", "hemaflow-train-job/process")}
    deps = _api(server, deployments)
    sched = yaml.safe_load((ROOT / "params.yaml").read_text())["schedule"]
    retrain = deps["hemaflow-training/retrain"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in retrain.schedules] == \
        [(sched["cron"], sched["timezone"], True)]
    assert retrain.work_pool_name == "hemaflow-cpu" and retrain.parameters == {"params_path": "params.yaml"}
    watch = deps["hemaflow-data-watch/watch-data"]
    assert [s.schedule.interval.total_seconds() for s in watch.schedules] == [sched["watch_interval_s"]]
    gpu = deps["hemaflow-train-job/gpu"]
    assert gpu.work_pool_name == "hemaflow-gpu-k8s"
    assert gpu.job_variables["gpu_limit"] == 1 and gpu.job_variables["node_selector"]
    assert deps["hemaflow-train-job/gpu-docker"].work_pool_name == "hemaflow-gpu-docker"
    assert deps["hemaflow-train-job/process"].work_pool_name == "hemaflow-gpu-process"
    automations = _api(server, lambda c: c.read_automations_by_name("retrain-on-new-data"))
    assert automations and automations[0].enabled
    # the cron's upcoming runs exist on the server: the scheduler took the deployment
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = _post(server, "/flow_runs/filter", {"deployments": {"id": {"any_": [str(retrain.id)]}}, "limit": 5})
        if runs:
            break
        time.sleep(2)
    assert runs and all(r["state"]["type"] == "SCHEDULED" for r in runs)


def _flow_runs(server: PrefectServer, flow_name: str, **flow_run_filter) -> list[dict]:
    return _post(server, "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC",
                                               "flow_runs": flow_run_filter, "limit": 10})


def _cli_runs(server: PrefectServer) -> list[dict]:
    """The `hemaflow run` flow runs, newest first (not the retrain deployment's scheduled ones)."""
    return _flow_runs(server, "hemaflow-training", deployment_id={"is_null_": True})


@pytest.fixture(scope="module")
def trained(team):
    """`hemaflow run` in the project; a process worker on the GPU-job pool runs train + evaluate."""
    root, env = team["root"], team["env"]
    log_path = root / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "hemaflow-gpu-process",
                                   "--type", "process", "--limit", "1"], cwd=root, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        run = subprocess.run([str(BIN / "hemaflow"), "run"], cwd=root, env=env, capture_output=True, text=True,
                             timeout=900)
        seconds = time.monotonic() - t0
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
    assert run.returncode == 0, f"hemaflow run failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}\n" \
                                f"worker:\n{log_path.read_text()[-4000:]}"
    print(f"hemaflow run with training on the work pool: {seconds:.0f} s")
    return {**team, "run": run, "seconds": seconds, "worker_log": log_path.read_text()}


def test_flow_submits_training_to_the_work_pool_and_gets_the_model_back(trained):
    server, root = trained["server"], trained["root"]
    jobs = _flow_runs(server, "hemaflow-train-job")
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert job["state"]["type"] == "COMPLETED" and job["work_pool_name"] == "hemaflow-gpu-process"
    assert job["parent_task_run_id"], "the job run hangs under the flow's train-job task"
    main = _cli_runs(server)[0]
    assert main["state"]["type"] == "COMPLETED"
    # the model and the evaluation came back; DVC recorded both stages
    assert (root / "models/candidate/model.keras").is_file()
    metrics = json.loads((root / "reports/eval/metrics.json").read_text())
    assert 0 <= metrics["balanced_accuracy"] <= 1
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {"train", "evaluate", "promote"} <= set(lock)
    assert "up to date" in sh("dvc", "status", cwd=root).stdout
    promotion = json.loads((root / "reports/promotion.json").read_text())
    assert promotion["uri"].startswith(f"s3://{trained['bucket']}/models")
    # the transfer area holds inputs, outputs and the job's report
    s3 = trained["s3"].client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=trained["bucket"], Prefix="jobs/")["Contents"]]
    assert any("/inputs/augmented/dataset.parquet" in k for k in keys)
    assert any(k.endswith("/outputs/model/model.keras") for k in keys)
    result = json.loads(s3.get_object(Bucket=trained["bucket"],
                                      Key=next(k for k in keys if k.endswith("/outputs/result.json")))["Body"].read())
    assert result["flow_run_id"] == job["id"] and set(result["summaries"]) == {"train", "evaluate"}
    # a rerun with nothing changed submits nothing
    again = subprocess.run([str(BIN / "hemaflow"), "run"], cwd=root, env=trained["env"], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stages run:     none" in again.stdout
    assert len(_flow_runs(server, "hemaflow-train-job")) == 1


def _artifacts(server: PrefectServer, flow_run_id: str) -> dict[str, dict]:
    rows = _post(server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}},
                                               "sort": "CREATED_DESC", "limit": 200})
    return {r["key"]: r for r in reversed(rows) if r.get("key")}  # newest per key wins


def test_artifacts_carry_pictures_and_the_promotion_decision(trained):
    server = trained["server"]
    main = _cli_runs(server)[-1]  # the run that trained on the pool (a second one skipped every stage)
    arts = _artifacts(server, main["id"])
    for key in ("segment-pictures", "augment-pictures", "train-pictures", "evaluate-pictures"):
        assert arts[key]["type"] == "markdown" and "](data:image/" in arts[key]["data"], key
    assert "Confusion matrix" in arts["evaluate-pictures"]["data"]
    assert "Training curves" in arts["train-pictures"]["data"]
    assert "ran on" in arts["train-summary"]["data"] and "hemaflow-gpu-process" in arts["train-summary"]["data"]
    assert "Promotion decision" in arts["promotion-decision"]["data"]
    link = re.fullmatch(r"\[model card\]\((.+)\)", arts["model-card"]["data"]).group(1)  # a link artifact's data
    assert link.startswith(trained["s3"].endpoint_url) and "Signature" in link and "model_card.md" in link
    import urllib.request
    with urllib.request.urlopen(link, timeout=10) as res:  # the presigned link opens without credentials
        assert res.status == 200 and res.read()


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).is_file() and Path(driver_path).is_file()):
        pytest.skip(f"no system chromium/chromedriver ({binary}, {driver_path}): apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800",
                "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)


def _wait(driver, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / "timeout.png"))
    raise AssertionError(f"timed out waiting for {what} at {driver.current_url}:\n"
                         f"{driver.find_element('tag name', 'body').text[:2000]}")


RENDERED_IMAGES = "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0 " \
                  "&& i.src.startsWith('data:image/')).map(i => [i.alt, i.naturalWidth, i.naturalHeight])"


def test_ui_artifacts_tab_and_pictures_render_in_chromium(trained):
    server = trained["server"]
    main = _cli_runs(server)[-1]  # the run that trained on the pool (a second one skipped every stage)
    arts = _artifacts(server, main["id"])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver = _browser()
    try:
        driver.get(f"{server.ui_url}/v2/runs/flow-run/{main['id']}?tab=Artifacts")
        titles = ("ingest-summary", "train-summary", "evaluate-summary", "evaluate-pictures", "train-pictures",
                  "augment-pictures", "promotion-decision")
        body = lambda: driver.find_element("tag name", "body").text  # noqa: E731
        _wait(driver, lambda: all(t in body() for t in titles), 90, f"artifact titles {titles}")
        tab = SCREENSHOTS / "flow-run-artifacts.png"
        driver.save_screenshot(str(tab))

        shots = {"flow run's Artifacts tab": tab}
        for key, alts in (("evaluate-pictures", {"Confusion matrix"}), ("train-pictures", {"Training curves"}),
                          ("augment-pictures", {"Contact sheet"})):
            driver.get(f"{server.ui_url}/v2/artifacts/artifact/{arts[key]['id']}")
            shown = _wait(driver, lambda: driver.execute_script(RENDERED_IMAGES), 60, f"pictures of {key}")
            assert alts <= {alt for alt, _, _ in shown}, shown
            assert all(w > 100 and h > 100 for _, w, h in shown), shown
            shots[key] = SCREENSHOTS / f"{key}.png"
            driver.save_screenshot(str(shots[key]))

        driver.get(f"{server.ui_url}/v2/artifacts/artifact/{arts['promotion-decision']['id']}")
        _wait(driver, lambda: "Promotion decision" in body() and "Model card" in body(), 60, "the promotion decision")
        card_links = driver.execute_script(
            "return Array.from(document.links).map(a => a.href).filter(h => h.includes('Signature'))")
        assert card_links, "the model card link is a link in the page"
        shots["promotion-decision"] = SCREENSHOTS / "promotion-decision.png"
        driver.save_screenshot(str(shots["promotion-decision"]))
    finally:
        driver.quit()
    for what, path in shots.items():
        assert path.stat().st_size > 10_000, path
        print(f"screenshot of the {what}: {path}", file=sys.stderr)
