"""End to end through the real train -> evaluate -> promote stages (run_stage, as the CLI,
`dvc repro` and the flow call them) on a small synthetic dataset: a good model is promoted;
a retrain made worse on purpose (one epoch at an absurd learning rate) is stored, rejected
with its reasons, and production is unchanged; re-running promote on the good model is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hemaflow.config import EvaluateParams, Params, PromoteParams, TrainParams
from hemaflow.store import open_store
from hemaflow.tasks.stages import run_stage
from tests.code.synthetic_wbc import write_dataset

pytestmark = pytest.mark.slow  # ~45 s on 2 cores: one real training plus a one-epoch one


def test_good_model_promoted_then_sabotaged_retrain_rejected(tmp_path):
    root = tmp_path / "project"
    write_dataset(root / "data" / "augmented", {"train": 16, "val": 4, "test": 8}, seed=5, size=32)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "feedface" * 4 + ".dir", "path": "data/raw"}]}))
    good = Params(train=TrainParams(image_size=32, epochs=8, batch_size=8, learning_rate=0.003, patience=4),
                  evaluate=EvaluateParams(gallery_size=0), promote=PromoteParams(store_url="registry"))

    for stage in ("train", "evaluate"):
        run_stage(stage, good, root)
    first = run_stage("promote", good, root)
    assert (first.outcome, first.version, first.production_version) == ("promoted", 1, 1), first.reason
    store = open_store(str(root / "registry"))
    card = store.production("wbc-classifier").card
    assert card["data_version"] == {"path": "data/raw", "md5": "feedface" * 4 + ".dir", "source": "data.dvc"}
    assert card["params"]["train"]["learning_rate"] == 0.003 and card["evaluation"]["internal"]["n"] == 40

    again = run_stage("promote", good, root)
    assert again.outcome == "already production" and not again.published

    sabotaged = good.model_copy(update={"train": good.train.model_copy(update={"epochs": 1, "learning_rate": 5.0})})
    for stage in ("train", "evaluate"):
        run_stage(stage, sabotaged, root)
    worse = run_stage("promote", sabotaged, root)
    assert (worse.outcome, worse.promoted, worse.version) == ("rejected", False, 2), worse.reason
    assert worse.production_version == 1 and "production stays v0001" in worse.reason
    failed = [r for r in worse.reasons if r.startswith("FAIL")]
    # the champion's figure is this host's (1.0 on most hosts; 0.975, one image of 40 wrong, on an AVX-512 EPYC)
    record = json.loads((root / "reports" / "promotion.json").read_text())
    champion_bal = record["gate"]["champion"]["balanced_accuracy"]
    assert champion_bal >= 0.9
    assert any(r.startswith(f"FAIL min_improvement: balanced accuracy {champion_bal:.4f} ->") for r in failed), worse.reasons
    assert any(r.startswith("FAIL mcnemar") and r.endswith("(the challenger is significantly worse)") for r in failed)
    assert any(r.startswith("FAIL min_class_recall") for r in failed)
    assert store.production("wbc-classifier").version == 1 and store.latest("wbc-classifier").version == 2

    assert record["outcome"] == "rejected" and record["reasons"] == worse.reasons
    assert "| min_improvement | FAIL |" in worse.markdown          # the Prefect markdown artifact's body
    rejected_card = store.resolve("wbc-classifier", 2).card
    assert rejected_card["promotion"]["gate_passed"] is False
    assert rejected_card["promotion"]["champion"]["version"] == 1
    assert [e["outcome"] for e in store.ledger("wbc-classifier")] == ["promoted", "rejected"]
