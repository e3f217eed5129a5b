"""Prefect UI artifacts: stage summary tables and progress bars."""

from __future__ import annotations

import time

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact

from hemaflow.progress import Progress


def artifact_key(stage: str, what: str) -> str:
    return f"{stage}-{what}".replace("_", "-").lower()


def publish_summary(stage: str, summary: dict, markdown: str | None = None) -> None:
    """One table (metric, value) per stage run, plus the stage's own markdown report if it has one."""
    create_table_artifact(table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
                          key=artifact_key(stage, "summary"), description=f"{stage}: summary of this run")
    if markdown:
        create_markdown_artifact(markdown=markdown, key=artifact_key(stage, "report"), description=f"{stage} report")


def stage_progress(stage: str, step_pct: float = 10.0) -> Progress:
    """The flow's progress callback: the Prefect progress artifact, and a log line every 10%.

    The log lines are the terminal's progress display for `hemaflow run` (Prefect owns the
    console there; the stage commands draw a tqdm bar instead).
    """
    from prefect import get_run_logger

    artifact = progress_artifact(stage)
    logger = get_run_logger()
    state = {"next": 0.0}

    def update(done: int, total: int) -> None:
        artifact(done, total)
        pct = 100.0 * done / total if total else 100.0
        if done and (pct >= state["next"] or done >= total):
            logger.info("%s progress: %d/%d (%.0f%%)", stage, done, total, pct)
            state["next"] = (pct // step_pct + 1) * step_pct

    return update


def progress_artifact(stage: str, min_interval_s: float = 1.0) -> Progress:
    """A Progress callback that drives a Prefect progress artifact, throttled to one update a second."""
    state: dict = {"id": None, "last": 0.0}

    def update(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if state["id"] is None:
            state["id"] = create_progress_artifact(progress=pct, key=artifact_key(stage, "progress"),
                                                   description=f"{stage}: {done}/{total}")
            state["last"] = now
        elif done >= total or now - state["last"] >= min_interval_s:
            update_progress_artifact(state["id"], progress=pct, description=f"{stage}: {done}/{total}")
            state["last"] = now

    return update
