"""HNSW's neighbour-selection rule, applied to whole candidate lists at once.

The rule (Faiss ``HNSW::shrink_neighbor_list``, what insertion applies to every
list it writes): visit a node's candidates nearest first and keep one unless
an already kept neighbour is closer to it than the node is, up to ``max_size``.

Two implementations, the same rule:

* **native**: Faiss's own ``IndexHNSW::shrink_level_0_neighbors`` (C++, OpenMP)
  over a scratch HNSW that shares the index's storage and whose level 0 is as
  wide as the candidate lists. It orders candidates by distance and compares
  them as distances, so it serves L2, and inner product over vectors of one
  length (normalized, as cosine sends them), where the storage is switched to
  L2 for the call: ``|a - b|^2 = 2 c - 2 a.b`` ranks every pair as inner product
  does. (``init_level_0_from_knngraph`` is not used: in Faiss 1.15 it compares
  inner products as distances and leaks a distance computer per vector.)
* **blocks**: the same rule in numpy, with the pairwise candidate distances of
  a block of nodes from one batched BLAS product; for binary codes (no native
  path exists for ``IndexBinaryHNSW``) and inner product over vectors of
  different lengths. 5-10x slower than native on 384-d rows.
"""

from __future__ import annotations

import faiss
import numpy as np

from remote_vector_index_builder.core.knn_graph import StoredRows

# Bytes of decoded candidate rows per numpy block: BLAS at speed, small beside
# any segment worth assembling.
BLOCK_BYTES = 32 * 1024 * 1024


def compact(nodes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates with pads, the node itself and repeats dropped, the rest moved to the front
    in their original order (int32, ``-1`` pads)."""
    cand = candidates.astype(np.int64, copy=False)
    valid = (cand >= 0) & (cand != nodes[:, None])
    order = np.argsort(cand, axis=1, kind="stable")
    ranked = np.take_along_axis(cand, order, axis=1)
    repeat = np.zeros_like(valid)
    np.put_along_axis(
        repeat, order[:, 1:], (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0), axis=1
    )
    valid &= ~repeat
    front = np.argsort(~valid, axis=1, kind="stable")
    out = np.take_along_axis(np.where(valid, cand, -1), front, axis=1)
    return out.astype(np.int32)


class Selector:
    """HNSW's selection rule over one index's stored vectors (see the module doc)."""

    def __init__(self, inner: object, rows: StoredRows) -> None:
        self.rows = rows
        self.inner = inner
        self.native = not rows.binary and (not rows.similarity or rows.equal_norms())

    def __call__(self, nodes: np.ndarray, candidates: np.ndarray, max_size: int) -> np.ndarray:
        """``len(nodes) x max_size`` kept neighbours (int32, ``-1`` pads), nearest first."""
        cand = compact(nodes, candidates)
        if cand.shape[1] == 0:
            return np.full((len(nodes), max_size), -1, dtype=np.int32)
        if self.native:
            return self._native(nodes, cand, max_size)
        out = np.full((len(nodes), max_size), -1, dtype=np.int32)
        k = cand.shape[1]
        block = max(1, BLOCK_BYTES // max(1, k * self.rows.width * 4))
        for start in range(0, len(nodes), block):
            stop = min(len(nodes), start + block)
            out[start:stop] = self._block(nodes[start:stop], cand[start:stop], max_size)
        return out

    def _native(self, nodes: np.ndarray, cand: np.ndarray, max_size: int) -> np.ndarray:
        rows, storage = self.rows, self.rows.storage
        n, width = rows.n, int(cand.shape[1])
        scratch = faiss.IndexHNSW(storage, 2)  # shares the storage (own_fields stays False)
        scratch.hnsw.set_nb_neighbors(0, width)
        faiss.copy_array_to_vector(np.ones(n, dtype=np.int32), scratch.hnsw.levels)
        scratch.hnsw.prepare_level_tab(n, True)
        scratch.ntotal = n
        # Every node is on level 0 only: its slots are width-wide and back to back.
        links = faiss.rev_swig_ptr(scratch.hnsw.neighbors.data(), n * width).reshape(n, width)
        links[nodes] = cand
        metric = int(storage.metric_type)
        if rows.similarity:
            storage.metric_type = faiss.METRIC_L2  # equal norms: L2 ranks as inner product
        try:
            scratch.shrink_level_0_neighbors(max_size)
        finally:
            storage.metric_type = metric
        out = np.full((len(nodes), max_size), -1, dtype=np.int32)
        kept = min(width, max_size)
        out[:, :kept] = links[nodes, :kept]
        del links, scratch
        return out

    def _block(self, nodes: np.ndarray, cand: np.ndarray, max_size: int) -> np.ndarray:
        rows = self.rows
        b, k = cand.shape
        valid = cand >= 0
        x = rows.take(nodes)
        v = rows.take(np.where(valid, cand, nodes[:, None]).ravel()).reshape(b, k, -1)
        dots = np.matmul(v, x[:, :, None])[:, :, 0]
        gram = np.matmul(v, v.transpose(0, 2, 1))
        del v
        if rows.similarity:
            dq, pair = -dots, -gram
        else:
            norms = np.einsum("bkk->bk", gram)
            dq = norms - 2 * dots + np.einsum("bd,bd->b", x, x)[:, None]
            pair = norms[:, :, None] + norms[:, None, :] - 2 * gram
        dq[~valid] = np.inf
        order = np.argsort(dq, axis=1, kind="stable")  # the rule visits the nearest first
        cand = np.take_along_axis(cand, order, axis=1)
        dq = np.take_along_axis(dq, order, axis=1)
        valid = np.take_along_axis(valid, order, axis=1)
        pair = pair[np.arange(b)[:, None, None], order[:, :, None], order[:, None, :]]
        kept = np.zeros((b, k), dtype=bool)
        taken = np.zeros(b, dtype=np.int64)
        for j in range(k):
            good = valid[:, j] & (taken < max_size)
            if j:
                closer = (pair[:, j, :j] < dq[:, j : j + 1]) & kept[:, :j]
                good &= ~closer.any(axis=1)
            kept[:, j] = good
            taken += good
        slot = np.cumsum(kept, axis=1) - 1
        out = np.full((b, max_size), -1, dtype=np.int32)
        row, col = np.nonzero(kept)
        out[row, slot[row, col]] = cand[row, col]
        return out


def nearest(rows: StoredRows, nodes: np.ndarray, candidates: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` candidates nearest each node (int32, ``-1`` pads), nearest first."""
    cand = compact(nodes, candidates)
    b, k = cand.shape
    out = np.full((b, keep), -1, dtype=np.int32)
    block = max(1, BLOCK_BYTES // max(1, k * rows.width * 4))
    for start in range(0, b, block):
        stop = min(b, start + block)
        part = cand[start:stop]
        valid = part >= 0
        x = rows.take(nodes[start:stop])
        safe = np.where(valid, part, nodes[start:stop, None])
        v = rows.take(safe.ravel()).reshape(stop - start, k, -1)
        dots = np.matmul(v, x[:, :, None])[:, :, 0]
        dist = -dots if rows.similarity else np.einsum("bkd,bkd->bk", v, v) - 2 * dots
        dist[~valid] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :keep]
        out[start:stop, : order.shape[1]] = np.take_along_axis(part, order, axis=1)
    return out
