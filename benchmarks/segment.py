"""White-cell segmentation on real data: BCCD box accuracy, throughput vs decoding, Dask speed-up.

Why: the segment stage must find the annotated white cells (targets on all of BCCD: recall
>= 0.98, precision >= 0.97, mean IoU >= 0.85 at IoU >= 0.5) and cost at most about four
times a bare cv2.imread of the same files (target: segmentation >= 25% of decode-only
images/s), and batches on Dask should scale with workers.

- Accuracy: every BCCD field; `detector` = every detection, `crops` = detections the stage
  crops (not cut by the border), each on all fields and on ImageSets/Main/test.txt (the box
  padding was fitted on train.txt).
- Throughput, per dataset: decode-only (cv2.imread) and segmentation (imread +
  find_white_cells + crop_cell, no PNG writing) timed on alternating chunks of 25 files
  (so both see the same load on a shared machine), after one pass that brings the files
  into the page cache; ratio = segmentation images/s / decode-only images/s.
- Dask: the same segmentation over batches with client.map on a LocalCluster of 1, then 2
  worker processes (1 thread each; cluster start-up and worker warm-up not timed).

    .venv/bin/python benchmarks/segment.py [--data ../shared/data] [--pbc-limit 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hemaflow.config import SegmentParams  # noqa: E402
from hemaflow.voc import read_voc_boxes  # noqa: E402
from hemaflow.tasks.segment import crop_cell, find_white_cells  # noqa: E402
from hemaflow.tasks.segment_eval import score_boxes  # noqa: E402

TARGETS = {"recall": 0.98, "precision": 0.97, "mean_iou": 0.85, "seg_vs_decode": 0.25}


def segment_files(paths: list[str], cfg: SegmentParams | None = None, single_thread: bool = False) -> tuple[int, int]:
    """Read, detect, crop every file; (images read, crops made). The unit of work timed everywhere."""
    if single_thread:
        cv2.setNumThreads(1)
    cfg = cfg or SegmentParams(method="colour")
    n_img = n_crop = 0
    for p in paths:
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        if img is None:
            continue
        n_img += 1
        for det in find_white_cells(img, cfg):
            if not det.touches_border:
                crop_cell(img, det, cfg)
                n_crop += 1
    return n_img, n_crop


def decode_files(paths: list[str]) -> int:
    return sum(cv2.imread(p, cv2.IMREAD_COLOR) is not None for p in paths)


def bccd_accuracy(bccd: Path, cfg: SegmentParams) -> dict:
    root = bccd / "BCCD"
    ids = sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))
    lists = {name: set((root / "ImageSets" / "Main" / f"{name}.txt").read_text().split()) for name in ("train", "test")}
    truth = {i: read_voc_boxes(root / "Annotations" / f"{i}.xml") for i in ids}
    det_boxes, crop_boxes, sizes = {}, {}, {}
    for i in ids:
        img = cv2.imread(str(root / "JPEGImages" / f"{i}.jpg"), cv2.IMREAD_COLOR)
        dets = find_white_cells(img, cfg)
        det_boxes[i] = [d.box for d in dets]
        crop_boxes[i] = [d.box for d in dets if not d.touches_border]
        sizes[i] = (img.shape[1], img.shape[0])
    out = {}
    for kind, pred in (("detector", det_boxes), ("crops", crop_boxes)):
        for subset, sel in (("all", ids), ("test", [i for i in ids if i in lists["test"]]),
                            ("train", [i for i in ids if i in lists["train"]])):
            s = score_boxes(pred, {i: truth[i] for i in sel}, sizes=sizes)
            out[f"{kind}_{subset}"] = {k: s[k] for k in ("images", "truth_boxes", "predicted_boxes", "matched",
                                                         "recall", "precision", "mean_iou")}
            if kind == "crops":
                out[f"{kind}_{subset}"]["interior_recall"] = s["interior"]["recall"]
    return out


def throughput(paths: list[str], cfg: SegmentParams, chunk: int = 25) -> dict:
    """Decode-only and segmentation timed on alternating chunks, so both see the same machine load."""
    decode_files(paths)  # page cache
    t_dec = t_seg = 0.0
    n_img = n_crop = 0
    for i in range(0, len(paths), chunk):
        part = paths[i:i + chunk]
        t0 = time.perf_counter()
        decode_files(part)
        t1 = time.perf_counter()
        imgs, crops = segment_files(part, cfg)
        t_seg += time.perf_counter() - t1
        t_dec += t1 - t0
        n_img, n_crop = n_img + imgs, n_crop + crops
    decode_rate, seg_rate = len(paths) / t_dec, n_img / t_seg
    return {"images": n_img, "crops": n_crop, "decode_img_s": decode_rate, "seg_img_s": seg_rate,
            "crops_s": n_crop / t_seg, "seg_vs_decode": seg_rate / decode_rate}


def dask_speedup(paths: list[str], batch: int = 16) -> dict:
    from dask.distributed import Client, LocalCluster

    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    times = {}
    for k in (1, 2):
        with LocalCluster(n_workers=k, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.gather(client.map(segment_files, [batches[0]] * k, single_thread=True, pure=False))  # warm up
            t0 = time.perf_counter()
            done = client.gather(client.map(segment_files, batches, single_thread=True, pure=False))
            times[k] = time.perf_counter() - t0
            assert sum(d[0] for d in done) > 0
    return {"images": len(paths), "batch": batch, "t1_s": times[1], "t2_s": times[2],
            "img_s_1": len(paths) / times[1], "img_s_2": len(paths) / times[2], "speedup_2_vs_1": times[1] / times[2]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder holding bccd/ and pbc/")
    ap.add_argument("--pbc-limit", type=int, default=1000, help="PBC images sampled (all classes, seed 0)")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask speed-up")
    ap.add_argument("--cv-threads", type=int, default=1,
                    help="OpenCV threads for the serial timings (1, as in the Dask workers; 0 = OpenCV's default): "
                         "per-call thread hand-offs cost more than they save on these small images")
    args = ap.parse_args(argv)
    if args.cv_threads:
        cv2.setNumThreads(args.cv_threads)
    bccd, pbc = args.data / "bccd", args.data / "pbc"
    if not (bccd / "BCCD").is_dir() or not pbc.is_dir():
        print(f"{args.data}: needs bccd/BCCD and pbc/", file=sys.stderr)
        return 2
    cfg = SegmentParams(method="colour")
    acc = bccd_accuracy(bccd, cfg)
    bccd_paths = sorted(str(p) for p in (bccd / "BCCD" / "JPEGImages").glob("*.jpg"))
    pbc_all = sorted(str(p) for p in (pbc / "images").glob("*/*.jpg"))
    pbc_paths = sorted(random.Random(0).sample(pbc_all, min(args.pbc_limit, len(pbc_all))))
    speed = {"bccd": throughput(bccd_paths, cfg), "pbc": throughput(pbc_paths, cfg)}
    dask = None if args.no_dask else dask_speedup(pbc_paths[: max(200, len(pbc_paths) // 2)] + bccd_paths)

    print(f"segment benchmark on {args.data} (OpenCV threads: {cv2.getNumThreads()})")
    print(f"  {'BCCD boxes':<22} {'fields':>6} {'truth':>5} {'pred':>5} {'recall':>7} {'prec':>6} {'mIoU':>6}")
    for key, s in acc.items():
        print(f"  {key:<22} {s['images']:>6} {s['truth_boxes']:>5} {s['predicted_boxes']:>5} "
              f"{s['recall']:>7.3f} {s['precision']:>6.3f} {s['mean_iou']:>6.3f}")
    print(f"  {'throughput':<22} {'images':>6} {'decode/s':>9} {'seg/s':>7} {'crops/s':>8} {'seg/decode':>10}")
    for name, s in speed.items():
        print(f"  {name:<22} {s['images']:>6} {s['decode_img_s']:>9.0f} {s['seg_img_s']:>7.0f} "
              f"{s['crops_s']:>8.0f} {s['seg_vs_decode']:>10.2f}")
    if dask:
        print(f"  dask ({dask['images']} images, batches of {dask['batch']}): 1 worker {dask['img_s_1']:.0f}/s, "
              f"2 workers {dask['img_s_2']:.0f}/s, speed-up {dask['speedup_2_vs_1']:.2f}x")
    d = acc["detector_all"]
    figures = {
        "bccd_recall": round(d["recall"], 4), "bccd_precision": round(d["precision"], 4),
        "bccd_mean_iou": round(d["mean_iou"], 4),
        "bccd_test_recall": round(acc["detector_test"]["recall"], 4),
        "bccd_test_precision": round(acc["detector_test"]["precision"], 4),
        "bccd_test_mean_iou": round(acc["detector_test"]["mean_iou"], 4),
        "bccd_crops_recall": round(acc["crops_all"]["recall"], 4),
        "bccd_crops_precision": round(acc["crops_all"]["precision"], 4),
        **{f"{n}_{k}": round(v, 3) for n, s in speed.items() for k, v in s.items() if k != "images"},
        "dask_speedup_2_vs_1": round(dask["speedup_2_vs_1"], 3) if dask else None,
        "meets_targets": bool(d["recall"] >= TARGETS["recall"] and d["precision"] >= TARGETS["precision"]
                              and d["mean_iou"] >= TARGETS["mean_iou"]
                              and min(s["seg_vs_decode"] for s in speed.values()) >= TARGETS["seg_vs_decode"]),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
