"""Batched stages (segment, augment) on real data: the Prefect flow on 2 Dask workers vs serial.

Why: segmentation and augmentation are the per-image stages; the flow maps their batches
over a Dask cluster (flows/parallel.py), the CLI and `dvc repro` run the very same batches
serially in-process. Parallel must beat serial on the whole stage, cluster start and stop
included (that is what a flow run pays), with identical outputs. Batches are sized by work
(params `parallel.task_seconds`), not by a fixed image count.

    .venv/bin/python benchmarks/parallel_stages.py [--data ../shared/data/pbc] [--params examples/pbc.params.yaml]
        [--stages segment augment] [--workers 2]
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
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pbc"
UPSTREAM = {"segment": ("ingest", "validate_labels"), "augment": ("ingest", "validate_labels", "segment", "split")}
OUTPUT = {"segment": "crops_dir", "augment": "augmented_dir"}


# The costly settings: the detector on every image (not the example's centred crop) and class
# balancing to 1,200 train crops per class (2,748 variants on PBC). --set replaces them.
HEAVY = ("segment.single_cell_crop=detection", "augment.target_per_class=1200")
OVERRIDES: list[str] = []


def write_params(dest: Path, example: Path, raw: Path, **parallel) -> Path:
    """The example params with raw_dir -> raw, every output under dest/ and the --set overrides."""
    from hemaflow.config import read_params_dict

    params = read_params_dict(example)  # with `extends:` resolved
    for item in OVERRIDES:
        key, _, value = item.partition("=")
        block, _, name = key.partition(".")
        params.setdefault(block, {})[name] = yaml.safe_load(value)
    params["paths"] = {k: str(dest / Path(v).name) if k != "raw_dir" else str(raw)
                       for k, v in params["paths"].items()}
    params.setdefault("parallel", {}).update(parallel)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest / "params.yaml"


def table_of(out_dir: Path) -> pd.DataFrame:
    name = "crops.parquet" if (out_dir / "crops.parquet").exists() else "dataset.parquet"
    return pd.read_parquet(out_dir / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: ../shared/data/pbc)")
    ap.add_argument("--params", type=Path, default=ROOT / "examples" / "pbc.params.yaml")
    ap.add_argument("--stages", nargs="+", default=["segment", "augment"], choices=sorted(UPSTREAM))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=list(HEAVY), metavar="BLOCK.KEY=VALUE",
                    help=f"params overrides (default: {' '.join(HEAVY)})")
    args = ap.parse_args()
    OVERRIDES[:] = args.set
    if not args.data.is_dir():
        sys.exit(f"{args.data}: data folder not found")

    tmp = Path(tempfile.mkdtemp(prefix="hemaflow-bench-"))
    for k, v in {"PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(k, v)
    from prefect import flow

    from hemaflow.config import load_params
    from hemaflow.flows.parallel import FlowCluster
    from hemaflow.flows.training import run_batched_stage
    from hemaflow.tasks.stages import STAGES, run_stage

    cluster = None
    try:
        base = write_params(tmp / "base", args.params, args.data.resolve(), n_workers=args.workers)
        # as in a flow run: the flow's cluster starts in the background while the first stages run
        cluster = FlowCluster(load_params(base).parallel)
        upstream = sorted({s for st in args.stages for s in UPSTREAM[st]}, key=list(STAGES).index)
        for stage in upstream:  # not timed: the inputs both paths share
            print(f"preparing: {stage} ...", flush=True)
            run_stage(stage, load_params(base), base.parent)

        @flow
        def warm_up() -> None:  # the temporary Prefect server starts once, untimed
            return None
        warm_up()

        rows, identical = [], True
        for stage in args.stages:
            out_key = OUTPUT[stage]
            times = {}
            outputs = {}
            for mode in ("serial", "flow", "flow_own_cluster"):
                d = tmp / f"{stage}-{mode}"
                shutil.copytree(base.parent, d, ignore=shutil.ignore_patterns("prefect"))
                params = write_params(d, args.params, args.data.resolve(), n_workers=args.workers)
                # this run's stage input comes from the shared upstream outputs, copied above
                t0 = time.perf_counter()
                if mode == "serial":
                    run_stage(stage, load_params(params), d)
                elif mode == "flow":  # the flow run's cluster (started at flow start)
                    run_batched_stage(stage, str(params), cluster=cluster)
                else:  # a cluster started for this stage alone: its start is in the time
                    run_batched_stage(stage, str(params))
                times[mode] = time.perf_counter() - t0
                outputs[mode] = table_of(Path(yaml.safe_load(params.read_text())["paths"][out_key]))
            same = outputs["serial"].equals(outputs["flow"]) and outputs["serial"].equals(outputs["flow_own_cluster"])
            identical &= same
            n_items = len(outputs["serial"])
            rows.append({"stage": stage, "items": n_items, "serial_s": round(times["serial"], 2),
                         "flow_s": round(times["flow"], 2), "speedup": round(times["serial"] / times["flow"], 3),
                         "flow_own_cluster_s": round(times["flow_own_cluster"], 2),
                         "speedup_own_cluster": round(times["serial"] / times["flow_own_cluster"], 3),
                         "identical": same})
            # the next stage's inputs come from the serial run (identical by the check above)
            cfg = yaml.safe_load(base.read_text())
            src = Path(yaml.safe_load((tmp / f"{stage}-serial" / "params.yaml").read_text())["paths"][out_key])
            shutil.rmtree(cfg["paths"][out_key], ignore_errors=True)
            shutil.copytree(src, cfg["paths"][out_key])
            if stage == "segment" and "augment" in args.stages:
                run_stage("split", load_params(base), base.parent)

        print(f"\n{args.data} with {args.params.name} {' '.join(args.set)} "
              f"({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), "
              f"flow = Prefect subflow on {args.workers} local Dask workers, cluster start included")
        print("flow: the flow run's cluster (started in the background at flow start, as `hemaflow run` does);"
              " own cluster: one started for the stage, its start timed")
        print(f"{'stage':<10}{'items':>8}{'serial s':>10}{'flow s':>9}{'speed-up':>10}{'own-cluster s':>15}"
              f"{'speed-up':>10}{'identical':>11}")
        for r in rows:
            print(f"{r['stage']:<10}{r['items']:>8}{r['serial_s']:>10.1f}{r['flow_s']:>9.1f}{r['speedup']:>9.2f}x"
                  f"{r['flow_own_cluster_s']:>15.1f}{r['speedup_own_cluster']:>9.2f}x{str(r['identical']):>11}")
        print(json.dumps({"data": str(args.data), "workers": args.workers, "set": args.set, "stages": rows,
                          "outputs_identical": identical}))
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
