import cv2
import numpy as np
import pandas as pd
import pytest

from hemaflow.config import AugmentParams
from hemaflow.errors import StageInputError
from hemaflow.schema import CROP_COLUMNS
from tasks.augment import augment_dataset, augment_image, plan_augmentation

CFG = AugmentParams(target_per_class=6)


@pytest.fixture
def split_table(tmp_path):
    crops = tmp_path / "crops"
    (crops / "images").mkdir(parents=True)
    rows = []
    plan = [("neutrophil", "train", 4), ("basophil", "train", 2), ("neutrophil", "test", 1), ("basophil", "val", 1)]
    n = 0
    for label, split, count in plan:
        for _ in range(count):
            img = np.full((32, 32, 3), 255, np.uint8)
            cv2.circle(img, (16, 16), 8 + n % 4, (120, 40, 90), -1)
            cid = f"img{n:02d}_c0"
            cv2.imwrite(str(crops / "images" / f"{cid}.png"), img)
            rows.append({"crop_id": cid, "path": f"images/{cid}.png", "source_id": f"img{n:02d}",
                         "source_sha256": f"sha{n}", "source_path": f"fields/img{n:02d}.jpg", "label": label,
                         "x0": 0, "y0": 0, "x1": 32, "y1": 32, "mask_area": 100, "split": split})
            n += 1
    p = tmp_path / "split.parquet"
    pd.DataFrame(rows, columns=[*CROP_COLUMNS, "split"]).to_parquet(p)
    return p, crops


def test_balances_train_and_keeps_provenance(split_table, tmp_path):
    split_path, crops = split_table
    res = augment_dataset(split_path, crops, tmp_path / "aug", CFG, seed=1)
    ds = pd.read_parquet(res.dataset_path)
    train = ds[ds["split"] == "train"]
    assert train["label"].value_counts().to_dict() == {"neutrophil": 6, "basophil": 6}
    assert not ds[ds["split"] != "train"]["augmented"].any()   # val/test are never augmented
    aug = ds[ds["augmented"]]
    assert len(aug) == 2 + 4
    src = pd.read_parquet(split_path).set_index("crop_id")
    for r in aug.itertuples():
        assert src.loc[r.crop_id, "split"] == "train"          # every derivative comes from a train crop
        assert src.loc[r.crop_id, "source_sha256"] == r.source_sha256
        assert (tmp_path / "aug" / r.path).is_file()


def test_deterministic_by_seed(split_table, tmp_path):
    split_path, crops = split_table
    a = augment_dataset(split_path, crops, tmp_path / "a", CFG, seed=3)
    b = augment_dataset(split_path, crops, tmp_path / "b", CFG, seed=3)
    c = augment_dataset(split_path, crops, tmp_path / "c", CFG, seed=4)
    da, db = pd.read_parquet(a.dataset_path), pd.read_parquet(b.dataset_path)
    pa = [(tmp_path / "a" / p).read_bytes() for p in da["path"]]
    assert pa == [(tmp_path / "b" / p).read_bytes() for p in db["path"]]
    dc = pd.read_parquet(c.dataset_path)
    assert pa != [(tmp_path / "c" / p).read_bytes() for p in dc["path"]]


def test_transform_changes_pixels_within_bounds():
    img = np.zeros((40, 40, 3), np.uint8)
    cv2.rectangle(img, (5, 5), (20, 30), (200, 100, 50), -1)
    out = augment_image(img, np.random.default_rng(0), AugmentParams())
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    plain = AugmentParams(rotation_deg=0, shift_frac=0, zoom_frac=0, flip=False, hue_jitter=0,
                          saturation_jitter=0, brightness_jitter=0)
    assert np.array_equal(augment_image(img, np.random.default_rng(0), plain), img)


def test_plan_never_downsamples():
    df = pd.DataFrame({"label": ["a"] * 5 + ["b"], "crop_id": [f"x{i}" for i in range(6)]})
    jobs = plan_augmentation(df, 3)
    assert jobs == [("x5", 0), ("x5", 1)]


def test_missing_inputs_name_the_file(split_table, tmp_path):
    split_path, crops = split_table
    with pytest.raises(StageInputError, match="nope.parquet"):
        augment_dataset(tmp_path / "nope.parquet", crops, tmp_path / "aug", CFG, seed=0)
    (crops / "images" / "img00_c0.png").unlink()
    with pytest.raises(StageInputError, match=r"img00_c0\.png: crop listed in split\.parquet is missing"):
        augment_dataset(split_path, crops, tmp_path / "aug", CFG, seed=0)
