"""Arrays inside an .npz archive, read one row at a time.

np.load(...)[key] loads a whole array; a MedMNIST archive at 224 px is gigabytes, so
ingest streams rows from the zip member and read_image memory-maps stored (uncompressed)
members. Deflated members cannot be seeked cheaply: random access loads that one array.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np


def _read_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)


class NpzArchive:
    """An opened .npz: the shape of each array, rows streamed or fetched by index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path)  # raises BadZipFile / OSError for a broken archive
        self.headers: dict[str, tuple[tuple[int, ...], bool, np.dtype, int]] = {}
        for info in self._zip.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with self._zip.open(info) as fh:
                shape, fortran, dtype = _read_header(fh)
                self.headers[info.filename[:-4]] = (shape, fortran, dtype, fh.tell())
        self._arrays: dict[str, np.ndarray] = {}

    def keys(self) -> list[str]:
        return list(self.headers)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.headers[key][0]

    def iter_rows(self, key: str) -> Iterator[np.ndarray]:
        """Rows of array `key` in order, one in memory at a time."""
        shape, fortran, dtype, header_len = self.headers[key]
        if fortran or dtype.hasobject:
            yield from self.array(key)
            return
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        with self._zip.open(key + ".npy") as fh:
            fh.read(header_len)
            for _ in range(shape[0] if shape else 0):
                buf = fh.read(row_bytes)
                if len(buf) < row_bytes:
                    return  # short member: the rows that are there were yielded
                yield np.frombuffer(buf, dtype).reshape(row_shape)

    def row(self, key: str, index: int) -> np.ndarray:
        """Row `index` of array `key` without reading the others (stored members are memory-mapped)."""
        return self.array(key)[index]

    def array(self, key: str) -> np.ndarray:
        """The whole array: a read-only memmap for a stored member, else loaded once and kept."""
        if key not in self._arrays:
            shape, fortran, dtype, header_len = self.headers[key]
            info = self._zip.getinfo(key + ".npy")
            if info.compress_type == zipfile.ZIP_STORED and not dtype.hasobject:
                with open(self.path, "rb") as f:
                    f.seek(info.header_offset)
                    local = f.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + 30 + name_len + extra_len + header_len
                self._arrays[key] = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                              order="F" if fortran else "C")
            else:
                with self._zip.open(info) as fh:
                    self._arrays[key] = np.lib.format.read_array(fh)
        return self._arrays[key]

    def close(self) -> None:
        self._arrays.clear()
        self._zip.close()
