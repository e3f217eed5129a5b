"""Resume: a training job killed mid-run continues from its last checkpoint when run again
with the same inputs; a checkpoint of another job (other params) is never used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hemaflow.config import TrainParams
from hemaflow.tasks.train import read_epoch_log, resume_dir, train_model
from tests.code.synthetic_wbc import CLASSES, write_dataset

BIN = Path(sys.executable).parent
TRAIN = {"architecture": "small_cnn", "image_size": 32, "epochs": 40, "batch_size": 8, "learning_rate": 0.003,
         "patience": 100}


def _project(root: Path, train: dict, **paths: str) -> Path:
    write_dataset(root / "data" / "augmented", per_split={"train": 12, "val": 4, "test": 2})
    params = {"base": {"classes": list(CLASSES)},
              "paths": {"augmented_dir": "data/augmented", "model_dir": "models/candidate", **paths}, "train": train}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def _train_cmd(params: Path) -> list[str]:
    return [str(BIN / "hemaflow"), "train", "--params", str(params)]


ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _kill_after_epochs(params: Path, log: Path, epochs: int) -> None:
    """Run `hemaflow train` in a subprocess and SIGKILL it once `epochs` epochs are logged:
    no clean-up, like a node lost mid-run."""
    proc = subprocess.Popen(_train_cmd(params), cwd=params.parent, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(read_epoch_log(log)) < epochs:
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"fewer than {epochs} epochs logged within 300 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    params = _project(tmp_path, TRAIN)
    model_dir = tmp_path / "models" / "candidate"
    log = resume_dir(model_dir) / "epochs.jsonl"
    _kill_after_epochs(params, log, 4)
    done_at_kill = len(read_epoch_log(log))
    assert done_at_kill < TRAIN["epochs"] and not (model_dir / "model.keras").exists()

    rerun = subprocess.run(_train_cmd(params), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((model_dir / "train_summary.json").read_text())
    history = json.loads((model_dir / "history.json").read_text())
    assert summary["resumed_from_epoch"] >= done_at_kill - 1 >= 3   # the epoch cut by the kill may be redone
    assert summary["epochs_run"] == TRAIN["epochs"] == len(history["loss"])  # every epoch once, none lost
    assert summary["best_epoch"] > summary["resumed_from_epoch"]
    first_after = summary["resumed_from_epoch"]  # 0-based index of the first epoch of the second run
    assert history["loss"][first_after] < history["loss"][0]  # weights and optimizer came back, not a fresh start
    assert not resume_dir(model_dir).exists()                       # complete: nothing left to resume


def test_checkpoint_of_other_params_is_discarded(tmp_path):
    """A leftover checkpoint from a job with other params must not leak into this one."""
    params = _project(tmp_path, {**TRAIN, "epochs": 2})
    model_dir = tmp_path / "models" / "candidate"
    stale = resume_dir(model_dir)
    (stale / "checkpoint").mkdir(parents=True)
    (stale / "fingerprint.txt").write_text("another job\n")
    (stale / "checkpoint" / "latest.weights.h5").write_bytes(b"not weights")
    (stale / "checkpoint" / "training_metadata.json").write_text(json.dumps({"epoch": 1, "batch": 0}))
    (stale / "epochs.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 1.0, "loss": 9.0}) + "\n")
    cfg = TrainParams(**{**TRAIN, "epochs": 2})
    result = train_model(tmp_path / "data" / "augmented", model_dir, cfg, CLASSES, seed=1)
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["resumed_from_epoch"] == 0 and result.epochs_run == 2 and not stale.exists()
    assert params.is_file()


@pytest.mark.slow
def test_job_killed_while_fine_tuning_keeps_its_first_phase(tmp_path):
    """Two-phase job (frozen backbone from a local weights file, then fine-tuning): a kill in
    the second phase keeps the finished first phase and continues the second."""
    import keras

    keras.utils.set_random_seed(5)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    base.save_weights(tmp_path / "mobilenet_v2_notop.weights.h5")
    train = {**TRAIN, "architecture": "mobilenet_v2", "epochs": 3, "fine_tune_epochs": 30,
             "fine_tune_learning_rate": 1e-3}
    params = _project(tmp_path, train, backbone_weights="mobilenet_v2_notop.weights.h5")
    model_dir = tmp_path / "models" / "candidate"
    log = resume_dir(model_dir) / "epochs.jsonl"
    _kill_after_epochs(params, log, 6)  # three epochs into fine-tuning
    before = read_epoch_log(log)
    assert len(before) < 33 and not (model_dir / "model.keras").exists()

    rerun = subprocess.run(_train_cmd(params), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((model_dir / "train_summary.json").read_text())
    history = json.loads((model_dir / "history.json").read_text())
    assert summary["fine_tune_from_epoch"] == 3
    assert summary["resumed_from_epoch"] >= len(before) - 1 >= 5  # resumed inside the second phase
    assert summary["epochs_run"] == 33 == len(history["loss"])
    assert history["epoch_seconds"][:3] == [r["seconds"] for r in before[:3]]  # first phase not redone
    assert summary["best_epoch"] > summary["resumed_from_epoch"]
    assert not resume_dir(model_dir).exists()


def test_repair_checkpoint_replaces_torn_metadata_with_the_previous_pair(tmp_path):
    from hemaflow.tasks.train import repair_checkpoint

    ckpt = tmp_path / "checkpoint"
    assert repair_checkpoint(ckpt) == "ok"  # no checkpoint yet
    ckpt.mkdir()
    (ckpt / "latest.weights.h5").write_bytes(b"epoch 5")
    (ckpt / "training_metadata.json").write_text(json.dumps({"epoch": 5, "batch": 0}))
    assert repair_checkpoint(ckpt) == "ok"
    (ckpt / "latest.weights.h5.bkp").write_bytes(b"epoch 4")
    (ckpt / "training_metadata.json.bkp").write_text(json.dumps({"epoch": 4, "batch": 0}))
    (ckpt / "training_metadata.json").write_text("")  # truncated by the kill, never written
    assert repair_checkpoint(ckpt) == "previous"
    assert (ckpt / "latest.weights.h5").read_bytes() == b"epoch 4"
    assert json.loads((ckpt / "training_metadata.json").read_text())["epoch"] == 4
    (ckpt / "training_metadata.json").write_text('{"epo')
    (ckpt / "training_metadata.json.bkp").write_text("")
    assert repair_checkpoint(ckpt) == "discarded"  # nothing readable: start over
    assert not any(ckpt.iterdir())


def test_torn_checkpoint_metadata_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    """A kill between BackupAndRestore truncating training_metadata.json and writing it left an
    empty file on which the next run died with a JSONDecodeError (a fresh-clone `make test`,
    2026-12-04). Here a crash after epoch 4's checkpoint, then the torn file, then the rerun."""
    import hemaflow.tasks.train as train_mod

    _project(tmp_path, TRAIN)
    cfg = TrainParams(**{**TRAIN, "epochs": 8})
    model_dir = tmp_path / "models" / "candidate"
    real_timer = train_mod._epoch_timer

    def crashing_timer():
        timer = real_timer()
        end = timer.on_epoch_end

        def on_epoch_end(epoch, logs=None):
            end(epoch, logs)
            if epoch == 3:  # after the checkpoint callback saved epoch 4
                raise RuntimeError("node lost")

        timer.on_epoch_end = on_epoch_end
        return timer

    monkeypatch.setattr(train_mod, "_epoch_timer", crashing_timer)
    with pytest.raises(RuntimeError, match="node lost"):
        train_model(tmp_path / "data" / "augmented", model_dir, cfg, CLASSES, seed=1)
    ckpt = resume_dir(model_dir) / "checkpoint"
    assert json.loads((ckpt / "training_metadata.json").read_text())["epoch"] == 4
    assert json.loads((ckpt / "training_metadata.json.bkp").read_text())["epoch"] == 3
    (ckpt / "training_metadata.json").write_text("")

    monkeypatch.setattr(train_mod, "_epoch_timer", real_timer)
    result = train_model(tmp_path / "data" / "augmented", model_dir, cfg, CLASSES, seed=1)
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["resumed_from_epoch"] == 3 and result.epochs_run == 8  # epoch 4 redone, none lost
    assert len(json.loads((model_dir / "history.json").read_text())["loss"]) == 8
