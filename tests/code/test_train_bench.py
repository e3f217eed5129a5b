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


def _bench_run(work, seed, test_wrong, ext_wrong, n=100, train=None, minutes=57.0, right=()):
    """A finished benchmarks/train.py work dir as the run leaves it (files, not a trained model):
    n test and n external predictions, the named file names called wrong (and those in right
    called right, so that two runs can disagree on named images)."""
    import json

    import pandas as pd
    import yaml

    tag = "resnet_small_64"
    (work / "models" / tag).mkdir(parents=True)
    (work / "eval" / tag / "external").mkdir(parents=True)
    (work / "holdout.json").write_text(json.dumps({"data": "/data/pbc", "frac": 0.1, "seed": seed, "counts": {}}))
    (work / "models" / tag / "train_summary.json").write_text(json.dumps({"seconds": minutes * 60}))
    (work / "eval" / tag / "metrics.json").write_text("{}")
    (work / f"params_{tag}.yaml").write_text(yaml.safe_dump(
        {"paths": {"raw_dir": str(work / "raw")}, "train": train or {"width": 48, "image_size": 64}}))
    for part, wrong in (("", test_wrong), ("external", ext_wrong)):
        names = [f"{part or 'test'}_{i}.png" for i in range(n - len(wrong) - len(right))] + list(wrong) + list(right)
        pd.DataFrame({"path": [f"images/ig/{x}" for x in names], "label": "ig",
                      "predicted": ["ig" if x not in wrong else "neutrophil" for x in names]}
                     ).to_csv(work / "eval" / tag / part / "predictions.csv", index=False)
    return work


def test_pool_sums_errors_over_folders_and_names_shared_ones(bench, tmp_path, capsys):
    a = _bench_run(tmp_path / "a", 1, ["MMY_1.png", "BNE_2.png"], ["MY_3.png"])
    b = _bench_run(tmp_path / "b", 2, ["MMY_1.png"], [])
    result = bench.main(["--pool", str(a), str(b)])
    test, ext = result["pooled"]["test"], result["pooled"]["external"]
    assert (test["n"], test["errors"], test["accuracy"]) == (200, 3, 0.985)
    assert (ext["n"], ext["errors"], ext["accuracy"]) == (200, 1, 0.995)
    assert test["wrong_in_several_folders"] == ["images/ig/MMY_1.png"] and ext["wrong_in_several_folders"] == []
    assert test["distinct_images"] == 101  # test_0..98 and MMY_1 are in both folders (overlapping splits)
    assert test["accuracy_ci95"][0] < 0.985 < test["accuracy_ci95"][1]
    assert result["meets_target"] is False  # 0.985 < 0.99 on the internal split
    out = capsys.readouterr().out
    assert "pooled" in out and "3/200" in out and out.strip().splitlines()[-1].startswith('{"benchmark": "train_pool"')


def test_pool_refuses_the_same_folder_twice_and_another_recipe(bench, tmp_path):
    a = _bench_run(tmp_path / "a", 1, [], [])
    same_seed = _bench_run(tmp_path / "b", 1, [], [])
    with pytest.raises(SystemExit, match="both held out seed 1"):
        bench.main(["--pool", str(a), str(same_seed)])
    other = _bench_run(tmp_path / "c", 2, [], [], train={"width": 32, "image_size": 64})
    with pytest.raises(SystemExit, match=r"another recipe .*train\.width: 48 vs 32"):
        bench.main(["--pool", str(a), str(other)])
    with pytest.raises(SystemExit, match="no holdout.json"):
        bench.main(["--pool", str(a), str(tmp_path)])


def test_compare_pairs_two_recipes_on_one_folder_image_by_image(bench, tmp_path, capsys):
    a = _bench_run(tmp_path / "a", 3, ["MMY_1.png", "BNE_2.png"], ["MY_3.png"], right=["SNE_4.png"])
    b = _bench_run(tmp_path / "b", 3, ["SNE_4.png"], ["MY_3.png"], right=["MMY_1.png", "BNE_2.png"],
                   train={"width": 48, "image_size": 64, "sam_rho": 0.05})
    result = bench.main(["--compare", str(a), str(b)])
    test, ext = result["parts"]["test"], result["parts"]["external"]
    assert (test["n"], test["errors_a"], test["errors_b"]) == (100, 2, 1)
    assert (test["right_only_a"], test["right_only_b"], test["p_value"]) == (1, 2, 1.0)
    assert (ext["errors_a"], ext["errors_b"], ext["wrong_in_both"]) == (1, 1, ["images/ig/MY_3.png"])
    assert result["recipe_differences"] == ["train.sam_rho: None vs 0.05"]
    out = capsys.readouterr().out
    assert "right only in A" in out and out.strip().splitlines()[-1].startswith('{"benchmark": "train_compare"')


def test_compare_refuses_two_different_folders(bench, tmp_path):
    a = _bench_run(tmp_path / "a", 1, [], [])
    b = _bench_run(tmp_path / "b", 2, [], [])
    with pytest.raises(SystemExit, match="not the same folder"):
        bench.main(["--compare", str(a), str(b)])
