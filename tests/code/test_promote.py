"""promote stage: the champion/challenger gate with real (tiny) Keras models on a real test
split, the production alias, the ledger, the model card, input errors; local and S3 (moto)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from hemaflow.config import EvaluateParams, PromoteParams
from hemaflow.errors import StageInputError
from hemaflow.store import open_store, sha256_file
from tests.code.synthetic_wbc import CLASSES, write_dataset
from tests.fixtures.s3 import s3_server  # noqa: F401  (session fixture)

keras = pytest.importorskip("keras")


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"s3://{request.getfixturevalue('s3_server').new_bucket('promote')}/models"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dataset")
    write_dataset(d, {"train": 16, "val": 4, "test": 8}, seed=5, size=32)  # 40 test images
    return d


@pytest.fixture(scope="module")
def good_weights(dataset, tmp_path_factory):
    """The train stage's small CNN, trained once (~30 s on 2 cores): perfect on this test split."""
    from hemaflow.config import TrainParams
    from hemaflow.tasks.train import train_model

    out = tmp_path_factory.mktemp("trained")
    train_model(dataset, out, TrainParams(image_size=32, epochs=8, batch_size=8, learning_rate=0.003, patience=4),
                CLASSES, 42)
    return out / "model.keras"


def save_model(root: Path, trained: Path, kill: tuple[str, ...] = (), noise: float = 0.0) -> Path:
    """A copy of the trained model; `kill` classes are never predicted (softmax bias -1e4);
    `noise` perturbs the last kernel (another sha256, same predictions)."""
    root.mkdir(parents=True, exist_ok=True)
    model = keras.models.load_model(trained, compile=False, safe_mode=True)
    head = model.layers[-1]
    kernel, bias = (np.array(w, copy=True) for w in head.get_weights())
    for c in kill:
        bias[CLASSES.index(c)] = -1e4
    if noise:
        kernel += np.random.default_rng(1).normal(0, noise, kernel.shape).astype(kernel.dtype)
    head.set_weights([kernel, bias])
    model.save(root / "model.keras")
    (root / "labels.json").write_text(json.dumps(list(CLASSES)))
    return root


def evaluate(model_dir: Path, dataset: Path, eval_dir: Path) -> Path:
    from hemaflow.tasks.evaluate import evaluate_model

    evaluate_model(model_dir, dataset, eval_dir, EvaluateParams(gallery_size=0))
    return eval_dir


def cfg_for(url: str, **kw) -> PromoteParams:
    return PromoteParams(store_url=url, model_name="wbc", **kw)


def run_promote(model_dir, eval_dir, promotion_path, cfg, dataset, **kw):
    from hemaflow.tasks.promote import promote_model

    return promote_model(model_dir, eval_dir, promotion_path, cfg, dataset_dir=dataset, **kw)


@pytest.fixture()
def good(tmp_path, dataset, good_weights):
    d = save_model(tmp_path / "good", good_weights)
    return d, evaluate(d, dataset, tmp_path / "good-eval")


def test_good_first_model_becomes_production_and_rerun_is_a_noop(store_url, good, dataset, tmp_path):
    model_dir, eval_dir = good
    cfg = cfg_for(store_url)
    pp = tmp_path / "reports" / "promotion.json"
    first = run_promote(model_dir, eval_dir, pp, cfg, dataset, params={"train": {"epochs": 3}},
                        source_commit="deadbeef")
    assert (first.promoted, first.published, first.version, first.outcome) == (True, True, 1, "promoted"), first.reason
    assert first.production_version == 1 and first.previous_production is None
    assert "first model (absolute thresholds)" in first.reason and "production unset -> v0001" in first.reason
    record = json.loads(pp.read_text())
    assert record == json.loads(json.dumps(first.record()))
    assert first.summary()["production"] == "none -> v0001"
    assert all(r.startswith("PASS") for r in record["reasons"]) and len(record["reasons"]) == 3

    store = open_store(store_url)
    assert store.production("wbc").sha256 == sha256_file(model_dir / "model.keras") == first.sha256
    card = store.production("wbc").card
    assert card["classes"] == list(CLASSES) and card["input"]["image_size"] == 32
    assert card["code"]["commit"] == "deadbeef" and card["params"] == {"train": {"epochs": 3}}
    assert card["params_fingerprint"] and card["data_version"]["md5"] is None
    assert card["evaluation"]["internal"]["model_sha256"] == first.sha256
    assert card["promotion"]["gate_passed"] and card["promotion"]["test_set"]["n"] == 40
    assert set(card["files"]) == {"model.keras", "labels.json", "metrics.json", "model_card.md"}
    assert all(set(m) == {"sha256", "bytes"} for m in card["files"].values())
    pulled = store.pull("wbc", "production", tmp_path / "pulled")
    md = (pulled / "model_card.md").read_text()
    assert first.sha256 in md and "## Promotion decision" in md and "PASS min_class_recall" in md
    [entry] = store.ledger("wbc")
    assert entry["outcome"] == "promoted" and entry["version"] == 1 and entry["previous_production"] is None
    assert entry["actor"] and entry["gate"]["challenger"]["n"] == 40

    again = run_promote(model_dir, eval_dir, pp, cfg, dataset)
    assert (again.promoted, again.published, again.outcome) == (True, False, "already production")
    assert [v.version for v in store.list_versions("wbc")] == [1] and len(store.ledger("wbc")) == 1
    assert "FAIL" not in again.markdown


