"""kNN graphs over an index's stored vectors: the input of ``core.graph_assembly``.

A ``KnnGraph`` is ``n x k`` candidate ids per stored vector. Where it comes
from: the GPU's CAGRA graph (``core.gpu_builder``), or ``exact_knn`` here, a
BLAS GEMM plus top-k over every pair (``faiss.knn``), which on the CPU is
cheaper than HNSW insertion only for small segments (``EXACT_KNN_MAX_ROWS``).

``StoredRows`` reads the stored vectors back as fp32 by position, decoding
fp16 and 8-bit codes and unpacking binary codes to 0/1 floats (whose squared
L2 distance is the Hamming distance), so everything computed from them sees
the distances the index's own search sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import faiss
import numpy as np

from remote_vector_index_builder.core.errors import BuildError
from remote_vector_index_builder.core.index_builder import FaissIndex

# Rows per ``faiss.knn`` call of the exact kNN graph: at most EXACT_BLOCK_ROWS
# (its distance block is rows x n fp32, 2048 x 8k = 64 MB), and n / PROGRESS_STEPS
# so that progress and cancellation come in small steps, but at least
# MIN_BLOCK_ROWS: each call starts Faiss's OpenMP team and BLAS, which on a busy
# host cost more than a small block's work (900 x 768 in 16 calls: 1.2 s, in 1: 0.1 s).
EXACT_BLOCK_ROWS = 2048
MIN_BLOCK_ROWS = 1024
PROGRESS_STEPS = 16
# Segments up to this many rows are built from their exact kNN graph on the CPU
# (GEMM + graph assembly) instead of HNSW insertion: the n^2 GEMM costs less than
# insertion below it. Measured on 256-d rows (benchmarks/graph_build.py, crossover
# in benchmarks/README.md): 1.8x faster at 4k rows, even at 8k, 0.6x at 16k.
EXACT_KNN_MAX_ROWS = 6000
# Candidates per vector of the exact kNN graph, in units of m (2 m are kept).
EXACT_KNN_CANDIDATES_PER_M = 3
# Relative spread of squared norms under which inner product ranks like L2
# (||a - b||^2 = |a|^2 + |b|^2 - 2 a.b): normalized vectors, as cosine sends them.
EQUAL_NORMS_TOLERANCE = 0.01


class KnnGraph:
    """Candidate neighbours per stored vector: ``ids`` ``n x k``, ``-1`` pads.

    Entries equal to the row's own position, repeats and pads are ignored by
    the assembly; distances are not needed (they are recomputed from the
    storage, so the selection uses the index's own distances).
    """

    def __init__(self, ids: np.ndarray) -> None:
        if ids.ndim != 2:
            raise BuildError(f"a kNN graph is n x k ids, got shape {ids.shape}")
        self.ids = ids

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


class StoredRows:
    """The index's stored vectors as fp32, gathered by position (decoded where quantized)."""

    def __init__(self, inner: FaissIndex) -> None:
        self.binary = isinstance(inner, faiss.IndexBinary)
        storage = (
            faiss.downcast_IndexBinary(inner.storage)
            if self.binary
            else faiss.downcast_index(inner.storage)
        )
        self.storage = storage
        self.n = int(storage.ntotal)
        code_size = int(storage.code_size)
        vector = storage.xb if self.binary else storage.codes
        size = self.n * code_size
        codes = faiss.rev_swig_ptr(vector.data(), size) if size else np.zeros(0, np.uint8)
        self.codes: np.ndarray = codes.reshape(self.n, code_size)
        self.similarity = not self.binary and int(inner.metric_type) == faiss.METRIC_INNER_PRODUCT
        self.kind = "bits" if self.binary else _kind(storage)
        self.width = int(inner.d)  # floats per decoded row (bits for binary)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """``len(positions) x width`` fp32 rows."""
        codes = self.codes[positions]
        rows: np.ndarray
        if self.kind == "fp32":
            rows = codes.view(np.float32)
        elif self.kind == "fp16":
            rows = codes.view(np.float16).astype(np.float32)
        elif self.kind == "int8":  # 8-bit direct signed stores value + 128
            rows = (codes.astype(np.int16) - 128).astype(np.float32)
        elif self.kind == "bits":
            rows = np.unpackbits(codes, axis=1).astype(np.float32)
        else:
            rows = np.asarray(self.storage.sa_decode(np.ascontiguousarray(codes)), np.float32)
        return rows

    def queries(self, positions: np.ndarray) -> np.ndarray:
        """Rows as the index's ``search`` takes them (packed codes for binary)."""
        if self.binary:
            return np.ascontiguousarray(self.codes[positions])
        return np.ascontiguousarray(self.take(positions))

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, rows):
            yield start, self.take(np.arange(start, min(self.n, start + rows)))

    def equal_norms(self) -> bool:
        """All rows of (nearly) one length: inner product then ranks pairs as L2 does."""
        return of_one_length(block for _, block in self.blocks(8192))


