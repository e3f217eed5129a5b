"""benchmarks/train_gpu.py: the packed crops round-trip, its numpy augmentation and TTA views
match the pipeline's, and `measure` trains and scores a tiny pack end to end (TensorFlow here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_gpu")


def test_jpeg_pack_round_trip(bench):
    yy, xx = np.mgrid[0:32, 0:32]
    cell = np.exp(-((yy - 16) ** 2 + (xx - 14) ** 2) / 80.0)  # a smooth blob, as a stained cell is
    smooth = np.stack([np.stack([220 - 120 * cell * (i + 1) / 5, 200 - 150 * cell, 230 - 60 * cell], -1)
                       for i in range(5)]).astype(np.uint8)
    back = bench.decode_jpeg(bench.encode_jpeg(smooth))
    assert back.shape == smooth.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - smooth).mean() < 4  # JPEG q98: a few grey levels, not a different image


def test_dihedral_views_match_the_pipelines_tta(bench):
    from hemaflow.tta import dihedral

    x = np.random.default_rng(1).random((2, 6, 6, 3)).astype(np.float32)
    for k in range(8):
        np.testing.assert_array_equal(bench.dihedral_np(x, k), np.asarray(dihedral(x, k)))


def test_augment_epoch_gives_a_dihedral_view_of_each_image(bench):
    x = np.random.default_rng(2).random((64, 5, 5, 3)).astype(np.float32)
    out = bench.augment_epoch(x, np.random.default_rng(3))
    views = set()
    for a, b in zip(x, out):
        matches = [k for k in range(8) if np.array_equal(bench.dihedral_np(a[None], k)[0], b)]
        assert matches, "an augmented image is not a flip/rotation of its source"
        views.add(matches[0])
    assert len(views) >= 6  # all eight views are drawn, not one fixed transform
    assert not np.array_equal(out, x)


def test_measure_trains_and_scores_a_tiny_pack(bench, tmp_path, capsys):
    """Two well-separated colours, one with two subtypes: the subtype probabilities fold back
    into the class, the speed rows and the recipe run come out, the JSON line closes the output."""
    rng = np.random.default_rng(4)
    n = 48
    cls = np.array([0, 3] * (n // 2), dtype=np.int8)  # basophil, ig
    x = np.where(cls[:, None, None, None] == 0, [200, 40, 40], [40, 40, 200]).astype(np.float32)
    x = np.clip(x + rng.normal(0, 10, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    fine = np.array(["basophil" if c == 0 else ("ig:MMY" if i % 4 == 1 else "ig:MY") for i, c in enumerate(cls)])
    split = np.array((["train"] * 3 + ["test", "external"]) * (n // 5) + ["train"] * (n % 5))
    names = np.array([f"c/{i}.png" for i in range(n)])
    pack = tmp_path / "tiny.npz"
    np.savez(pack, jpeg=bench.encode_jpeg(x), size=16, split=split, cls=cls, fine=fine, name=names)

    figures = bench.main(["measure", "--data", str(pack), "--backend", "tensorflow", "--precision", "float32",
                          "--epochs", "2", "--batch-size", "8", "--set", "width=8", "--set", "depth=1",
                          "--set", "learning_rate=0.01", "--train-epochs", "6", "--train-precision", "float32"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(figures))
    assert "images/s" in out and "recipe trained 6 of 6 epochs" in out
    assert figures["speed"][0]["images_per_s"] > 0 and figures["speed"][0]["batch_size"] == 8
    trained = figures["trained"]
    assert trained["subtypes"] == 3  # basophil, ig:MMY, ig:MY
    assert trained["test"]["n"] == (split == "test").sum() and trained["external"]["n"] == (split == "external").sum()
    assert trained["test"]["accuracy"] >= 0.9 and trained["external"]["accuracy"] >= 0.9


def test_pack_reads_the_pipelines_crops_and_the_scored_external_folder(bench, tmp_path):
    """pack: the non-augmented rows of dataset.parquet with their splits and subtypes, then the
    external crops evaluate scored; pixels in RGB order, names kept for the error lists."""
    import cv2
    import pandas as pd

    work = tmp_path / "work"
    rows = []
    for i, (label, prefix, split) in enumerate([("ig", "MMY", "train"), ("ig", "MY", "test"),
                                                ("neutrophil", "BNE", "train"), ("ig", "MMY", "train")]):
        rel = f"images/{label}/{prefix}_{i}_c0.png"
        img = np.zeros((20, 20, 3), np.uint8)
        img[..., 2] = 200  # red in OpenCV's BGR
        (work / "augmented" / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(work / "augmented" / rel), img)
        rows.append({"path": rel, "label": label, "split": split, "source_id": f"{label}/{prefix}_{i}",
                     "augmented": False})
    rows.append({**rows[0], "path": "images/ig/aug.png", "augmented": True})  # never packed
    pd.DataFrame(rows).to_parquet(work / "augmented" / "dataset.parquet")
    ext = work / "eval" / "m" / "external"
    (ext / "crops" / "images" / "basophil").mkdir(parents=True)
    cv2.imwrite(str(ext / "crops" / "images" / "basophil" / "BA_9_c0.png"), np.full((20, 20, 3), 90, np.uint8))
    pd.DataFrame({"path": ["images/basophil/BA_9_c0.png"], "label": ["basophil"]}).to_csv(ext / "predictions.csv")

    out = tmp_path / "pack.npz"
    bench.pack(work, out, size=16, model_tag="m")
    x, split, cls, fine, names = bench.load(out)
    assert x.shape == (5, 16, 16, 3) and list(split) == ["train", "test", "train", "train", "external"]
    assert x[0, ..., 0].mean() > 150 and x[0, ..., 2].mean() < 40  # RGB, as the training job reads it
    assert [bench.CLASSES[c] for c in cls] == ["ig", "ig", "neutrophil", "ig", "basophil"]
    # MMY has 2 train images and MY none: below MIN_SUBTYPE_IMAGES (10) every row stays its class
    assert list(fine) == ["ig", "ig", "neutrophil", "ig", "basophil"]
    assert names[-1] == "basophil/BA_9_c0.png"
    with pytest.raises(SystemExit, match="predictions.csv"):
        bench.pack(work, out, size=16, model_tag="other")
