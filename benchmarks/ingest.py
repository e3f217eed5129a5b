"""Ingest throughput vs plain decoding, and memory, on the real PBC class folders.

Why: ingest reads, hashes (sha256 + phash), decodes and checks every image; it should
cost at most twice a bare cv2.imread loop (target: full ingest >= 50% of decode-only
images/s), and its memory must not grow with the images it has seen (streaming).
Both rates are measured in the same run, after one pass that brings the files into
the page cache, alternating decode-only and ingest rounds; each keeps its best round.
Wall and CPU (user+sys) time are both reported: on a shared machine other jobs stretch
wall time at random, CPU time much less, so the ratio is judged on CPU time. Then,
if tasks.validate_labels runs on the manifest, it is timed too.

    .venv/bin/python benchmarks/ingest.py [--data ../shared/data/pbc]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.5
PAGE = os.sysconf("SC_PAGE_SIZE")


def list_files(data: Path) -> list[Path]:
    from hemaflow.readers.class_folders import class_root
    return sorted(p for p in class_root(data).glob("*/*") if p.is_file())


def warm_cache(files: list[Path]) -> float:
    t0 = time.perf_counter()
    n = sum(len(p.read_bytes()) for p in files)
    return n / (time.perf_counter() - t0) / 1e6


def decode_only(files: list[Path]) -> tuple[float, float, int, int]:
    """(wall s, cpu s, decoded images, decoded bytes) for cv2.imread of every file."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = nbytes = 0
    for p in files:
        img = cv2.imread(str(p))
        if img is not None:
            n += 1
            nbytes += img.nbytes
    return time.perf_counter() - t0, time.process_time() - c0, n, nbytes


class PeakRSS:
    """Highest resident memory while the block runs, sampled every 10 ms by a thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.start_mb = self.peak_mb = 0.0

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:  # Linux: size resident shared ... in pages
            return int(f.read().split()[1]) * PAGE / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self) -> "PeakRSS":
        self.start_mb = self.peak_mb = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb


def run_ingest(data: Path, manifest: Path) -> tuple[float, float, object, float]:
    """(wall s, cpu s, IngestResult, peak RSS growth MB during ingest)."""
    from hemaflow.config import IngestParams
    from hemaflow.tasks.ingest import ingest

    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        result = ingest(data, manifest, IngestParams())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, result, rss.growth_mb


def run_validate(manifest: Path, labels_dir: Path) -> dict:
    """Time validate_labels on the manifest with the PBC taxonomy (examples/pbc.params.yaml, 8 classes)."""
    try:
        from hemaflow.config import load_params
        from hemaflow.tasks.validate_labels import validate_labels

        params = load_params(ROOT / "examples" / "pbc.params.yaml")
        t0 = time.perf_counter()
        res = validate_labels(manifest, labels_dir, params.validate_labels, params.base.classes)
        return {"seconds": time.perf_counter() - t0, "clean": res.n_clean,
                "review": sum(res.problems.values()), "problems": dict(res.problems)}
    except Exception as exc:  # noqa: BLE001 - report, don't fail the ingest benchmark
        return {"skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    ap.add_argument("--rounds", type=int, default=2, help="decode-only / ingest rounds (best one counts)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"{args.data}: data folder not found", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)  # both paths single-threaded, so the ratio compares like with like

    files = list_files(args.data)
    cache_mbs = warm_cache(files)
    import pyarrow.parquet  # noqa: F401  (its import is not ingest memory)
    dec_wall, dec_cpu, ing_wall, ing_cpu, rss_growth = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.parquet"
        for _ in range(args.rounds):
            w, c, n_dec, dec_bytes = decode_only(files)
            dec_wall.append(w)
            dec_cpu.append(c)
            w, c, result, growth = run_ingest(args.data, manifest)
            ing_wall.append(w)
            ing_cpu.append(c)
            rss_growth.append(growth)
        validate = run_validate(manifest, Path(tmp) / "labels")

    n = len(files)
    rate = {"decode_wall": n / min(dec_wall), "decode_cpu": n / min(dec_cpu),
            "ingest_wall": n / min(ing_wall), "ingest_cpu": n / min(ing_cpu)}
    ratio_cpu = rate["ingest_cpu"] / rate["decode_cpu"]
    ratio_wall = rate["ingest_wall"] / rate["decode_wall"]

    def rounds(ts: list[float]) -> str:
        return " / ".join(f"{n / t:.0f}" for t in ts)

    rows = [
        ("files", f"{n}"),
        ("page-cache warm pass", f"{cache_mbs:.0f} MB/s"),
        ("decode-only cv2.imread, wall img/s", f"best {rate['decode_wall']:.0f}  (rounds {rounds(dec_wall)})"),
        ("full ingest, wall img/s", f"best {rate['ingest_wall']:.0f}  (rounds {rounds(ing_wall)})"),
        ("decode-only, CPU img/s", f"best {rate['decode_cpu']:.0f}  (rounds {rounds(dec_cpu)})"),
        ("full ingest, CPU img/s", f"best {rate['ingest_cpu']:.0f}  (rounds {rounds(ing_cpu)})"),
        ("ingest / decode-only, CPU", f"{ratio_cpu:.2f} (target >= {TARGET_RATIO})"),
        ("ingest / decode-only, wall", f"{ratio_wall:.2f}"),
        ("manifest rows / errors", f"{result.n_images} / {result.n_errors} {result.errors}"),
        ("peak RSS growth during ingest", " / ".join(f"{g:.1f}" for g in rss_growth) + " MB (rounds)"),
        ("  per manifest row (upper bound)", f"{max(rss_growth) * 2**20 / max(result.n_images, 1) / 1024:.1f} KiB"),
        ("decoded pixels of all images", f"{dec_bytes / 2**20:.0f} MB"),
    ]
    if "seconds" in validate:
        rows.append(("validate_labels", f"{validate['seconds']:.1f} s, clean {validate['clean']}, "
                                        f"review {validate['review']}"))
    else:
        rows.append(("validate_labels", f"skipped ({validate['skipped']})"))
    width = max(len(k) for k, _ in rows)
    print(f"ingest benchmark on {args.data}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    figures = {
        "files": n, "decoded": n_dec,
        "decode_only_img_s": round(rate["decode_wall"], 1), "ingest_img_s": round(rate["ingest_wall"], 1),
        "decode_only_cpu_img_s": round(rate["decode_cpu"], 1), "ingest_cpu_img_s": round(rate["ingest_cpu"], 1),
        "ingest_over_decode_cpu": round(ratio_cpu, 3), "ingest_over_decode_wall": round(ratio_wall, 3),
        "target_met": ratio_cpu >= TARGET_RATIO, "ingest_errors": result.errors,
        "peak_rss_growth_mb": round(max(rss_growth), 1), "decoded_pixels_mb": round(dec_bytes / 2**20, 1),
        "validate_seconds": round(validate["seconds"], 2) if "seconds" in validate else None,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
