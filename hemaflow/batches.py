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
