"""DVC remote on S3 (README "Team set-up"): `dvc push` to an S3-compatible server started by the
test (moto), `dvc pull` into a fresh clone, identical files."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.s3 import s3_server  # noqa: F401  (fixture)

BIN = Path(sys.executable).parent


def sh(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _same_tree(a: Path, b: Path) -> list[str]:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files, a
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return [str(f) for f in files if not filecmp.cmp(a / f, b / f, shallow=False)]


def test_dvc_push_then_pull_into_a_fresh_clone_through_s3(tmp_path, s3_server):  # noqa: F811
    from hemaflow.synthetic import generate_dataset

    bucket = s3_server.new_bucket("dvc")
    origin = tmp_path / "origin"
    origin.mkdir()
    sh("git", "init", "-q", cwd=origin)
    sh("dvc", "init", "-q", cwd=origin)
    sh("dvc", "config", "core.analytics", "false", cwd=origin)
    generate_dataset(origin / "data" / "raw", n_fields=12, seed=3)
    sh("dvc", "add", "-q", "data/raw", cwd=origin)
    # the commands of README "Team set-up" (MinIO there, moto here)
    sh("dvc", "remote", "add", "-d", "team", f"s3://{bucket}/dvc", cwd=origin)
    sh("dvc", "remote", "modify", "team", "endpointurl", s3_server.endpoint_url, cwd=origin)
    sh("git", "add", "-A", cwd=origin)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data", cwd=origin)
    sh("dvc", "push", cwd=origin)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="dvc/")["Contents"]]
    assert any(k.startswith("dvc/files/md5/") for k in keys), keys

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert not (clone / "data" / "raw").exists()
    sh("dvc", "pull", cwd=clone)
    assert _same_tree(origin / "data" / "raw", clone / "data" / "raw") == []
    assert "in sync" in sh("dvc", "status", "-c", cwd=clone)
