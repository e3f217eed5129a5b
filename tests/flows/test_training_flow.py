"""The whole road, for real: Prefect flow and `dvc repro` share dvc.lock and skip unchanged work."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.flows.conftest import make_project, read_artifacts, sh, task_run_names

pytestmark = pytest.mark.slow

ALL = ["ingest", "validate_labels", "segment", "split", "augment", "check_quality", "train", "evaluate", "promote"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("proj"))


def _artifact_keys() -> set[str]:
    return {a["key"] for a in read_artifacts() if a.get("key")}


def test_flow_runs_every_stage_then_skips_then_reruns_downstream(project, prefect_harness):
    from hemaflow.flows.training import training_pipeline

    batches_before = {s: len(task_run_names(f"{s}-batch-")) for s in ("segment", "augment")}
    first = training_pipeline(params_path=str(project / "params.yaml"))
    assert first["ran"] == ALL and first["skipped"] == []
    for stage, n in batches_before.items():  # segment and augment ran as batches on Dask
        assert len(task_run_names(f"{stage}-batch-")) > n, stage
    metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and "per_class" in metrics
    assert metrics["accuracy"] > 0.4, metrics  # 5 classes: chance is 0.2
    assert first["promotion"]["promoted"] and first["promotion"]["version"] == 1
    assert (project / "models/registry/wbc-classifier/v0001/model.keras").is_file()
    png = (project / "reports/eval/confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    keys = _artifact_keys()
    assert {"ingest-summary", "segment-progress", "augment-progress", "train-progress", "check-quality-report",
            "evaluate-summary"} <= keys

    # nothing changed: no stage work, and DVC agrees (the flow wrote dvc.lock)
    second = training_pipeline(params_path=str(project / "params.yaml"))
    assert second["ran"] == [] and second["skipped"] == ALL
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert second["promotion"]["version"] == 1

    # one augmentation parameter: augmentation and everything after it, nothing before it
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["augment"]["rotation_deg"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = training_pipeline(params_path=str(project / "params.yaml"))
    assert third["ran"] == ["augment", "check_quality", "train", "evaluate", "promote"]
    assert third["skipped"] == ["ingest", "validate_labels", "segment", "split"]


def test_dvc_repro_twice_second_is_up_to_date(tmp_path):
    project = make_project(tmp_path, n_fields=40)  # fewer can leave a split without a basophil
    first = sh("dvc", "repro", cwd=project)
    assert "Running stage 'train'" in first.stdout
    assert json.loads((project / "reports/promotion.json").read_text())["version"] == 1
    second = sh("dvc", "repro", cwd=project)
    assert "Running stage" not in second.stdout
    for stage in ALL:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
    assert "Data and pipelines are up to date." in sh("dvc", "status", cwd=project).stdout
