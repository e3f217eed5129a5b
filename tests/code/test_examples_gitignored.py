"""Every example's outputs must be git-ignored: running a README example must not leave
hundreds of MB of crops for a `git add -A` to commit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hemaflow.config import load_params

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("manifest_path", "labels_dir", "crops_dir", "split_path", "augmented_dir", "quality_dir", "model_dir",
           "eval_dir")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.params.yaml")))
def test_example_outputs_are_git_ignored(example):
    paths = load_params(ROOT / "examples" / example).paths
    outputs = [(ROOT / "examples" / getattr(paths, key)).resolve().relative_to(ROOT) for key in OUTPUTS]
    result = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *map(str, outputs)],
                            cwd=ROOT, capture_output=True, text=True)
    not_ignored = [line.split("\t")[-1] for line in result.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, f"{example}: outputs not in .gitignore: {not_ignored}"
