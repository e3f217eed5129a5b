"""Every input layout, through every stage to a promoted model, with both drivers.

Each examples/<layout>.params.yaml is run as written, from a copy of the examples folder
in a temporary project: `hemaflow run --params ...` (the Prefect flow) and the nine stage
commands one by one (`hemaflow ingest --params ...`, ... as dvc.yaml runs them).
- allidb, medmnist, labels_csv: their raw_dir is the generated fixture
  (tests/fixtures/layouts.py) at the path the example names.
- pbc, bccd: a small sample of ../shared/data (20 images per PBC class, 40 BCCD fields with
  their boxes and split lists), with fewer epochs and quality gates sized for the sample;
  skipped where the folder is absent.
Each run must promote a model and write its metrics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures.layouts import LAYOUTS
from tests.flows.conftest import hemaflow

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
STAGE_COMMANDS = ("ingest", "validate-labels", "segment", "split", "augment", "check-quality", "train", "evaluate",
                  "promote")
PBC_PER_CLASS = 20
BCCD_FIELDS = 40

# Every layout here is a smoke run on 60-320 images: the promotion gate's floors (test-set size,
# per-class recall) are for real test sets, so the runs use an open gate; tests/code/test_gate_e2e.py
# tests the gate itself.
SMOKE_GATE = {"min_balanced_accuracy": 0.0, "min_class_recall": 0.0, "min_test_size": 1}

# pbc / bccd samples are 60x smaller than the real sets: gates sized for the sample, short training
SAMPLE_OVERRIDES = {
    "pbc": {"check_quality": {"min_per_class": 2, "clean_min_per_class": 10, "max_kl_divergence": 0.5},
            "augment": {"target_per_class": 60},
            "train": {"epochs": 2, "image_size": 32, "batch_size": 16, "devices": "cpu"},
            "promote": SMOKE_GATE},
    "bccd": {"augment": {"target_per_class": 120},
             "train": {"epochs": 2, "image_size": 32, "batch_size": 16, "devices": "cpu"},
             "promote": SMOKE_GATE},
}


def _sample_pbc(dest: Path) -> None:
    src = SHARED / "pbc" / "images"
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dest / "images" / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[:PBC_PER_CLASS]:
            shutil.copy(f, dest / "images" / cls.name / f.name)


def _sample_bccd(dest: Path) -> None:
    src = SHARED / "bccd" / "BCCD"
    ids = sorted(p.stem for p in (src / "JPEGImages").glob("*.jpg"))[:BCCD_FIELDS]
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dest / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(src / "JPEGImages" / f"{i}.jpg", dest / "JPEGImages")
        if (src / "Annotations" / f"{i}.xml").is_file():
            shutil.copy(src / "Annotations" / f"{i}.xml", dest / "Annotations")
    keep = set(ids)
    for lst in (src / "ImageSets" / "Main").glob("*.txt"):
        (dest / "ImageSets" / "Main" / lst.name).write_text(
            "\n".join(i for i in lst.read_text().split() if i in keep) + "\n")


def _project(tmp: Path, layout: str) -> Path:
    """tmp/examples/<layout>.params.yaml, with its raw data where the params say."""
    (tmp / "examples").mkdir(parents=True)
    params_path = tmp / "examples" / f"{layout}.params.yaml"
    params = yaml.safe_load((ROOT / "examples" / f"{layout}.params.yaml").read_text())
    if layout in LAYOUTS:  # the generated fixture, at the path the example names
        LAYOUTS[layout]((params_path.parent / params["paths"]["raw_dir"]).resolve())
    else:
        if not (SHARED / layout).is_dir():
            pytest.skip(f"{SHARED / layout} not present")
        raw = tmp / "sample" / layout
        (_sample_pbc if layout == "pbc" else _sample_bccd)(raw)
        params["paths"]["raw_dir"] = str(raw)
        for block, values in SAMPLE_OVERRIDES[layout].items():
            params.setdefault(block, {}).update(values)
    params.setdefault("promote", {}).update(SMOKE_GATE)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params_path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = hemaflow(*args, cwd=cwd)
    assert res.returncode == 0, f"hemaflow {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    assert "Traceback" not in res.stderr
    return res


def _assert_promoted(params_path: Path) -> dict:
    params = yaml.safe_load(params_path.read_text())
    base = params_path.parent
    promotion = json.loads((base / params["paths"]["promotion_path"]).read_text())
    metrics = json.loads((base / params["paths"]["eval_dir"] / "metrics.json").read_text())
    assert promotion["promoted"], promotion["reason"]
    assert promotion["version"] >= 1 and 0.0 <= metrics["accuracy"] <= 1.0
    model = base / params["promote"]["store_url"] / params["promote"]["model_name"]
    assert any(model.glob("v*/model.keras")), f"no model published under {model}"
    return metrics


def _assert_classify_agrees_with_evaluate(params_path: Path, cwd: Path) -> None:
    """The promoted model, pulled by `hemaflow classify --model latest`, on the test split's
    source images (PBC: one centred cell each) gives the class evaluate gave their crops:
    classify cuts single-cell images as the segment stage did, with the same pixels and TTA."""
    import pandas as pd

    params = yaml.safe_load(params_path.read_text())
    base = params_path.parent
    preds = pd.read_csv(base / params["paths"]["eval_dir"] / "predictions.csv")
    crops = pd.read_parquet(base / params["paths"]["crops_dir"] / "crops.parquet").set_index("path")
    raw = Path(params["paths"]["raw_dir"])
    sources = {str(raw / crops.loc[p, "source_path"]): label for p, label in zip(preds["path"], preds["predicted"])}
    res = _run("classify", *sources, "--model", "latest", "--params", str(params_path), "--out", str(cwd / "cls"),
               cwd=cwd)
    assert "layout: single_cell (single_cell_crop: centre)" in res.stdout, res.stdout
    cells = pd.read_csv(cwd / "cls" / "cells.csv")
    assert len(cells) == len(sources), "one cell per single-cell image"
    agree = sum(sources[row.image] == row.label for row in cells.itertuples())
    assert agree >= len(cells) - 1, f"classify agrees with evaluate on {agree} of {len(cells)} test images"


def _assert_classify_finds_the_cells_of_smears(params_path: Path, cwd: Path) -> None:
    """BCCD's cell-type model was trained on annotated boxes as single-cell items, but new images
    are whole smear fields: classify finds each field's white cells (BCCD: mostly one a field)."""
    import pandas as pd

    raw = Path(yaml.safe_load(params_path.read_text())["paths"]["raw_dir"])
    fields = sorted((raw / "JPEGImages").glob("*.jpg"))[:4]
    res = _run("classify", *map(str, fields), "--model", "latest", "--params", str(params_path),
               "--out", str(cwd / "cls"), cwd=cwd)
    assert "layout: smear (each cell's box)" in res.stdout, res.stdout
    cells = pd.read_csv(cwd / "cls" / "cells.csv")
    assert cells["image"].nunique() == len(fields) and (cells.groupby("image").size() <= 3).all()
    assert ((cells["x1"] - cells["x0"]) < 400).all(), "cells, not whole fields"


LAYOUT_NAMES = ("pbc", "bccd", "allidb", "medmnist", "labels_csv")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_flow_runs_every_stage_to_a_promoted_model(layout, tmp_path):
    params_path = _project(tmp_path, layout)
    res = _run("run", "--params", str(params_path), cwd=tmp_path)
    assert "promoted" in res.stdout
    _assert_promoted(params_path)
    if layout == "pbc":
        _assert_classify_agrees_with_evaluate(params_path, tmp_path)
    if layout == "bccd":
        _assert_classify_finds_the_cells_of_smears(params_path, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_stage_cli_runs_every_stage_to_a_promoted_model(layout, tmp_path):
    params_path = _project(tmp_path, layout)
    for cmd in STAGE_COMMANDS:
        _run(cmd, "--params", str(params_path), cwd=tmp_path)
    _assert_promoted(params_path)
