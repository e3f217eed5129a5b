"""promote stage: quality gate, idempotent publishing, input errors, real keras round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hemaflow.config import PromoteParams
from hemaflow.errors import StageInputError
from hemaflow.store import open_store, sha256_file
from hemaflow.tasks.promote import promote_model
from tests.fixtures.s3 import s3_server  # noqa: F401  (session fixture)


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"s3://{request.getfixturevalue('s3_server').new_bucket('promote')}/models"


def make_inputs(root: Path, model_bytes: bytes = b"fake-keras-zip", balanced: float = 0.8) -> tuple[Path, Path]:
    model_dir, eval_dir = root / "model", root / "eval"
    model_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.keras").write_bytes(model_bytes)
    (model_dir / "labels.json").write_text(json.dumps(["neutrophil", "lymphocyte"]))
    (eval_dir / "metrics.json").write_text(json.dumps({
        "split": "test", "n": 40, "accuracy": 0.85, "balanced_accuracy": balanced, "macro_f1": 0.8,
        "per_class": {"neutrophil": {"recall": 0.9}, "lymphocyte": {"recall": 0.7}}}))
    return model_dir, eval_dir


def test_below_threshold_is_not_promoted(tmp_path):
    model_dir, eval_dir = make_inputs(tmp_path, balanced=0.4)
    cfg = PromoteParams(store_url=str(tmp_path / "registry"), min_balanced_accuracy=0.6)
    result = promote_model(model_dir, eval_dir, tmp_path / "promotion.json", cfg)

    assert not result.promoted and not result.published and result.version is None
    assert "balanced_accuracy 0.4000" in result.reason and "0.6000" in result.reason
    record = json.loads((tmp_path / "promotion.json").read_text())
    assert record == result.summary()
    assert record["metrics"] == {"split": "test", "n": 40, "accuracy": 0.85,
                                 "balanced_accuracy": 0.4, "macro_f1": 0.8}  # per_class left out
    assert record["sha256"] == sha256_file(model_dir / "model.keras")
    assert not (tmp_path / "registry").exists()  # the store is not touched


def test_promotes_then_is_idempotent(store_url, tmp_path):
    model_dir, eval_dir = make_inputs(tmp_path)
    cfg = PromoteParams(store_url=store_url, model_name="wbc", min_balanced_accuracy=0.6)
    promotion_path = tmp_path / "reports" / "promotion.json"

    first = promote_model(model_dir, eval_dir, promotion_path, cfg,
                          params={"train": {"epochs": 3}}, source_commit="deadbeef")
    assert (first.promoted, first.published, first.version) == (True, True, 1)
    assert first.uri.endswith("/wbc/v0001") and "first version" in first.reason
    record = json.loads(promotion_path.read_text())
    assert record["store_url"] == store_url and record["model_name"] == "wbc"

    card = open_store(store_url).latest("wbc").card
    assert card["source_commit"] == "deadbeef" and card["params"] == {"train": {"epochs": 3}}
    assert card["metrics"]["balanced_accuracy"] == 0.8
    assert set(card["files"]) == {"model.keras", "labels.json", "metrics.json"}

    again = promote_model(model_dir, eval_dir, promotion_path, cfg)
    assert (again.promoted, again.published, again.version) == (True, False, 1)
    assert "already the latest version v0001" in again.reason
    assert json.loads(promotion_path.read_text())["published"] is False
    assert [v.version for v in open_store(store_url).list_versions("wbc")] == [1]

    (model_dir / "model.keras").write_bytes(b"retrained")
    third = promote_model(model_dir, eval_dir, promotion_path, cfg)
    assert (third.published, third.version) == (True, 2) and "previous latest v0001" in third.reason


def test_card_defaults_to_promote_params(tmp_path):
    model_dir, eval_dir = make_inputs(tmp_path)
    cfg = PromoteParams(store_url=str(tmp_path / "registry"))
    promote_model(model_dir, eval_dir, tmp_path / "p.json", cfg)
    card = open_store(cfg.store_url).latest(cfg.model_name).card
    assert card["params"] == {"promote": cfg.model_dump(mode="json")}
    assert "source_commit" in card  # a hash inside a git checkout with commits, else None


@pytest.mark.parametrize("missing", ["model/model.keras", "model/labels.json", "eval/metrics.json"])
def test_missing_input_names_the_file(tmp_path, missing):
    model_dir, eval_dir = make_inputs(tmp_path)
    (tmp_path / missing).unlink()
    cfg = PromoteParams(store_url=str(tmp_path / "registry"))
    with pytest.raises(StageInputError, match=rf"{Path(missing).name}: .* not found"):
        promote_model(model_dir, eval_dir, tmp_path / "p.json", cfg)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("metrics, problem", [
    ({"accuracy": 0.9, "per_class": {}}, "missing key\\(s\\) balanced_accuracy"),
    ({"accuracy": 0.9, "balanced_accuracy": 1.7, "per_class": {}}, "balanced_accuracy must be a number in \\[0, 1\\]"),
    ([0.9], "expected a JSON object"),
])
def test_bad_metrics_are_rejected(tmp_path, metrics, problem):
    model_dir, eval_dir = make_inputs(tmp_path)
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(StageInputError, match=rf"metrics.json: {problem}"):
        promote_model(model_dir, eval_dir, tmp_path / "p.json", PromoteParams(store_url=str(tmp_path / "r")))


def test_empty_model_and_bad_labels_are_rejected(tmp_path):
    model_dir, eval_dir = make_inputs(tmp_path)
    cfg = PromoteParams(store_url=str(tmp_path / "r"))
    (model_dir / "labels.json").write_text("{not json")
    with pytest.raises(StageInputError, match=r"labels.json: not valid JSON"):
        promote_model(model_dir, eval_dir, tmp_path / "p.json", cfg)
    (model_dir / "model.keras").write_bytes(b"")
    with pytest.raises(StageInputError, match=r"model.keras: model file is empty"):
        promote_model(model_dir, eval_dir, tmp_path / "p.json", cfg)


def test_real_keras_model_survives_s3_round_trip(s3_server, tmp_path):
    keras = pytest.importorskip("keras")
    import numpy as np

    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(3, activation="softmax")])
    model_dir, eval_dir = make_inputs(tmp_path)
    model.save(model_dir / "model.keras")
    url = f"s3://{s3_server.new_bucket('keras')}/registry"
    result = promote_model(model_dir, eval_dir, tmp_path / "p.json", PromoteParams(store_url=url))
    assert result.published and result.uri == f"{url}/wbc-classifier/v0001"

    pulled = open_store(url).pull("wbc-classifier", "latest", tmp_path / "pulled")
    restored = keras.models.load_model(pulled / "model.keras")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
