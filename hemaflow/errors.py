"""Errors a person can act on: each names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class StageInputError(Exception):
    """A stage's input is missing or malformed. Message: '<path>: <problem>'."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


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
