"""DVC as the flow's cache: skip a stage DVC calls up to date, record a stage the flow ran.

Because the flow writes the same dvc.lock that `dvc repro` reads, a `hemaflow run` followed
by `dvc repro` (or the reverse) does no stage work twice, and changing one parameter
re-runs only the stages downstream of it, whichever driver is used.
"""

from __future__ import annotations

from contextlib import chdir
from pathlib import Path


def dvc_tracks(root: Path) -> bool:
    return (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()


def is_up_to_date(root: Path, stage: str) -> bool:
    """True when the stage's deps, params and outs match dvc.lock and the outs are on disk."""
    from dvc.repo import Repo

    # DVC resolves stage names (and its run cache) against the working directory, not the repo
    with chdir(root), Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


def record_run(root: Path, stage: str) -> None:
    """Write the stage's hashes to dvc.lock and put its outputs in the DVC cache."""
    from dvc.repo import Repo

    with chdir(root), Repo(str(root)) as repo:
        repo.commit(stage, force=True)
