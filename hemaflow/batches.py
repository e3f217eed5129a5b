"""Batched stages: one definition, two ways to run it.

A per-item stage is written as plan -> batch function -> finish. The batch function is
pure (it reads its inputs, writes its own output files and returns its rows), so the
batches are independent. The CLI and `dvc repro` run them one after another in-process
(`run_serial`, no cluster to start); the Prefect flow runs the very same batch function as
Dask tasks (flows/parallel.py). Results come back in batch order either way and no output
depends on batch boundaries, so both paths write identical files.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from hemaflow.progress import Progress

T = TypeVar("T")
R = TypeVar("R")


class BatchRunner(Protocol):
    """Run fn on every batch; return the results in batch order, reporting items done."""

    def __call__(self, fn: Callable[[Sequence], R], batches: list[Sequence],
                 progress: Progress | None = None) -> list[R]: ...


def split_batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive slices of at most `size` items (rows, for a DataFrame)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    rows = getattr(items, "iloc", items)  # a DataFrame slices by row position
    return [rows[i:i + size] for i in range(0, len(items), size)]


def run_serial(fn: Callable[[Sequence], R], batches: list[Sequence], progress: Progress | None = None) -> list[R]:
    """The in-process runner: batches one after another, progress after each."""
    total, done = sum(len(b) for b in batches), 0
    if progress:
        progress(0, total)
    results = []
    for batch in batches:
        results.append(fn(batch))
        done += len(batch)
        if progress:
            progress(done, total)
    return results


def work_batches(items: Sequence[T], weights: Sequence[float], seconds_per_weight: float, task_seconds: float,
                 n_parallel: int = 1) -> list[Sequence[T]]:
    """Consecutive slices sized by work, not by count: each carries about task_seconds of work.

    A Prefect task on Dask costs ~0.3 s of overhead (submit, state, result), so a task of
    16 small images was mostly overhead (measured on PBC: 640 tasks, 2 workers 3x slower
    than serial). The batch count is rounded up to a multiple of n_parallel so the
    workers finish together; weights estimate each item's cost (e.g. its pixels).
    """
    n_items = len(items)
    if n_items == 0:
        return []
    w = np.clip(np.asarray(weights, dtype=float), 0, None)
    if not np.isfinite(w).all() or w.sum() <= 0:
        w = np.ones(n_items)
    total_s = float(w.sum()) * seconds_per_weight
    n = max(1, int(np.ceil(total_s / max(task_seconds, 1e-9))))
    n = int(np.ceil(n / n_parallel)) * n_parallel if n > 1 and n_parallel > 1 else n  # one task's worth: one batch
    n = min(n, n_items)
    cuts = np.searchsorted(np.cumsum(w), np.arange(1, n) * w.sum() / n, side="left") + 1
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < n_items)), n_items]
    rows = getattr(items, "iloc", items)
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]