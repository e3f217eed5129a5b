"""Near-duplicate images by perceptual hash: pairs within a Hamming distance, and their groups.

A 64-bit perceptual hash (imagehash.phash, stored as 16 hex chars) changes little under
re-encoding, resizing or slight crops, so copies of one cell image sit a few bits apart.
All pairs are compared exactly with numpy popcount on uint64 XORs, in row blocks so
memory stays small: 10k hashes (50M pairs) take well under a second.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BLOCK_ROWS = 512


def parse_phash(values) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings -> (uint64 hashes, valid mask); None/NaN/malformed entries are invalid (hash 0)."""
    out = np.zeros(len(values), dtype=np.uint64)
    valid = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if isinstance(v, str) and len(v) == 16:
            try:
                out[i] = np.uint64(int(v, 16))
                valid[i] = True
            except ValueError:
                pass
    return out, valid


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Every pair (i < j) with Hamming distance <= max_distance: columns i, j, distance."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    found_i, found_j, found_d = [], [], []
    for a in range(0, n, BLOCK_ROWS):
        b = min(a + BLOCK_ROWS, n)
        dist = np.bitwise_count(h[a:b, None] ^ h[None, a:])      # rows a..b against columns a..n
        dist[np.tril_indices(b - a, 0, dist.shape[1])] = 255      # keep j > i only
        r, c = np.nonzero(dist <= max_distance)
        found_i.append(r + a)
        found_j.append(c + a)
        found_d.append(dist[r, c])
    if not found_i:
        return pd.DataFrame({"i": np.array([], int), "j": np.array([], int), "distance": np.array([], int)})
    return pd.DataFrame({"i": np.concatenate(found_i).astype(np.int64), "j": np.concatenate(found_j).astype(np.int64),
                         "distance": np.concatenate(found_d).astype(np.int64)})


def group_labels(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """Connected components of the pair graph: group index per item (singletons get their own)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs["i"].to_numpy(), pairs["j"].to_numpy())), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)
