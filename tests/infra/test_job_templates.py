"""The GPU work-pool templates in infra/, rendered as the workers would render them (no cluster,
no Docker daemon here): the values come from prefect.yaml's deployments."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from unittest.mock import AsyncMock, MagicMock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_TEMPLATE = ROOT / "infra" / "kubernetes" / "base-job-template.json"
DOCKER_TEMPLATE = ROOT / "infra" / "docker" / "base-job-template.json"


def deployment(name: str) -> dict:
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    return next(d for d in deployments if d["name"] == name)


def _flow_run():
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid.uuid4(), name="brisk-gpu", flow_id=uuid.uuid4())


def _render(config_cls, template: dict, values: dict):
    client = AsyncMock()  # no block references or variables in the templates: never really asked
    config = asyncio.run(config_cls.from_template_and_values(template, values, client=client))
    config.prepare_for_flow_run(_flow_run())
    return config


def _k8s_job(values: dict) -> dict:
    pytest.importorskip("prefect_kubernetes")
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    return _render(KubernetesWorkerJobConfiguration, json.loads(K8S_TEMPLATE.read_text()), values).job_manifest


def test_kubernetes_manifest_requests_the_deployments_gpus_on_selected_tolerated_nodes():
    values = deployment("gpu")["work_pool"]["job_variables"]
    job = _k8s_job(values)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == values["gpu_limit"] == 1
    assert isinstance(container["resources"]["limits"]["nvidia.com/gpu"], int)  # a whole-string placeholder keeps the type
    assert pod["nodeSelector"] == values["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == values["tolerations"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["image"] == values["image"]
    assert container["envFrom"] == [{"secretRef": {"name": "hemaflow-s3", "optional": True}}]
    assert container["resources"]["requests"]["memory"] == "16Gi"
    assert any(e["name"] == "PREFECT__FLOW_RUN_ID" for e in container["env"])  # the worker's own wiring survives


def test_kubernetes_gpu_limit_and_node_selector_follow_other_job_variables():
    job = _k8s_job({**deployment("gpu")["work_pool"]["job_variables"], "gpu_limit": 4,
                    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}})
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}


def test_kubernetes_template_defaults_and_prefects_default_lacks_them():
    from prefect_kubernetes.worker import KubernetesWorker

    ours = json.loads(K8S_TEMPLATE.read_text())["variables"]["properties"]
    default = KubernetesWorker.get_default_base_job_template()["variables"]["properties"]
    for var in ("gpu_limit", "node_selector", "tolerations"):
        assert var in ours and var not in default
    pod = _k8s_job({})["spec"]["template"]["spec"]  # the pool's defaults alone still ask for a GPU node
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"]


def test_docker_pool_gives_the_container_every_gpu():
    pytest.importorskip("prefect_docker")
    import docker
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    values = deployment("gpu-docker")["work_pool"]["job_variables"]
    config = _render(DockerWorkerJobConfiguration, json.loads(DOCKER_TEMPLATE.read_text()), values)
    assert config.image == values["image"]
    client = MagicMock()
    client.version.return_value = {"Version": "27.3.1"}
    settings = DockerWorker(work_pool_name="hemaflow-gpu-docker")._build_container_settings(client, config)
    assert settings["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    # what docker-py sends to the daemon: the same as `docker run --gpus all`
    host = docker.types.HostConfig(version="1.44", device_requests=settings["device_requests"],
                                   shm_size=settings["shm_size"])
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                       "Options": {}}]
