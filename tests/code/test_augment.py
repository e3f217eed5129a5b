import cv2
import numpy as np
import pandas as pd
import pytest

from hemaflow.batches import run_serial
from hemaflow.config import AugmentParams
from hemaflow.contact_sheet import fit_tile
from hemaflow.errors import StageInputError
from hemaflow.schema import CROP_COLUMNS
from hemaflow.tasks.augment import augment_dataset, augment_image, plan_augmentation

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
        assert src.loc[r.crop_id, "source_id"] == r.source_id
        assert (tmp_path / "aug" / r.path).is_file()
    held_out = set(src[src["split"] != "train"]["source_id"])
    assert not held_out & set(aug["source_id"])                # no val/test source leaks into training


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


def test_batching_does_not_change_outputs(split_table, tmp_path):
    split_path, crops = split_table
    seen = []

    def recording_runner(fn, batches, progress=None):
        seen.append([len(b) for b in batches])
        return run_serial(fn, batches, progress)

    one = augment_dataset(split_path, crops, tmp_path / "one", CFG, seed=5, batch_size=1000)
    small = augment_dataset(split_path, crops, tmp_path / "small", CFG, seed=5, batch_size=4,
                            run_batches=recording_runner)
    assert seen == [[4, 2]]  # 6 jobs in batches of 4
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "small") for p in (tmp_path / "small").rglob("*.png"))
    for f in files:  # images and the contact sheet, byte for byte
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "small" / f).read_bytes(), f
    pd.testing.assert_frame_equal(pd.read_parquet(one.dataset_path), pd.read_parquet(small.dataset_path))


def test_contact_sheet_shows_a_source_then_its_variants(split_table, tmp_path):
    split_path, crops = split_table
    res = augment_dataset(split_path, crops, tmp_path / "aug", CFG, seed=1)
    sheet = cv2.imread(str(res.contact_sheet_path))
    assert res.contact_sheet_path == tmp_path / "aug" / "contact_sheet.png"
    # basophil sorts first; its crops each got 2 variants; ties go to the lower id: img04_c0
    tile, top, pad = 140, 26 + 4, 4
    cells = [sheet[top:top + tile, pad + c * (tile + pad):pad + c * (tile + pad) + tile] for c in range(3)]
    names = ["img04_c0.png", "img04_c0_aug000.png", "img04_c0_aug001.png"]
    for cell, name in zip(cells, names):
        assert np.array_equal(cell, fit_tile(cv2.imread(str(tmp_path / "aug" / "images" / name)), tile)), name
    # 2 classes x 2 train crops each = 4 rows of (source + 5 variant slots)
    assert sheet.shape[:2] == (top + 4 * (tile + 18 + pad), pad + 6 * (tile + pad))


def test_work_batches_size_by_work_and_spread_over_workers():
    from hemaflow.batches import work_batches

    items = list(range(100))
    assert len(work_batches(items, [1.0] * 100, 0.01, task_seconds=4.0, n_parallel=2)) == 1, "1 s of work: one batch"
    heavy = work_batches(items, [1.0] * 100, 0.1, task_seconds=4.0, n_parallel=2)   # 10 s -> 3 -> 4 batches
    assert len(heavy) == 4 and [x for b in heavy for x in b] == items
    skewed = work_batches(items, [10.0] * 10 + [1.0] * 90, 0.1, task_seconds=4.0, n_parallel=2)
    assert len(skewed[0]) < len(skewed[-1]), "costly items make smaller batches"
