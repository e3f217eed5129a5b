"""Decoding guard: an image whose header declares huge dimensions is never decoded.

Peak memory is measured in a subprocess (ru_maxrss of a fresh interpreter that runs ingest),
not with a timing or in-process assertion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hemaflow.imageio import read_image
from tests.fixtures.huge_png import write_huge_png

ROOT = Path(__file__).resolve().parents[2]

INGEST_AND_MEASURE = """
import json, resource, sys
from pathlib import Path
from hemaflow.config import IngestParams
from hemaflow.tasks.ingest import ingest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ingest(Path(sys.argv[1]), Path(sys.argv[2]), IngestParams(reader="class_folders"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024}))
"""


def test_small_file_of_huge_dimensions_is_decoded_correctly_by_opencv(tmp_path):
    p = write_huge_png(tmp_path / "small.png", 300, 200)
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    assert img.shape == (200, 300) and img.max() == 0, "the generator writes a valid PNG"


def test_huge_png_is_refused_before_decoding_and_memory_stays_small(tmp_path):
    raw = tmp_path / "raw" / "images"
    write_huge_png(raw / "neutrophil" / "bomb.png", 30000, 30000)      # 900 M px: PIL's bomb limit too
    write_huge_png(raw / "neutrophil" / "big.png", 10000, 10000)       # 100 M px: above our 64 M limit
    (raw / "lymphocyte").mkdir()
    cv2.imwrite(str(raw / "lymphocyte" / "ok.png"), np.full((40, 40, 3), 200, np.uint8))
    assert (raw / "neutrophil" / "bomb.png").stat().st_size < 2_000_000
    out = subprocess.run([sys.executable, "-c", INGEST_AND_MEASURE, str(tmp_path / "raw"), str(tmp_path / "m.parquet")],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    # decoding the two would need 0.9 GB + 0.1 GB (grey) and 3 GB as BGR; ingest's own imports are ~150 MB
    assert mem["peak_mb"] - mem["before_mb"] < 150, mem
    m = pd.read_parquet(tmp_path / "m.parquet").set_index("path")
    assert m.loc["images/neutrophil/bomb.png", "error"].startswith("image_too_large: the header declares over")
    assert m.loc["images/neutrophil/big.png", "error"].startswith("image_too_large: the header says 10000x10000")
    assert pd.isna(m.loc["images/lymphocyte/ok.png", "error"])


def test_read_image_applies_the_guard(tmp_path):
    write_huge_png(tmp_path / "big.png", 10000, 10000)
    assert read_image(tmp_path, "big.png") is None
