"""What can be checked of the team set-up without Docker: the compose file's services and wiring,
the Dockerfiles' inputs exist and install the pinned project, prefect.yaml matches params."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"flow": ROOT / "infra/docker/flow.Dockerfile", "gpu": ROOT / "infra/docker/gpu.Dockerfile"}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_server_database_store_and_workers():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "minio", "setup", "worker", "train-worker"} <= set(services)
    server = services["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["environment"]["PREFECT_UI_API_URL"].endswith("/api}") or "/api" in server["environment"]["PREFECT_UI_API_URL"]
    assert "4200:4200" in server["ports"]
    worker = services["worker"]
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "hemaflow-cpu"]
    assert worker["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    gpu = services["train-worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "infra/docker/gpu.Dockerfile"
    for name, svc in services.items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
    assert (ROOT / services["setup"]["command"][1]).is_file()


def test_setup_creates_the_pools_prefect_yaml_deploys_to():
    setup = (ROOT / "infra/team/setup.sh").read_text()
    pools = set(re.findall(r"work-pool create (\S+)", setup))
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} <= pools
    for template in re.findall(r"--base-job-template (\S+)", setup):
        assert (ROOT / template).is_file(), template
    assert "deploy --all" in setup


def test_dockerfiles_copy_existing_files_and_install_the_pinned_project():
    for kind, path in DOCKERFILES.items():
        text = path.read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
        extras = re.search(r'pip install "\.\[([a-z,]+)\]"', text)
        assert extras, path
        assert "infra" in extras.group(1).split(",")
        assert ("gpu" in extras.group(1).split(",")) == (kind == "gpu")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'gpu = ["tensorflow[and-cuda]==' in pyproject and '"prefect==3.8.8"' in pyproject


def test_prefect_yaml_schedule_is_params_schedule():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["schedule"]
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert deployments["retrain"]["schedules"] == [{"cron": params["cron"], "timezone": params["timezone"]}]
    assert deployments["watch-data"]["schedules"][0]["interval"] == params["watch_interval_s"]
    train_job = yaml.safe_load((ROOT / "params.yaml").read_text())["train_job"]
    flow, name = train_job["deployment"].split("/")
    assert flow == "hemaflow-train-job" and name in deployments
    assert train_job["mode"] == "local"  # `make run` trains in-process


def test_ci_installs_the_browser_then_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    assert "chromium" in ci and "chromium-driver" in ci and "apt-get install" in ci
    assert ci.strip().splitlines()[-1] == "make test"
    assert "make test" in (ROOT / "README.md").read_text()
