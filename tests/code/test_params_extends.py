"""`extends:` in a params file: a recipe variant holds only what differs from its parent.

What must hold: the child wins key by key, inherited relative paths still name the parent's
files from the child's folder, a missing parent or a cycle names the files, and the params.yaml
DVC reads refuses `extends` (DVC would not see inherited values)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hemaflow.config import ConfigError, load_params, read_params_dict, require_no_extends

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_child_overrides_key_by_key_and_replaces_lists(tmp_path):
    _write(tmp_path / "base.yaml", {"base": {"seed": 7, "classes": ["a", "b", "c"]},
                                    "train": {"epochs": 10, "batch_size": 32, "learning_rate": 0.01}})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "base": {"classes": ["a", "b"]},
                                             "train": {"epochs": 3}})
    p = load_params(child)
    assert p.base.seed == 7 and p.base.classes == ("a", "b")                 # list replaced, not merged
    assert (p.train.epochs, p.train.batch_size, p.train.learning_rate) == (3, 32, 0.01)
    assert "extends" not in read_params_dict(child)


def test_inherited_relative_paths_are_rebased_to_the_child_folder(tmp_path):
    parent = _write(tmp_path / "lab" / "params.yaml", {
        "paths": {"raw_dir": "raw", "model_dir": "/abs/models", "test_data": None},
        "promote": {"store_url": "models/registry"},
        "search": {"out_dir": "reports/search"},
        "train_job": {"transfer_url": "s3://bucket/jobs"}})
    child = _write(tmp_path / "variants" / "x" / "child.yaml", {"extends": "../../lab/params.yaml",
                                                                 "paths": {"crops_dir": "crops"}})
    p = load_params(child)
    here = child.parent
    assert (here / p.paths.raw_dir).resolve() == (parent.parent / "raw").resolve()
    assert p.paths.crops_dir == Path("crops")                                  # the child's own: its folder
    assert p.paths.model_dir == Path("/abs/models") and p.paths.test_data is None
    assert (here / p.promote.store_url).resolve() == (parent.parent / "models" / "registry").resolve()
    assert (here / p.search.out_dir).resolve() == (parent.parent / "reports" / "search").resolve()
    assert p.train_job.transfer_url == "s3://bucket/jobs"                     # a URL is not a path


def test_chains_resolve_and_cycles_or_missing_parents_name_the_files(tmp_path):
    _write(tmp_path / "a.yaml", {"train": {"epochs": 5, "batch_size": 8}})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "train": {"epochs": 6}})
    c = _write(tmp_path / "c.yaml", {"extends": "b.yaml", "train": {"batch_size": 4}})
    assert (load_params(c).train.epochs, load_params(c).train.batch_size) == (6, 4)

    _write(tmp_path / "a.yaml", {"extends": "c.yaml"})
    with pytest.raises(ConfigError, match=r"makes a cycle: .*c\.yaml -> .*b\.yaml -> .*a\.yaml -> .*c\.yaml"):
        load_params(c)
    lost = _write(tmp_path / "lost.yaml", {"extends": "nowhere.yaml"})
    with pytest.raises(ConfigError, match=r"lost\.yaml: 'extends: nowhere\.yaml': params file not found at .*nowhere"):
        load_params(lost)
    odd = _write(tmp_path / "odd.yaml", {"extends": ["a.yaml"]})
    with pytest.raises(ConfigError, match=r"odd\.yaml: 'extends' must name a params file"):
        load_params(odd)


def test_a_bad_key_in_the_child_is_named(tmp_path):
    _write(tmp_path / "base.yaml", {"train": {"epochs": 3}})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match=r"child\.yaml: invalid parameters(.|\n)*epochs"):
        load_params(child)


def test_pbc64_example_extends_the_28px_recipe():
    """The 64 px recipe is written as its differences from the 28 px one, not as a copy."""
    raw = yaml.safe_load((ROOT / "examples" / "pbc64.params.yaml").read_text())
    assert raw["extends"] == "pbc.params.yaml"
    assert set(raw) == {"extends", "paths", "segment", "train", "promote"}
    assert load_params(ROOT / "examples" / "pbc64.params.yaml").paths.raw_dir == \
        load_params(ROOT / "examples" / "pbc.params.yaml").paths.raw_dir


def test_the_params_file_dvc_reads_refuses_extends(tmp_path):
    _write(tmp_path / "lab.yaml", {"base": {"seed": 1}})
    params = _write(tmp_path / "params.yaml", {"extends": "lab.yaml"})
    with pytest.raises(ConfigError, match="DVC reads this file's own keys"):
        require_no_extends(params)
    require_no_extends(tmp_path / "lab.yaml")                                   # self-contained: fine

    # the stage commands `dvc repro` runs refuse it too, naming the file, without a traceback
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    res = subprocess.run([str(Path(sys.executable).parent / "hemaflow"), "ingest"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 1 and "params.yaml: DVC reads this file's own keys" in res.stderr
    assert "Traceback" not in res.stderr
