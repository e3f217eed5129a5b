"""`hemaflow models ...` and `hemaflow pull --model` against a local store and the moto S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hemaflow.store import open_store
from tests.code.test_store import make_files, put_raw
from tests.fixtures.s3 import s3_server  # noqa: F401  (session fixture)

BIN = Path(sys.executable).parent
NAME = "wbc"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hemaflow"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HEMAFLOW_ACTOR": "tester@lab"})


def seeded(url: str, tmp_path: Path):
    """Two versions with cards like promote writes; v1 production, then v2."""
    store = open_store(url)
    for i, (bal, lr) in enumerate(((0.81, 0.002), (0.86, 0.004)), start=1):
        store.publish(NAME, make_files(tmp_path / f"m{i}", f"model-{i}".encode()), {
            "metrics": {"balanced_accuracy": bal, "n": 30},
            "evaluation": {"internal": {"accuracy": bal + 0.02, "balanced_accuracy": bal,
                                        "per_class": {"basophil": {"recall": bal - 0.1}}}},
            "params": {"train": {"learning_rate": lr, "epochs": 12}, "base": {"seed": 42}},
            "data_version": {"path": "data/raw", "md5": f"{i}" * 32 + ".dir"},
            "code": {"commit": f"{i}" * 40, "dirty": False},
            "promotion": {"gate_passed": True, "summary": "passed", "reasons": ["PASS x: y"]},
        })
    prev = None
    for v in (1, 2):
        store.set_production(NAME, v, expected=prev)
        store.append_ledger(NAME, {"action": "promote", "version": v, "previous_production": prev,
                                   "production_changed": True, "outcome": "promoted", "actor": "t"})
        prev = v
    return store


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"s3://{request.getfixturevalue('s3_server').new_bucket('cli')}/models"


def test_list_show_diff_rollback_ledger(store_url, tmp_path):
    seeded(store_url, tmp_path)
    common = ["--store-url", store_url, "--model-name", NAME, "--params", str(tmp_path / "none.yaml")]

    out = cli("models", "list", *common, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("v0001") and lines[2].startswith("v0002")
    assert lines[2].rstrip().endswith("production, latest") and "0.860" in lines[2]

    show = cli("models", "show", "production", *common, cwd=tmp_path)
    assert show.returncode == 0 and "# Model card: wbc v0002" in show.stdout and "2222222222" in show.stdout
    card = json.loads(cli("models", "show", "v1", "--json", *common, cwd=tmp_path).stdout)
    assert card["version"] == 1 and card["files"]["model.keras"]["sha256"]

    diff = cli("models", "diff", "v1", "v2", *common, cwd=tmp_path)
    assert diff.returncode == 0, diff.stderr
    assert any("balanced_accuracy" in ln and "0.8100" in ln and "0.8600" in ln and "+0.0500" in ln
               for ln in diff.stdout.splitlines())
    assert any("train.learning_rate" in ln and "0.0020" in ln and "0.0040" in ln for ln in diff.stdout.splitlines())
    assert "train.epochs" not in diff.stdout  # equal params are not listed
    assert "data_version.md5" in diff.stdout

    rb = cli("models", "rollback", "--reason", "drift seen at the lab", *common, cwd=tmp_path)
    assert rb.returncode == 0 and "production v0002 -> v0001" in rb.stdout, rb.stderr
    assert open_store(store_url).production(NAME).version == 1
    again = cli("models", "rollback", *common, cwd=tmp_path)
    assert again.returncode == 1 and "nothing to roll back to" in again.stderr and "Traceback" not in again.stderr

    led = cli("models", "ledger", "--json", *common, cwd=tmp_path)
    entries = [json.loads(x) for x in led.stdout.splitlines()]
    assert [e["action"] for e in entries] == ["promote", "promote", "rollback"]
    assert entries[-1]["actor"] == "tester@lab" and "drift seen at the lab" in entries[-1]["reason"]


def test_promote_force_needs_a_reason_and_unknown_version_is_named(tmp_path):
    url = str(tmp_path / "registry")
    seeded(url, tmp_path)
    common = ["--store-url", url, "--model-name", NAME, "--params", str(tmp_path / "none.yaml")]
    res = cli("models", "promote", "v1", "--force", *common, cwd=tmp_path)
    assert res.returncode == 1 and "--force needs --reason" in res.stderr and "Traceback" not in res.stderr
    res = cli("models", "show", "v7", *common, cwd=tmp_path)
    assert res.returncode == 1 and "no such version v0007" in res.stderr


def test_pull_takes_production_latest_or_a_version_and_refuses_tampering(store_url, tmp_path):
    store = seeded(store_url, tmp_path)
    store.set_production(NAME, 1, expected=2)  # production v1, latest v2
    common = ["--store-url", store_url, "--model-name", NAME, "--params", str(tmp_path / "none.yaml")]
    for spec, payload in (("production", b"model-1"), ("latest", b"model-2"), ("v2", b"model-2")):
        res = cli("pull", "--model", spec, "--dest", str(tmp_path / spec), *common, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / spec / "model.keras").read_bytes() == payload and "verified" in res.stdout

    put_raw(store, f"{NAME}/v0001/model.keras", b"model-X")
    res = cli("pull", "--model", "production", "--dest", str(tmp_path / "production"), *common, cwd=tmp_path)
    assert res.returncode == 1 and "sha256 mismatch" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "production" / "model.keras").read_bytes() == b"model-1"  # the good pull is kept

    card = open_store(store_url).resolve(NAME, 2).card
    card["files"]["../x"] = {"sha256": "0" * 64, "bytes": 1}
    put_raw(store, f"{NAME}/v0002/card.json", json.dumps(card).encode())
    res = cli("pull", "--model", "v2", "--dest", str(tmp_path / "d" / "e"), *common, cwd=tmp_path)
    assert res.returncode == 1 and "not a plain file name" in res.stderr
    assert not (tmp_path / "d" / "x").exists()


def test_pull_never_overwrites_a_folder_that_is_not_a_model(tmp_path):
    url = str(tmp_path / "registry")
    seeded(url, tmp_path)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    res = cli("pull", "--dest", str(tmp_path / "precious"), "--store-url", url, "--model-name", NAME,
              "--params", str(tmp_path / "none.yaml"), cwd=tmp_path)
    assert res.returncode == 1 and "not a pulled model folder" in res.stderr
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
