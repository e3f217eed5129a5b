"""Grid search: a Prefect flow mapping trials over the grid (Dask workers), a comparison
table scored on the validation split, the best point written back with comments kept."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from hemaflow.tasks.search import grid_points, write_back
from tests.code.synthetic_wbc import CLASSES, write_dataset
from tests.flows.conftest import hemaflow

PARAMS = """# a lab's params
base:
  classes: [{classes}]
paths:
  augmented_dir: data/augmented
train:
  architecture: shallow_cnn         # BloodMNIST report B
  image_size: 28
  epochs: 2
  batch_size: 8
  learning_rate: 0.002              # peak rate
search:
  grid:
    learning_rate: [0.001, 0.01]
    kernels: [4, 8]
  metric: balanced_accuracy
parallel:
  n_workers: 2
"""


def test_grid_points_are_checked():
    assert len(grid_points({"learning_rate": [1, 2], "dropout": [0.0, 0.5, 0.25]})) == 6
    with pytest.raises(ValueError, match=r"unknown train param\(s\) \['learnig_rate'\]"):
        grid_points({"learnig_rate": [0.1]})


def test_write_back_keeps_comments_and_other_blocks(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.format(classes=", ".join(CLASSES)))
    write_back(path, {"learning_rate": 0.01, "kernels": 8})
    text = path.read_text()
    assert "  learning_rate: 0.01              # peak rate" in text and "# BloodMNIST report B" in text
    data = yaml.safe_load(text)
    assert data["train"]["kernels"] == 8 and data["train"]["architecture"] == "shallow_cnn"
    assert data["search"]["grid"]["kernels"] == [4, 8]



def test_write_back_adds_a_train_block_to_a_file_that_extends_another(tmp_path):
    from hemaflow.config import load_params

    (tmp_path / "base.yaml").write_text(PARAMS.format(classes=", ".join(CLASSES)))
    child = tmp_path / "variant.yaml"
    child.write_text("# a variant\nextends: base.yaml\nbase:\n  seed: 3")  # no train block, no final newline
    write_back(child, {"learning_rate": 0.01, "kernels": 8})
    assert child.read_text().startswith("# a variant\nextends: base.yaml\nbase:\n  seed: 3\n")
    p = load_params(child)
    assert (p.train.learning_rate, p.train.kernels, p.base.seed) == (0.01, 8, 3)
    assert p.train.architecture == load_params(tmp_path / "base.yaml").train.architecture  # still inherited

@pytest.mark.slow
def test_search_flow_compares_the_grid_and_writes_back_the_best(tmp_path):
    write_dataset(tmp_path / "data" / "augmented", per_split={"train": 8, "val": 4, "test": 2}, size=48)
    (tmp_path / "params.yaml").write_text(PARAMS.format(classes=", ".join(CLASSES)))
    res = hemaflow("search", "--write-back", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = pd.read_csv(tmp_path / "reports" / "search" / "results.csv")
    assert len(results) == 4 and set(results["kernels"]) == {4, 8}
    assert results["val_balanced_accuracy"].is_monotonic_decreasing  # best first
    best = results.iloc[0]
    train = yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]
    assert train["learning_rate"] == best["learning_rate"] and train["kernels"] == best["kernels"]
    assert "| rank |" in res.stdout and "best:" in res.stdout
