"""SAM (hemaflow/sharpness.py): the step it takes, and training through train_model on one and two devices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from hemaflow.config import TrainParams
from hemaflow.sharpness import SharpnessAware
from hemaflow.tasks.train import load_image, train_model
from tests.code.synthetic_wbc import CLASSES, write_dataset

ROOT = Path(__file__).resolve().parents[2]


def _mse_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 2 * x.T @ (x @ w - y) / len(x)


def test_one_step_is_the_gradient_at_the_perturbed_weights_applied_at_the_weights():
    x = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
    y = np.array([[1.0], [0.0]], np.float32)
    w0 = np.array([[0.5], [-0.3]], np.float32)
    rho, lr = 0.05, 0.1
    net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    net.layers[0].kernel.assign(w0)
    model = SharpnessAware(net, rho)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    logs = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history

    g = _mse_grad(w0, x, y)
    worst = w0 + rho * g / np.linalg.norm(g)
    expected = w0 - lr * _mse_grad(worst, x, y)
    assert np.allclose(net.layers[0].kernel.numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, w0 - lr * g, atol=1e-4)  # SAM's step is not plain SGD's
    assert logs["loss"][0] == pytest.approx(float(np.mean((x @ w0 - y) ** 2)), rel=1e-5)  # the loss at w


def test_radius_must_be_positive():
    with pytest.raises(ValueError, match="rho > 0"):
        SharpnessAware(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), 0.0)


def test_train_model_with_sam_learns_and_saves_the_plain_network(tmp_path):
    write_dataset(tmp_path / "data")
    cfg = TrainParams(image_size=32, epochs=8, batch_size=8, learning_rate=0.003, patience=8, sam_rho=0.05,
                      architecture="resnet_small", width=8)
    result = train_model(tmp_path / "data", tmp_path / "model", cfg, CLASSES, seed=7)
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["params"]["sam_rho"] == 0.05 and result.epochs_run == 8
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    assert model.name == "resnet_small"  # the network, not the wrapper
    import pandas as pd

    test = pd.read_parquet(tmp_path / "data" / "dataset.parquet").query("split == 'test'")
    x = np.stack([load_image(str(tmp_path / "data" / p), cfg.image_size).numpy() for p in test["path"]])
    accuracy = float(np.mean(model.predict(x, verbose=0).argmax(1) == [CLASSES.index(c) for c in test["label"]]))
    assert accuracy >= 0.7  # chance is 0.2


SAM_ON_TWO_CPUS = """
import json, sys
from pathlib import Path
from hemaflow.config import TrainParams
from hemaflow.tasks.train import train_model
from tests.code.synthetic_wbc import CLASSES, write_dataset
root = Path(sys.argv[1])
write_dataset(root / "data", {"train": 3, "val": 1})
cfg = TrainParams(image_size=32, epochs=2, batch_size=6, devices="cpu:2", sam_rho=0.05)
result = train_model(root / "data", root / "model", cfg, CLASSES, seed=1)
history = json.loads((root / "model" / "history.json").read_text())
print(json.dumps({"epochs_run": result.epochs_run, "loss": history["loss"], **result.strategy}))
"""


def test_sam_under_a_mirrored_strategy_over_two_logical_cpus(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SAM_ON_TWO_CPUS, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["replicas"] == 2 and info["epochs_run"] == 2 and all(np.isfinite(info["loss"]))