def test_worse_retrain_is_stored_rejected_with_reasons_and_production_unchanged(store_url, good, dataset,
                                                                               good_weights, tmp_path):
    cfg = cfg_for(store_url)
    run_promote(*good, tmp_path / "p1.json", cfg, dataset)
    bad = save_model(tmp_path / "bad", good_weights, kill=("basophil", "monocyte"))
    res = run_promote(bad, evaluate(bad, dataset, tmp_path / "bad-eval"), tmp_path / "p2.json", cfg, dataset)
    assert (res.promoted, res.published, res.outcome, res.version) == (False, True, "rejected", 2)
    assert res.production_version == 1 and "production stays v0001" in res.reason
    failed = [r for r in res.reasons if r.startswith("FAIL")]
    assert any("min_class_recall" in r and "basophil 0.000" in r and "monocyte 0.000" in r for r in failed)
    assert any(r.startswith("FAIL min_improvement") for r in failed)
    store = open_store(store_url)
    assert store.production("wbc").version == 1 and store.latest("wbc").version == 2
    assert store.resolve("wbc", 2).card["promotion"]["gate_passed"] is False
    assert [e["outcome"] for e in store.ledger("wbc")] == ["promoted", "rejected"]
    assert "| min_class_recall | FAIL |" in res.markdown

    # the same rejected model again: gated again, not re-published
    again = run_promote(bad, tmp_path / "bad-eval", tmp_path / "p3.json", cfg, dataset)
    assert (again.published, again.version, again.outcome) == (False, 2, "rejected")


def test_clearly_better_challenger_replaces_production(store_url, dataset, good_weights, good, tmp_path):
    lenient = cfg_for(store_url, min_class_recall=0.0, min_balanced_accuracy=0.0)
    weak = save_model(tmp_path / "weak", good_weights, kill=("basophil", "eosinophil"))
    assert run_promote(weak, evaluate(weak, dataset, tmp_path / "weak-eval"), tmp_path / "p.json", lenient,
                       dataset).promoted
    res = run_promote(*good, tmp_path / "p.json", cfg_for(store_url), dataset)
    assert (res.promoted, res.version, res.previous_production, res.production_version) == (True, 2, 1, 2), res.reason
    assert res.gate["mcnemar"]["c"] > res.gate["mcnemar"]["b"] and res.gate["mcnemar"]["p_value"] < 0.05
    assert "production v0001 -> v0002" in res.reason

    from hemaflow.tasks.promote import rollback_production
    back = rollback_production(cfg_for(store_url), reason="lab reported drift")
    assert back["version"] == 1 and open_store(store_url).production("wbc").version == 1
    assert open_store(store_url).ledger("wbc")[-1]["action"] == "rollback"


def test_manual_promote_is_gated_unless_forced_with_a_reason(good, dataset, good_weights, tmp_path):
    from hemaflow.tasks.promote import promote_version

    url = str(tmp_path / "registry")
    run_promote(*good, tmp_path / "p.json", cfg_for(url), dataset)
    bad = save_model(tmp_path / "bad", good_weights, kill=("basophil",))
    run_promote(bad, evaluate(bad, dataset, tmp_path / "bad-eval"), tmp_path / "p.json", cfg_for(url), dataset)
    res = promote_version(cfg_for(url), "v2", dataset)
    assert res["outcome"] == "rejected" and open_store(url).production("wbc").version == 1
    with pytest.raises(StageInputError, match="--force needs --reason"):
        promote_version(cfg_for(url), "v2", dataset, force=True)
    res = promote_version(cfg_for(url), 2, dataset, force=True, force_reason="basophil panel re-annotated")
    assert res["outcome"] == "forced" and open_store(url).production("wbc").version == 2
    entry = open_store(url).ledger("wbc")[-1]
    assert entry["forced"] and entry["force_reason"] == "basophil panel re-annotated"
    assert any(r.startswith("FAIL") for r in entry["reasons"])


