"""Pieces of the training job and the UI artifacts, without a worker: the transfer of folders
through S3 (moto) and a shared folder, the job failing loudly, the pictures' markdown."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.fixtures.s3 import s3_server  # noqa: F401  (fixture)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _folder(root: Path) -> Path:
    (root / "images" / "a").mkdir(parents=True)
    (root / "dataset.parquet").write_bytes(b"PAR1 not really")
    (root / "images" / "a" / "x.png").write_bytes(bytes(range(256)))
    (root / "images" / "y.png").write_bytes(b"")
    return root


@pytest.mark.parametrize("kind", ["s3", "folder"])
def test_upload_then_download_gives_the_same_files(kind, tmp_path, s3_server):  # noqa: F811
    from hemaflow.flows.gpu_job import download_dir, join, read_text, upload_dir, write_text

    src = _folder(tmp_path / "src")
    base = f"s3://{s3_server.new_bucket('xfer')}/jobs/run1" if kind == "s3" else str(tmp_path / "shared" / "run1")
    assert upload_dir(src, join(base, "inputs", "augmented")) == 3
    dest = tmp_path / "dest"
    (dest / "stale").mkdir(parents=True)  # what was there is replaced
    assert download_dir(join(base, "inputs", "augmented"), dest) == 3
    assert _tree(dest) == _tree(src)
    assert download_dir(join(base, "inputs", "nothing"), tmp_path / "empty") == 0
    write_text(join(base, "outputs", "result.json"), '{"ok": true}')
    assert json.loads(read_text(join(base, "outputs", "result.json"))) == {"ok": True}
    assert read_text(join(base, "outputs", "missing.json")) is None


def test_a_failed_job_fails_the_submitter_naming_run_and_state(tmp_path, monkeypatch, prefect_harness):
    import prefect.deployments
    from prefect import flow
    from prefect.states import Failed

    from hemaflow.config import Params
    from hemaflow.flows.gpu_job import TrainJobError, submit_training

    (tmp_path / "data" / "augmented").mkdir(parents=True)
    (tmp_path / "data" / "augmented" / "dataset.parquet").write_bytes(b"x")
    calls = {}

    def fake_run_deployment(name, parameters, **kw):
        calls.update(name=name, parameters=parameters, **kw)
        return SimpleNamespace(name="bold-gpu", id="1234", state=Failed(message="CUDA out of memory"),
                               work_pool_name="hemaflow-gpu-k8s")

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    params = Params().model_copy(update={"train_job": Params().train_job.model_copy(
        update={"mode": "work_pool", "transfer_url": str(tmp_path / "shared"), "job_variables": {"gpu_limit": 2}})})

    @flow
    def submitter():
        return submit_training(params, tmp_path)

    with pytest.raises(TrainJobError, match=r"bold-gpu .*hemaflow-train-job/gpu ended Failed: CUDA out of memory"):
        submitter()
    assert calls["name"] == "hemaflow-train-job/gpu" and calls["job_variables"] == {"gpu_limit": 2}
    assert set(calls["parameters"]["params"]) == {"base", "ingest", "validate_labels", "segment", "train", "evaluate"}
    assert calls["parameters"]["transfer_url"].startswith(str(tmp_path / "shared"))
    assert (Path(calls["parameters"]["transfer_url"]) / "inputs/augmented/dataset.parquet").is_file()


def _png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8), mode).save(path)
    return path


def test_stage_pictures_markdown_embeds_every_png_downscaled(tmp_path):
    from PIL import Image

    from hemaflow.flows.artifacts import MAX_SIDE_PX, pictures_markdown, stage_pictures

    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for name in ("reliability_diagram", "error_gallery", "confusion_matrix"):
        _png(eval_dir / f"{name}.png", (300, 200))
    _png(eval_dir / "wide.png", (3000, 500), "RGBA")
    (eval_dir / "metrics.json").write_text("{}")
    paths = SimpleNamespace(eval_dir=eval_dir)
    pictures = stage_pictures("evaluate", paths)
    assert [p.stem for p in pictures] == ["confusion_matrix", "error_gallery", "reliability_diagram", "wide"]
    md = pictures_markdown("evaluate", pictures)
    assert "## Confusion matrix" in md and "## Reliability diagram" in md and "## Error gallery" in md
    uris = [line[line.index("(data:") + 1:-1] for line in md.splitlines() if line.startswith("![")]
    assert len(uris) == 4
    sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in uris]
    assert sizes[0] == (300, 200) and sizes[-1] == (MAX_SIDE_PX, 200)
    assert stage_pictures("ingest", paths) == []


def test_a_job_not_picked_up_in_time_is_cancelled_and_fails_the_submitter(tmp_path, monkeypatch, prefect_harness):
    import prefect.deployments
    from prefect import flow
    from prefect.states import Scheduled

    import hemaflow.flows.gpu_job as gpu_job
    from hemaflow.config import Params

    (tmp_path / "data" / "augmented").mkdir(parents=True)
    (tmp_path / "data" / "augmented" / "dataset.parquet").write_bytes(b"x")
    cancelled = []
    monkeypatch.setattr(prefect.deployments, "run_deployment", lambda name, parameters, **kw: SimpleNamespace(
        name="late-gpu", id="5678", state=Scheduled(), work_pool_name="hemaflow-gpu-k8s"))
    monkeypatch.setattr(gpu_job, "_cancel", lambda run_id, message: cancelled.append((run_id, message)))
    params = Params().model_copy(update={"train_job": Params().train_job.model_copy(
        update={"mode": "work_pool", "transfer_url": str(tmp_path / "shared"), "timeout_s": 30})})

    @flow
    def submitter():
        return gpu_job.submit_training(params, tmp_path)

    with pytest.raises(gpu_job.TrainJobError, match=r"late-gpu .* ended Scheduled after 30 s, cancelled"):
        submitter()
    assert cancelled and cancelled[0][0] == "5678"
