"""The one model-folder loader shared by evaluate, promote and classify."""

from __future__ import annotations

import json

import keras
import pytest

from hemaflow.errors import StageInputError
from hemaflow.model_folder import open_model_folder, sha256_file


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    model.save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    return d


def _card(d, **files):
    (d / "card.json").write_text(json.dumps({"files": files}))


def test_opens_checks_and_loads(model_dir):
    _card(model_dir, **{"model.keras": {"sha256": sha256_file(model_dir / "model.keras")},
                        "labels.json": {"sha256": sha256_file(model_dir / "labels.json")}})
    folder = open_model_folder(model_dir)
    assert folder.classes == ("a", "b", "c") and folder.image_size == 8
    assert folder.sha256 == sha256_file(model_dir / "model.keras")


def test_tampered_file_is_refused_before_loading(model_dir):
    _card(model_dir, **{"model.keras": {"sha256": sha256_file(model_dir / "model.keras")}})
    with open(model_dir / "model.keras", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(StageInputError, match=r"model.keras: sha256 mismatch.*refusing to load"):
        open_model_folder(model_dir)


def test_card_naming_a_file_outside_is_refused(model_dir):
    _card(model_dir, **{"../x": {"sha256": "0" * 64}})
    with pytest.raises(StageInputError, match="outside the model folder"):
        open_model_folder(model_dir)


def test_class_count_must_match_the_model(model_dir):
    (model_dir / "labels.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(StageInputError, match="lists 2 classes but the model outputs 3"):
        open_model_folder(model_dir).load()


def test_empty_model_file_names_it(model_dir):
    (model_dir / "model.keras").write_bytes(b"")
    with pytest.raises(StageInputError, match="model.keras: model file is empty"):
        open_model_folder(model_dir)


@pytest.fixture()
def bf16_model_dir(tmp_path):
    """A resnet_small built under mixed_bfloat16 (as train.precision: auto makes it on an AMX
    CPU or a recent GPU), saved the way train saves it."""
    from hemaflow.models import build_resnet_small

    d = tmp_path / "bf16"
    d.mkdir()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_resnet_small((16, 16, 3), 3, width=4, depth=1)
    finally:
        keras.config.set_dtype_policy(previous)
    model.save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    return d


@pytest.mark.parametrize("host", ["float32", "mixed_float16"])
def test_bf16_model_runs_in_float32_where_the_host_would_not_pick_bf16(bf16_model_dir, monkeypatch, host):
    import numpy as np

    from hemaflow import devices
    from hemaflow.models import mixed_policy

    monkeypatch.setattr(devices, "resolve_precision", lambda precision, strategy=None: host)
    saved = keras.models.load_model(bf16_model_dir / "model.keras", compile=False)
    assert mixed_policy(saved) == "mixed_bfloat16"
    folder = open_model_folder(bf16_model_dir)
    model = folder.load()
    assert folder.precision == "float32" and mixed_policy(model) is None
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
    for a, b in zip(saved.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)           # same variables, bit for bit
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), saved.predict(x, verbose=0), atol=0.03)


def test_bf16_model_keeps_bf16_where_the_host_has_it(bf16_model_dir, monkeypatch):
    from hemaflow import devices
    from hemaflow.models import mixed_policy

    monkeypatch.setattr(devices, "resolve_precision", lambda precision, strategy=None: "mixed_bfloat16")
    folder = open_model_folder(bf16_model_dir)
    assert mixed_policy(folder.load()) == "mixed_bfloat16" and folder.precision == "mixed_bfloat16"


def test_float32_model_reports_float32(model_dir):
    folder = open_model_folder(model_dir)
    folder.load()
    assert folder.precision == "float32"
