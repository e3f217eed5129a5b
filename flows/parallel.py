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

from hemaflow.batches import BatchRunner, run_serial
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


WORKER_SETUP = "hemaflow.flows.dask_worker"  # run in each worker process (flows/dask_worker.py)


def local_cluster(**kwargs: Any) -> LocalCluster:
    """distributed.LocalCluster without Dask's pre-spawn environment for its workers.

    By default Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536 and OMP_NUM_THREADS=1,
    writing both into this process's os.environ as well. Measured here, segmenting a field
    then takes 2.7x as long (every image-sized buffer goes back to the OS and is faulted in
    again), and TensorFlow training later in the flow would get one OpenMP thread. Thread
    pools are limited per batch instead (run_batch). Each worker runs WORKER_SETUP first.
    """
    import logging

    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core",
                 "distributed.batched", "distributed.http.proxy", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.WARNING)  # cluster start/stop chatter is not a flow log
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        return LocalCluster(**{"silence_logs": logging.WARNING, "preload": [WORKER_SETUP], **kwargs})


def dask_task_runner(cfg: ParallelParams, address: str | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner from params: the scheduler at `address` (the flow's own cluster) or at
    cfg.dask_address, else a local cluster started for this stage alone."""
    if address or cfg.dask_address:
        return DaskTaskRunner(address=address or cfg.dask_address)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker,
                                          "processes": True, "dashboard_address": ":0"})


WARM_MODULES = ("prefect", "hemaflow.tasks.segment", "hemaflow.tasks.augment")


def _warm_worker() -> None:
    """Import what every batch needs once per worker, before the first batch arrives."""
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)


class FlowCluster:
    """The flow run's one local Dask cluster, started in a background thread at flow start.

    Starting worker processes and importing Prefect and the stage code in them costs ~5 s
    of two cores; started per batched stage, that start ate most of what 2 workers gain
    on PBC. Started while ingest and validate_labels run (serial: one core is idle) and
    shared by segment and augment, the batched stages pay only their batches.
    """

    def __init__(self, cfg: ParallelParams):
        import threading

        self._cluster: LocalCluster | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(cfg,), name="hemaflow-dask-start", daemon=True)
        self._thread.start()

    def _start(self, cfg: ParallelParams) -> None:
        try:
            self._cluster = local_cluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker,
                                          processes=True, dashboard_address=":0")
            from distributed import Client

            with Client(self._cluster) as client:
                client.run(_warm_worker)
        except BaseException as exc:  # reported when a stage asks for the address
            self._error = exc

    def address(self) -> str:
        """The scheduler address, once the cluster is up (waits for the start to finish)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._cluster is not None
        return self._cluster.scheduler_address

    def close(self) -> None:
        self._thread.join()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


@contextmanager
def flow_cluster(cfg: ParallelParams, needed: bool = True) -> Iterator[FlowCluster | None]:
    """A FlowCluster for the flow run, unless params name a scheduler or nothing batched will run."""
    if cfg.dask_address or not needed:
        yield None
        return
    cluster = FlowCluster(cfg)
    try:
        yield cluster
    finally:
        cluster.close()


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
        if len(batches) <= 1:  # under one task's worth of work: Dask would only add overhead
            return run_serial(fn, batches, progress)
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