def of_one_length(blocks: Iterable[np.ndarray]) -> bool:
    """Every row of every block has (nearly) the same length (``EQUAL_NORMS_TOLERANCE``)."""
    low, high = np.inf, 0.0
    for block in blocks:
        if len(block):
            rows = block.astype(np.float32, copy=False)
            squared = np.einsum("ij,ij->i", rows, rows)
            low, high = min(low, float(squared.min())), max(high, float(squared.max()))
    return low == np.inf or high <= (1 + EQUAL_NORMS_TOLERANCE) * low


def _kind(storage: FaissIndex) -> str:
    if isinstance(storage, faiss.IndexFlat):
        return "fp32"
    qtype = int(storage.sq.qtype)
    if qtype == faiss.ScalarQuantizer.QT_fp16:
        return "fp16"
    if qtype == faiss.ScalarQuantizer.QT_8bit_direct_signed:
        return "int8"
    return "decode"


def exact_knn(
    rows: StoredRows,
    k: int,
    block: int = EXACT_BLOCK_ROWS,
    progress: Callable[[float], None] | None = None,
) -> KnnGraph:
    """Each stored vector's ``k`` nearest others, exactly (GEMM + top-k, in row blocks).

    ``progress`` gets the share done after each block.
    """
    n = rows.n
    k = max(0, min(k, n - 1))
    block = max(1, min(block, max(MIN_BLOCK_ROWS, -(-n // PROGRESS_STEPS))))
    ids = np.empty((n, k), dtype=np.int64)
    if k == 0:
        return KnnGraph(ids)
    if rows.binary:
        for start in range(0, n, block):
            stop = min(n, start + block)
            queries = np.ascontiguousarray(rows.codes[start:stop])
            _, found = faiss.knn_hamming(queries, rows.codes, k + 1)
            ids[start:stop] = drop_self(np.asarray(found), np.arange(start, stop), k)
            if progress is not None:
                progress(stop / n)
        return KnnGraph(ids)
    metric = faiss.METRIC_INNER_PRODUCT if rows.similarity else faiss.METRIC_L2
    # Flat storage is searched in place; quantized storage is decoded once.
    base = rows.codes.view(np.float32) if rows.kind == "fp32" else rows.take(np.arange(n))
    for start in range(0, n, block):
        stop = min(n, start + block)
        _, found = faiss.knn(np.ascontiguousarray(base[start:stop]), base, k + 1, metric)
        ids[start:stop] = drop_self(np.asarray(found), np.arange(start, stop), k)
        if progress is not None:
            progress(stop / n)
    return KnnGraph(ids)


def drop_self(found: np.ndarray, nodes: np.ndarray, k: int) -> np.ndarray:
    """``k`` of each row's ``k + 1`` results, the row's own position left out
    (or, where ties hid it, the farthest result)."""
    keep = found != nodes[:, None]
    keep[keep.all(axis=1), -1] = False
    out: np.ndarray = found[keep].reshape(len(nodes), k)
    return out
