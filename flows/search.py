"""The hyperparameter-search flow: one Prefect task per grid point (tasks/search.py), mapped
over the grid on the Dask runner from params `parallel` (each trial a worker process), then
one comparison table as a markdown artifact and, on request, the best point written back
into the params file (`hemaflow search --write-back`).

DVC's own route works too, since every value is a key of params.yaml:
`dvc exp run --queue -S train.learning_rate=0.001 -S train.batch_size=16 ...`, `dvc queue start`,
`dvc exp show --only-changed`, `dvc exp apply <exp>`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from hemaflow.config import load_params
from hemaflow.flows.parallel import dask_task_runner


@task(name="trial", cache_policy=NO_CACHE, retries=0)  # a failed trial is a result, not a transient fault
def trial_task(params_path: str, point: dict):
    from hemaflow.tasks.search import run_trial
    from hemaflow.tasks.stages import stage_paths

    params_file = Path(params_path)
    p = load_params(params_file)
    paths = stage_paths(p, params_file.parent)
    out = params_file.parent / p.search.out_dir
    return run_trial(paths.augmented_dir, out, p.train, point, p.base.classes, p.base.seed)


@flow(name="hemaflow-search", log_prints=False)
def search_flow(params_path: str = "params.yaml", write_back: bool = False) -> dict:
    """Train and score every grid point; publish the comparison; optionally keep the best."""
    from hemaflow.tasks.search import compare_trials, grid_points
    from hemaflow.tasks.search import write_back as write_best

    params_file = Path(params_path).resolve()
    p = load_params(params_file)
    points = grid_points(p.search.grid)
    logger = get_run_logger()
    logger.info("grid search: %d trials over %s", len(points), ", ".join(p.search.grid))
    futures = trial_task.map([str(params_file)] * len(points), points)
    trials = [f.result() for f in futures]
    best = compare_trials(trials, params_file.parent / p.search.out_dir, p.search.metric)
    create_markdown_artifact(markdown=best["markdown"], key="search-results",
                             description="hyperparameter grid, scored on the validation split")
    if write_back:
        write_best(params_file, best["best"])
        logger.info("best params written back into %s: %s", params_file, best["best"])
    return {k: v for k, v in best.items() if k != "markdown"}


def run_search(params_path: Path, write_back: bool = False) -> dict:
    """The flow on the Dask runner from params `parallel` (trials in worker processes)."""
    runner = dask_task_runner(load_params(params_path).parallel)
    return search_flow.with_options(task_runner=runner)(str(Path(params_path).resolve()), write_back)
