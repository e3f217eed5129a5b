"""The flow's way to run a batched stage (hemaflow/batches.py): each batch a Prefect task on Dask.

The stage code is the same one the CLI runs serially; only the batch runner differs. The
task runner is a local Dask cluster of parallel.n_workers processes, started when the
first batch is submitted (an up-to-date stage starts none), or an existing scheduler at
parallel.dask_address, whose workers need hemaflow installed and the data paths mounted.
Results come back in batch order, so the files written equal the serial path's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import dask
from distributed import LocalCluster
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner
from threadpoolctl import threadpool_limits

from hemaflow.batches import BatchRunner
from hemaflow.config import ParallelParams
from hemaflow.errors import is_transient as transient_error
from hemaflow.progress import Progress


def is_transient(task, task_run, state) -> bool:
    """Retry only errors that may pass on their own (I/O hiccups, network), never bad data,
    bad params, an unwritable output or a failed gate (hemaflow.errors.is_transient)."""
    try:
        state.result()
    except Exception as exc:
        return transient_error(exc)
    return False


def local_cluster(**kwargs: Any) -> LocalCluster:
    """distributed.LocalCluster without Dask's pre-spawn environment for its workers.

    By default Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536 and OMP_NUM_THREADS=1,
    writing both into this process's os.environ as well. Measured here, segmenting a field
    then takes 2.7x as long (every image-sized buffer goes back to the OS and is faulted in
    again), and TensorFlow training later in the flow would get one OpenMP thread. Thread
    pools are limited per batch instead (run_batch).
    """
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        return LocalCluster(**kwargs)


def dask_task_runner(cfg: ParallelParams) -> DaskTaskRunner:
    """A DaskTaskRunner from params: the scheduler at cfg.dask_address, else a local cluster."""
    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker,
                                          "processes": True, "dashboard_address": ":0"})


@contextmanager
def workers_share_prefect_api() -> Iterator[None]:
    """Point Dask workers at this process's temporary Prefect server when no PREFECT_API_URL is set.

    Workers receive the flow's Prefect settings; with no API URL (local, ephemeral mode) each
    worker would start a temporary server of its own (about 8 s each) and its task runs would
    never reach the server the flow reports to.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process-wide singleton get_client() starts in ephemeral mode
    if not server.running:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=is_transient)
def run_batch(fn: Callable[[Sequence], Any], batch: Sequence, index: int) -> Any:
    """One batch of a stage; `index` only names the task run.

    One BLAS thread: parallelism comes from the workers. OpenBLAS's own threads busy-wait,
    so with its default (a thread per core) each worker kept two cores busy for one core's
    work, and 2 workers were no faster than 1 (measured: benchmarks/parallel_stages.py).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return fn(batch)


def prefect_batch_runner(stage: str) -> BatchRunner:
    """A BatchRunner that submits each batch to the current flow's task runner (Dask)."""
    batch_task = run_batch.with_options(name=f"{stage}-batch", task_run_name=f"{stage}-batch-{{index}}")

    def run(fn: Callable[[Sequence], Any], batches: list[Sequence], progress: Progress | None = None) -> list:
        total, done = sum(len(b) for b in batches), 0
        if progress:
            progress(0, total)
        futures = [batch_task.submit(fn, b, i) for i, b in enumerate(batches)]
        sizes = {id(f): len(b) for f, b in zip(futures, batches)}
        for fut in as_completed(futures):
            done += sizes[id(fut)]
            if progress:
                progress(done, total)
        return [f.result() for f in futures]  # batch order, not completion order; raises a batch's error

    return run
