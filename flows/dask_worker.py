"""Set-up run inside every Dask worker process of hemaflow's local clusters (a Dask preload).

Why: distributed logs a worker's failed heartbeat (an OSError talking to the scheduler) at
ERROR with a full traceback, although the worker simply tries again at the next beat. With
two saturated cores, or while the cluster shuts down, that happens now and then, and a flow
that succeeded printed a traceback in its stderr. The record becomes one WARNING line; any
other worker error keeps its level and traceback.
"""

from __future__ import annotations

import logging

HEARTBEAT_MESSAGE = "Failed to communicate with scheduler during heartbeat"


class HeartbeatHiccup(logging.Filter):
    """Turns distributed's 'failed heartbeat' ERROR + traceback into a one-line WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith(HEARTBEAT_MESSAGE):
            reason = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}" if record.exc_info else "no reply"
            record.msg, record.args = f"{HEARTBEAT_MESSAGE} ({reason}); the worker retries at the next heartbeat", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def install() -> None:
    """Add the filter to distributed's worker logger once."""
    if not installed():
        logging.getLogger("distributed.worker").addFilter(HeartbeatHiccup())


def installed() -> bool:
    """Is the filter on this process's worker logger? (checked in each worker by the tests)"""
    return any(isinstance(f, HeartbeatHiccup) for f in logging.getLogger("distributed.worker").filters)


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook
    install()
