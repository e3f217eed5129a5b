"""Deterministic errors stop at once with one message naming the file, through both drivers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.fixtures.layouts import make_allidb
from tests.flows.conftest import hemaflow

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp: Path) -> Path:
    """The ALL-IDB example on its fixture, with crops_dir under a plain file (cannot be made)."""
    (tmp / "examples").mkdir()
    make_allidb(tmp / "data" / "fixtures" / "allidb")
    params = yaml.safe_load((ROOT / "examples" / "allidb.params.yaml").read_text())
    params["paths"]["crops_dir"] = "../blocker/crops"
    (tmp / "blocker").write_text("a file, not a folder")
    path = tmp / "examples" / "allidb.params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_stage_cli_unwritable_output_is_one_message(tmp_path):
    params = _project(tmp_path)
    for stage in ("ingest", "validate-labels"):
        assert hemaflow(stage, "--params", str(params), cwd=tmp_path).returncode == 0
    res = hemaflow("segment", "--params", str(params), cwd=tmp_path)
    assert res.returncode == 1
    assert "blocker/crops/images: Not a directory" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_flow_unwritable_output_fails_once_without_traceback(tmp_path):
    res = hemaflow("run", "--params", str(_project(tmp_path)), cwd=tmp_path)
    assert res.returncode == 1
    assert "Error: " in res.stderr and "blocker/crops/images: Not a directory" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert "Retrying" not in res.stderr + res.stdout, "a deterministic error is never retried"
    assert not (tmp_path / "data" / "allidb" / "split.parquet").exists(), "the run stopped at segment"
