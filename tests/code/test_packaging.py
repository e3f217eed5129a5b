"""One import package: tasks/ and flows/ install as hemaflow.tasks / hemaflow.flows only."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_generic_top_level_names_are_not_installed(tmp_path):
    for name in ("tasks", "flows"):
        res = _python(f"import {name}", tmp_path)  # outside the checkout: only site-packages
        assert res.returncode != 0 and f"No module named '{name}'" in res.stderr, name


def test_stage_and_flow_packages_import_as_hemaflow(tmp_path):
    res = _python("import hemaflow.tasks.stages, hemaflow.flows.cli, hemaflow.tasks.segment; "
                  "print(hemaflow.tasks.stages.__name__)", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "hemaflow.tasks.stages"
