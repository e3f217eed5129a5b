"""The scheduled retraining skips training when the raw data's DVC version and the params are
those of the production model (and only then)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from hemaflow.config import load_params
from hemaflow.provenance import params_fingerprint
from hemaflow.store import open_store
from tests.code.test_store import make_files
from tests.flows.conftest import ROOT

MD5 = "0123456789abcdef" * 2 + ".dir"


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": MD5, "path": "data/raw"}]}))
    params = load_params(root / "params.yaml")
    store = open_store(str(root / params.promote.store_url))
    mv = store.publish(params.promote.model_name, make_files(tmp_path / "m", b"prod"), {
        "data_version": {"path": "data/raw", "md5": MD5, "source": "data.dvc"},
        "params_fingerprint": params_fingerprint(params.model_dump(mode="json"))})
    store.set_production(params.promote.model_name, mv.version, expected=None)
    return root


def test_production_matches_only_for_the_same_data_and_params(tmp_path):
    from hemaflow.flows.schedules import production_matches

    root = _project(tmp_path)
    params = load_params(root / "params.yaml")
    assert production_matches(root, params)["current"]
    # where the model is stored or how the run is parallelised does not count
    other = params.model_copy(update={"parallel": params.parallel.model_copy(update={"n_workers": 7})})
    assert production_matches(root, other)["current"]
    retuned = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 99})})
    assert not production_matches(root, retuned)["current"]
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "f" * 32 + ".dir", "path": "data/raw"}]}))
    status = production_matches(root, params)
    assert not status["current"] and status["production_data_md5"] == MD5
    shutil.rmtree(root / "models")
    assert production_matches(root, params) | {"current": False} == production_matches(root, params)


@pytest.mark.slow
def test_retrain_flow_skips_training_when_nothing_changed(tmp_path, prefect_harness):
    from hemaflow.flows.schedules import retrain

    root = _project(tmp_path)
    out = retrain(params_path=str(root / "params.yaml"))
    assert out["skipped_training"] and "training skipped" in out["reason"]
    assert not (root / "dvc.lock").exists() and not (root / "models" / "candidate").exists()
