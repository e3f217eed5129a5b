"""Progress reporting that stage code can call without knowing who listens.

The CLI passes a tqdm bar, the Prefect flow a progress artifact; tests pass nothing.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

Progress = Callable[[int, int], None]  # (done, total)
T = TypeVar("T")


def track(items: Iterable[T], total: int, progress: Progress | None, every: int = 1) -> Iterator[T]:
    """Yield items, reporting (done, total) every `every` items and at the end."""
    done = 0
    if progress:
        progress(0, total)
    for item in items:
        yield item
        done += 1
        if progress and (done % every == 0 or done == total):
            progress(done, total)


def tqdm_progress(desc: str) -> Progress:
    """A Progress callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit="img", leave=True)
        b = bar["bar"]
        if total != b.total:  # a stage may revise its estimate (training under a time budget)
            b.total = total
        b.update(done - b.n)
        if done >= total:
            b.close()

    return update