def test_two_promote_runs_racing_exactly_one_becomes_production(s3_server, dataset, good_weights, tmp_path,
                                                                monkeypatch):
    """Both gate against the same (absent) production, then write: the alias CAS lets one win,
    the other reports the conflict truthfully."""
    import hemaflow.tasks.promote as promote

    url = f"s3://{s3_server.new_bucket('race')}/models"
    a = save_model(tmp_path / "a", good_weights)
    b = save_model(tmp_path / "b", good_weights, noise=1e-4)   # another sha256, same quality
    evals = {m: evaluate(m, dataset, tmp_path / f"{m.name}-eval") for m in (a, b)}
    barrier, real_gate = threading.Barrier(2), promote.gate

    def gate_then_wait(*args, **kw):
        out = real_gate(*args, **kw)
        barrier.wait(timeout=60)  # both have read production and decided before either writes
        return out

    monkeypatch.setattr(promote, "gate", gate_then_wait)
    results = {}

    def run(m):
        results[m.name] = run_promote(m, evals[m], tmp_path / f"{m.name}.json", cfg_for(url), dataset)

    threads = [threading.Thread(target=run, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    outcomes = sorted(r.outcome for r in results.values())
    assert outcomes == ["conflict", "promoted"], {k: r.reason for k, r in results.items()}
    winner = next(r for r in results.values() if r.outcome == "promoted")
    loser = next(r for r in results.values() if r.outcome == "conflict")
    store = open_store(url)
    assert store.production("wbc").version == winner.version
    assert loser.production_version == winner.version and not loser.promoted
    assert "another promotion won" in loser.reason
    assert json.loads((tmp_path / f"{'a' if loser is results.get('a') else 'b'}.json").read_text())["outcome"] \
        == "conflict"
    assert sorted(e["outcome"] for e in store.ledger("wbc")) == ["conflict", "promoted"]


def test_metrics_of_another_model_are_refused(good, dataset, tmp_path):
    model_dir, eval_dir = good
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    metrics["model_sha256"] = "0" * 64
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(StageInputError, match="model_sha256 0{64} is not the sha256 of .*belong to another model"):
        run_promote(model_dir, eval_dir, tmp_path / "p.json", cfg_for(str(tmp_path / "r")), dataset)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("missing", ["good/model.keras", "good/labels.json", "good-eval/metrics.json"])
def test_missing_input_names_the_file(good, dataset, tmp_path, missing):
    (tmp_path / missing).unlink()
    with pytest.raises(StageInputError, match=rf"{Path(missing).name}: .* not found"):
        run_promote(*good, tmp_path / "p.json", cfg_for(str(tmp_path / "r")), dataset)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("metrics, problem", [
    ({"accuracy": 0.9, "per_class": {}}, "missing key\\(s\\) balanced_accuracy"),
    ({"accuracy": 0.9, "balanced_accuracy": 1.7, "per_class": {}}, "balanced_accuracy must be a number in \\[0, 1\\]"),
    ([0.9], "expected a JSON object"),
])
def test_bad_metrics_are_rejected(good, dataset, tmp_path, metrics, problem):
    model_dir, eval_dir = good
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(StageInputError, match=rf"metrics.json: {problem}"):
        run_promote(model_dir, eval_dir, tmp_path / "p.json", cfg_for(str(tmp_path / "r")), dataset)


def test_empty_model_and_bad_labels_are_rejected(good, dataset, tmp_path):
    model_dir, eval_dir = good
    (model_dir / "labels.json").write_text("{not json")
    with pytest.raises(StageInputError, match=r"labels.json: not valid JSON"):
        run_promote(model_dir, eval_dir, tmp_path / "p.json", cfg_for(str(tmp_path / "r")), dataset)
    (model_dir / "model.keras").write_bytes(b"")
    with pytest.raises(StageInputError, match=r"model.keras: model file is empty"):
        run_promote(model_dir, eval_dir, tmp_path / "p.json", cfg_for(str(tmp_path / "r")), dataset)


def test_upload_dropped_mid_promotion_leaves_production_and_versions_alone(s3_server, monkeypatch, good, dataset,
                                                                           good_weights, tmp_path):
    """A real proxy in front of moto resets every upload of the new model.keras: the promote run
    fails with a clear message, nothing new lists as a version, production stays."""
    from hemaflow.store import StoreError
    from tests.fixtures.faulty_s3 import FaultyProxy

    url = f"s3://{s3_server.new_bucket('midway')}/models"
    assert run_promote(*good, tmp_path / "p1.json", cfg_for(url), dataset).promoted
    proxy = FaultyProxy(s3_server.endpoint_url).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("HEMAFLOW_S3_MAX_ATTEMPTS", "2")
        import hemaflow.store as store_mod
        monkeypatch.setattr(store_mod, "S3_MAX_ATTEMPTS", 2)
        proxy.fail("PUT", "/v0002/model.keras", times=None, action="reset")
        better = save_model(tmp_path / "better", good_weights, noise=1e-4)
        with pytest.raises(StoreError, match=r"v0002/model.keras: connection to the S3 endpoint kept failing"):
            run_promote(better, evaluate(better, dataset, tmp_path / "better-eval"), tmp_path / "p2.json",
                        cfg_for(url, min_class_recall=0.0), dataset)
    finally:
        proxy.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = open_store(url)
    assert [v.version for v in store.list_versions("wbc")] == [1]
    assert store.production("wbc").version == 1 and store.latest("wbc").version == 1
    assert [e["outcome"] for e in store.ledger("wbc")] == ["promoted"]
    assert not (tmp_path / "p2.json").exists()
