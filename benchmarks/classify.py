"""Classify throughput on real smear fields (BCCD): fields/second and cells/second.

What is timed: `classify_smears` end to end, as `hemaflow classify` runs it (decode, find
every white cell, crop, resize, one batched predict, top-3, differential count, CSV/JSON
writing), after a warm-up call on a few fields (TensorFlow start-up and graph tracing not
timed). For reference, a decode-only pass (cv2.imread) over the same files.

The model: --model (a model folder, e.g. models/bccd/candidate from examples/bccd.params.yaml),
else an untrained small_cnn of the params' input size (the speed does not depend on the
weights). Segmentation params: --params (default examples/bccd.params.yaml, the colour
detector fitted on BCCD).

    .venv/bin/python benchmarks/classify.py [--data ../shared/data] [--model DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model_dir(model: Path | None, params, tmp: Path) -> tuple[Path, str]:
    if model is not None and (model / "model.keras").is_file():
        return model, str(model)
    from hemaflow.models import build_model

    size = params.train.image_size
    d = tmp / "untrained"
    d.mkdir()
    build_model("small_cnn", (size, size, 3), len(params.base.classes)).save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(list(params.base.classes)))
    return d, f"untrained small_cnn {size}px"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "bccd" / "candidate")
    ap.add_argument("--params", type=Path, default=ROOT / "examples" / "bccd.params.yaml")
    ap.add_argument("--limit", type=int, default=None, help="first N fields only")
    args = ap.parse_args()

    import cv2

    from hemaflow.config import load_params
    from hemaflow.tasks.classify import classify_smears

    fields = sorted((args.data / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))[: args.limit]
    if not fields:
        print(f"no BCCD fields under {args.data / 'bccd' / 'BCCD' / 'JPEGImages'}; skipped")
        return 0
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model_dir, model_desc = _model_dir(args.model, params, tmp)
        for f in fields:  # page cache
            f.read_bytes()
        t = time.perf_counter()
        for f in fields:
            cv2.imread(str(f), cv2.IMREAD_COLOR)
        decode_s = time.perf_counter() - t
        classify_smears(model_dir, fields[:5], tmp / "warm", params)  # warm-up: TF start, tracing
        res = classify_smears(model_dir, fields, tmp / "out", params)
    out = {"benchmark": "classify", "dataset": "BCCD JPEGImages", "fields": res.n_images, "cells": res.n_cells,
           "seconds": round(res.seconds, 2), "fields_per_s": round(res.images_per_s, 1),
           "cells_per_s": round(res.cells_per_s, 1), "decode_only_fields_per_s": round(len(fields) / decode_s, 1),
           "model": model_desc, "segment_method": params.segment.method}
    print(f"classify on BCCD: {out['fields']} fields, {out['cells']} cells in {out['seconds']} s: "
          f"{out['fields_per_s']} fields/s, {out['cells_per_s']} cells/s "
          f"(decode only: {out['decode_only_fields_per_s']} fields/s; model: {model_desc})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
