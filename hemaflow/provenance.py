"""Where a model came from: the raw data's DVC version, the code revision, the params.

Recorded in every model card, and compared by the retraining flow to skip training when
the data and the params are those of the production model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

# params blocks that do not change the trained model (where it is stored or trained, how it is
# scheduled or parallelised, where files go: the data itself is covered by its DVC md5)
NOT_MODEL_PARAMS = ("promote", "schedule", "parallel", "paths", "train_job")


def data_version(raw_dir: Path) -> dict[str, Any]:
    """{'path', 'md5', 'source'}: the md5 a *.dvc file (data.dvc) records for raw_dir, else
    the md5 the last ingest ran on (dvc.lock); md5 None when neither names it."""
    raw_dir = Path(raw_dir).resolve()
    for root in [raw_dir.parent, *raw_dir.parent.parents]:
        for dvc_file in sorted(root.glob("*.dvc")):
            try:
                meta = yaml.safe_load(dvc_file.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            for out in meta.get("outs") or []:
                if out.get("path") and (root / out["path"]).resolve() == raw_dir:
                    return {"path": out["path"], "md5": out.get("md5"), "source": str(dvc_file.name)}
        lock = root / "dvc.lock"
        if lock.is_file():
            try:
                stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
            except yaml.YAMLError:
                stages = {}
            for dep in (stages.get("ingest") or {}).get("deps", []):
                if (root / dep.get("path", "")).resolve() == raw_dir:
                    return {"path": dep["path"], "md5": dep.get("md5"), "source": "dvc.lock"}
        if (root / ".git").exists() or (root / ".dvc").is_dir():
            break
    return {"path": str(raw_dir), "md5": None, "source": None}


def code_revision(path: Path) -> dict[str, Any]:
    """{'commit', 'dirty'}: git HEAD of the checkout holding path and whether tracked files
    differ from it (None, None outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                 timeout=20, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def params_fingerprint(params: dict[str, Any] | None) -> str | None:
    """sha256 of the params that shape the model (NOT_MODEL_PARAMS left out)."""
    if params is None:
        return None
    model_params = {k: v for k, v in params.items() if k not in NOT_MODEL_PARAMS}
    return hashlib.sha256(json.dumps(model_params, sort_keys=True, default=str).encode()).hexdigest()
