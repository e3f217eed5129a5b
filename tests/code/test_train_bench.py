"""benchmarks/train.py's command line: the 64 px example's params give the benchmark the same
recipe as its `--set` flags, and `--pipeline-only` without a first run says what to do."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import ROOT, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train")


def test_pbc64_example_is_the_set_flags_recipe(bench):
    from hemaflow.config import read_params_dict

    def train(params, spec, minutes=None, epochs=None, sets=()):
        base = read_params_dict(ROOT / "examples" / params)["train"]
        return bench.train_config(base, spec, argparse.Namespace(minutes=minutes, epochs=epochs, set=list(sets)))

    flags = ["width=48", "depth=1", "stem_stride=2", "subclasses=file_prefix", "calibrate=temperature",
             "patience=400"]
    assert train("pbc64.params.yaml", "") == train("pbc.params.yaml", "resnet_small@64", 58, 400, flags)


def test_pipeline_only_without_a_first_run_names_the_missing_file(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--pipeline-only", "--work-dir", str(tmp_path / "empty")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty" / "params.yaml") in err and "without --pipeline-only" in err
