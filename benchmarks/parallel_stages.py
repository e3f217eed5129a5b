"""Segment stage through the Prefect flow on Dask: 2 workers vs 1, and vs the serial CLI path.

Why: segmentation is the costly per-image stage; the flow maps its batches over a Dask
cluster (flows/parallel.py). This times the real flow path, `run_batched_stage("segment")`
(a Prefect subflow on a DaskTaskRunner with a local cluster of n worker processes, 1 thread
each), against the serial in-process path (`run_stage`, as the CLI and `dvc repro` run it),
on the embedded synthetic dataset (150 fields, the same as `hemaflow generate`) unless
--data names a folder of the same layout. Times are wall clock for the whole stage,
cluster start and stop included (that is what a flow run pays); the batch phase alone
(first submit to last result) is reported too. Outputs of every run must be identical.

    .venv/bin/python benchmarks/parallel_stages.py [--data /tmp/gen] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_project(root: Path, raw: Path, batch_size: int | None = None, **parallel) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"]["raw_dir"] = str(raw)
    params["parallel"].update(parallel)
    if batch_size:
        params["parallel"]["batch_size"] = batch_size
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


def timed_batch_phase():
    """Wrap flows.parallel.prefect_batch_runner to time first submit -> last result."""
    import hemaflow.flows.parallel as fp
    import hemaflow.flows.training as ft

    spans: list[float] = []
    original = fp.prefect_batch_runner

    def runner(stage):
        inner = original(stage)

        def run(fn, batches, progress=None):
            t0 = time.perf_counter()
            out = inner(fn, batches, progress)
            spans.append(time.perf_counter() - t0)
            return out
        return run

    ft.prefect_batch_runner = runner
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="generated dataset folder (default: generate 150 fields)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (1 worker, 2 workers)")
    ap.add_argument("--batch-size", type=int, default=None, help="fields per task (default: params.yaml)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hemaflow-bench-"))
    (tmp / "prefect").mkdir()
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from hemaflow.config import load_params
    from hemaflow.tasks.stages import run_stage

    try:
        raw = args.data
        if raw is None:
            from hemaflow.synthetic import generate_dataset
            raw = tmp / "raw"
            generate_dataset(raw, n_fields=150, seed=0)
        base = make_project(tmp / "base", raw.resolve())
        for stage in ("ingest", "validate_labels"):
            run_stage(stage, load_params(base), base.parent)
        n_fields = len(pd.read_parquet(base.parent / "data/labels/clean.parquet"))

        def project(name: str, **parallel) -> Path:
            params = make_project(tmp / name, raw.resolve(), args.batch_size, **parallel)
            shutil.rmtree(params.parent / "data", ignore_errors=True)
            shutil.copytree(base.parent / "data", params.parent / "data")
            return params

        from hemaflow.flows.training import run_batched_stage
        spans = timed_batch_phase()
        runs: list[dict] = []

        def record(mode: str, workers: int, params: Path, fn) -> None:
            t0 = time.perf_counter()
            fn()
            runs.append({"mode": mode, "workers": workers, "seconds": time.perf_counter() - t0,
                         "batch_phase_s": spans[-1] if mode == "dask" else None,
                         "crops": pd.read_parquet(params.parent / "data/crops/crops.parquet")})

        serial = project("serial")
        record("serial", 1, serial, lambda: run_stage("segment", load_params(serial), serial.parent))
        # warm-up: the first flow run pays for the temporary Prefect server; not timed
        warm = project("warm", n_workers=1)
        run_batched_stage("segment", str(warm))
        for r in range(args.repeats):
            for workers in (1, 2):
                params = project(f"dask{workers}_{r}", n_workers=workers)
                record("dask", workers, params, lambda: run_batched_stage("segment", str(params)))

        reference = runs[0]["crops"]
        identical = all(run["crops"].equals(reference) for run in runs)
        best = {w: min(r["seconds"] for r in runs if r["mode"] == "dask" and r["workers"] == w) for w in (1, 2)}
        phase = {w: min(r["batch_phase_s"] for r in runs if r["mode"] == "dask" and r["workers"] == w) for w in (1, 2)}

        print(f"\nsegment stage, {n_fields} fields, {len(reference)} crops, batch_size "
              f"{load_params(serial).parallel.batch_size}, {os.cpu_count()} cores")
        print(f"{'path':<28}{'stage s':>10}{'fields/s':>10}{'batches s':>11}")
        for run in runs:
            name = "serial (CLI / dvc repro)" if run["mode"] == "serial" else f"flow, Dask {run['workers']} worker(s)"
            ph = f"{run['batch_phase_s']:.1f}" if run["batch_phase_s"] is not None else "-"
            print(f"{name:<28}{run['seconds']:>10.1f}{n_fields / run['seconds']:>10.2f}{ph:>11}")
        print(f"speed-up 2 vs 1 worker: stage {best[1] / best[2]:.2f}x, batch phase {phase[1] / phase[2]:.2f}x; "
              f"2 workers vs serial: {runs[0]['seconds'] / best[2]:.2f}x; outputs identical: {identical}")
        print(json.dumps({"fields": n_fields, "crops": len(reference), "serial_s": round(runs[0]["seconds"], 2),
                          "dask1_s": round(best[1], 2), "dask2_s": round(best[2], 2),
                          "speedup_2v1": round(best[1] / best[2], 3),
                          "batch_phase_speedup_2v1": round(phase[1] / phase[2], 3),
                          "speedup_2_vs_serial": round(runs[0]["seconds"] / best[2], 3),
                          "outputs_identical": identical}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
