"""Keep ingest inside raw_dir: a name or symlink that leads out is flagged, never read."""

from __future__ import annotations

from pathlib import Path

OUTSIDE = "path_outside_data_folder"


class FolderGuard:
    """Answers "does this path really live under raw_dir?", resolving each folder once."""

    def __init__(self, raw_dir: Path):
        self.raw_dir = raw_dir
        self.root = raw_dir.resolve()
        self._dirs: dict[Path, Path] = {}

    def real(self, path: Path, is_symlink: bool | None = None) -> Path:
        """Resolved path; is_symlink (when the caller knows it, e.g. from os.scandir) saves an lstat."""
        if is_symlink if is_symlink is not None else path.is_symlink():
            return path.resolve()
        parent = self._dirs.get(path.parent)
        if parent is None:
            parent = self._dirs[path.parent] = path.parent.resolve()
        return parent / path.name

    def inside(self, path: Path, is_symlink: bool | None = None) -> bool:
        return self.real(path, is_symlink).is_relative_to(self.root)

    def error(self, path: Path, what: str = "the file", is_symlink: bool | None = None) -> str | None:
        """'path_outside_data_folder: ...' if path leads out of raw_dir, else None."""
        real = self.real(path, is_symlink)
        if real.is_relative_to(self.root):
            return None
        return f"{OUTSIDE}: {what} resolves to {real}, outside the data folder {self.root}"
