"""Errors a person can act on: each names the file and the problem."""

from __future__ import annotations

import errno
from pathlib import Path


class StageInputError(Exception):
    """A stage's input is missing or malformed. Message: '<path>: <problem>'."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # survives pickling (errors raised in Dask workers)
        return type(self), (self.path, self.problem)


class OutputWriteError(StageInputError):
    """A stage cannot write an output file (read-only folder, disk full, bad name): deterministic, never retried."""


class StageFileError(StageInputError):
    """A file operation of a stage failed for a deterministic reason (not a directory, no space,
    read-only file system): the OSError turned into one message naming the file."""


def as_stage_error(exc: OSError) -> BaseException:
    """A deterministic OSError that names a file -> StageFileError; anything else unchanged."""
    if isinstance(exc, (StageInputError, SourceReadError)) or is_transient(exc) or not exc.filename:
        return exc
    return StageFileError(exc.filename, exc.strerror or str(exc))


class SourceReadError(OSError):
    """Reading a source file failed for a reason other than its content (permission, I/O, vanished file).

    Not a decode failure: the file is not sent to the review list as unreadable, because a
    flaky mount must not silently shrink the dataset. Transient errno values (EIO, timeouts)
    may be retried by the flow; the rest fail at once.
    """

    def __init__(self, path: str | Path, cause: OSError):
        self.path = Path(path)
        self.cause = cause
        super().__init__(cause.errno, f"{path}: cannot read the file ({cause.strerror or cause})")

    def __str__(self) -> str:
        return self.args[1]

    def __reduce__(self):
        return type(self), (self.path, self.cause)


# errno values that may clear on their own (network mounts, busy devices); the rest are deterministic
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET,
                    errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINTR}


def is_transient(exc: BaseException) -> bool:
    """True for faults worth a retry (I/O hiccups, network); False for bad input, bad params, gates."""
    if isinstance(exc, StageInputError):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNOS
    return False


def write_image(path: str | Path, image, what: str = "image") -> None:
    """cv2.imwrite into path (its folder created); a failure is an OutputWriteError naming the file."""
    import cv2

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ok = cv2.imwrite(str(path), image)
    except (OSError, cv2.error) as exc:
        raise OutputWriteError(path, f"could not write {what}: {exc}") from None
    if not ok:
        raise OutputWriteError(path, f"could not write {what} (folder not writable, disk full or bad file name)")


def require_file(path: str | Path, what: str) -> Path:
    """Return path if it is an existing file, else raise StageInputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError(path, f"{what} not found (did the previous stage run?)")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise StageInputError(path, f"{what} directory not found")
    return path


def require_columns(df, columns: list[str] | tuple[str, ...], path: str | Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StageInputError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}")


def read_table(path: str | Path, what: str, columns: list[str] | tuple[str, ...] = ()):
    """Read a stage's parquet table; missing file, corrupt file or missing columns name the file."""
    import pandas as pd

    path = require_file(path, what)
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise StageInputError(path, f"{what} cannot be read as parquet: {exc}") from exc
    require_columns(df, columns, path)
    return df
