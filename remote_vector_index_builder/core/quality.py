"""Index quality: recall@k of a built index against exact search.

Every build gets a ``QualityReport``: a seeded sample of the segment's own
vectors is copied before the build (the builder hands the downloaded blob's
pages back batch by batch, so the rows are gone afterwards), and after it each
sampled row is searched in the index at the request's ``ef_search`` and, exactly,
in batches over the index's own stored vectors (``exact_from_storage``: no second
full copy of the vectors ever exists). The row itself is left out of both lists.
``exact_neighbours`` / ``recall_at_k`` are the plain versions the demo and tests use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from remote_vector_index_builder.core.params import BuildRequest, SpaceType

log = logging.getLogger(__name__)

# Called between batches of work; raises (``CancelledError``) to stop it.
Checkpoint = Callable[[], None]

K = 10
# Rows searched per quality check. The exact half costs sample x n x d like a
# brute-force scan, a fixed share of an HNSW build whatever n is: 256 queries
# cost 2.5 % of the standard and 3.6 % of the fast build at 50k x 768, but 7 % at
# 50k x 256 and 0.26 s against a 1 s build at 1k x 768 (benchmarks/build_modes.py,
# run 20261201T160651Z in benchmarks/README.md). They bound recall@10's standard
# error to ~0.004 at recall 0.95.
SAMPLE_SIZE = 256
SAMPLE_SEED = 20261201
# Stored rows decoded (or viewed) per exact-search batch: 16k x 768 fp32 = 50 MB
# only for quantized storage; flat storage is scanned in place.
SCAN_ROWS = 16384
# Sampled rows searched in the index per batch; the job's cancel and time limit
# are checked between batches (and between exact-search batches).
SEARCH_ROWS = 32


class BuildPath:
    """How the graph of a finished index was made (the report's ``build_path``)."""

    INSERTION = "hnsw-insertion"  # Faiss HNSW add() over the stored vectors
    PROJECTED = "projected-insertion"  # add() over projected 8-bit codes, moved onto storage
    EXACT_KNN = "exact-knn-assembly"  # exact kNN graph (GEMM), then core.graph_assembly
    BLOCKED_KNN = "blocked-knn-assembly"  # approximate kNN by blocked GEMM (core.blocked_knn)
    GPU_ASSEMBLY = "gpu-cagra-assembly"  # the GPU's CAGRA graph, then core.graph_assembly
    GPU_BASE_LEVEL = "gpu-cagra-base-level"  # CAGRA graph as level 0 only (IHc2 / IBHc)


@dataclass
class BuildNotes:
    """What the builder did, filled in during the build, read by the quality report."""

    requested_mode: str = "standard"
    mode: str = "standard"
    fallback: bool = False
    reason: str | None = None
    # Pilot recalls (fast and standard builds of a sample) when ``auto`` ran one.
    pilot: dict[str, Any] | None = None
    # Where the build ran in the end: a GPU build that fell back says "cpu".
    device: str = "cpu"
    path: str = BuildPath.INSERTION
    # core.graph_assembly's counts, where the graph was assembled from a kNN graph.
    assembly: dict[str, Any] | None = None


@dataclass(frozen=True)
class QualityReport:
    recall: float
    k: int
    ef_search: int
    sample_size: int
    seconds: float
    build_mode: str
    requested_mode: str
    fallback: bool
    # Why the mode built differs from the one requested (a fallback, or a rule).
    mode_reason: str | None = None
    pilot: dict[str, Any] | None = None
    # Where the build ran ("cpu" also for a GPU build that fell back) and how its
    # graph was made (``BuildPath``); assembly counts where it was assembled.
    device: str = "cpu"
    build_path: str = BuildPath.INSERTION
    assembly: dict[str, Any] | None = None
    # False for skip_stored_vectors: recall was measured with the vectors the
    # build had, which the written file does not hold (the data node supplies its own).
    vectors_in_file: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        text = (
            f"recall@{self.k} {self.recall:.4f} at ef_search {self.ef_search} on "
            f"{self.sample_size} sampled vectors ({self.seconds:.2f} s), build mode "
            f"{self.build_mode}, {self.build_path} on {self.device}"
        )
        if not self.vectors_in_file:
            text += " (measured with vectors the file does not hold: skip_stored_vectors)"
        if self.requested_mode != self.build_mode or self.fallback:
            text += f" (requested {self.requested_mode}"
            text += ", fell back" if self.fallback else ""
            text += f": {self.mode_reason})" if self.mode_reason else ")"
        return text


@dataclass(frozen=True)
class QuerySample:
    """Sampled row positions and a copy of their rows, taken before the build."""

    positions: np.ndarray  # int64, sorted
    rows: np.ndarray  # float32 (uint8 packed bits for binary)

    @classmethod
    def take(
        cls, vectors: np.ndarray, size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED
    ) -> QuerySample:
        n = int(vectors.shape[0])
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(n, min(size, n), replace=False)).astype(np.int64)
        rows = vectors[positions]  # fancy indexing copies: only ``size`` rows
        if rows.dtype != np.uint8:
            rows = rows.astype(np.float32)
        return cls(positions=positions, rows=np.ascontiguousarray(rows))


def metric_of(space_type: SpaceType | str) -> str:
    return SpaceType(space_type).value


def _float_metric(metric: str) -> int:
    return int(faiss.METRIC_INNER_PRODUCT if metric == "innerproduct" else faiss.METRIC_L2)


def inner_of(index: Any) -> Any:
    """The HNSW under an ID map (search it to get row positions, not doc ids)."""
    if isinstance(index, faiss.IndexBinaryIDMap):
        return faiss.downcast_IndexBinary(index.index)
    if isinstance(index, faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return index


def _storage_batches(inner: Any, rows: int) -> Any:
    """Yield ``(start, rows)`` of the vectors ``inner``'s storage holds.

    Flat storage is viewed in place; quantized storage is decoded one batch at
    a time (the exact search then runs over the stored values, which is what
    the index's own distances see).
    """
    binary = isinstance(inner, faiss.IndexBinary)
    storage = (
        faiss.downcast_IndexBinary(inner.storage) if binary else faiss.downcast_index(inner.storage)
    )
    n = int(storage.ntotal)
    if binary:
        whole = faiss.rev_swig_ptr(storage.xb.data(), n * storage.code_size) if n else None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            assert whole is not None
            view = whole[start * storage.code_size : stop * storage.code_size]
            yield start, view.reshape(stop - start, storage.code_size)
    elif isinstance(storage, faiss.IndexFlat):
        whole = faiss.rev_swig_ptr(storage.codes.data(), n * storage.code_size) if n else None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            assert whole is not None
            view = whole[start * storage.code_size : stop * storage.code_size]
            yield start, view.view(np.float32).reshape(stop - start, storage.d)
    else:
        for start in range(0, n, rows):
            yield start, storage.reconstruct_n(start, min(rows, n - start))


def exact_from_storage(
    inner: Any,
    queries: np.ndarray,
    k: int,
    metric: str,
    rows: int = SCAN_ROWS,
    checkpoint: Checkpoint | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distances and positions of the exact ``k`` nearest stored rows, scanned in batches."""
    nq = int(queries.shape[0])
    heap = faiss.ResultHeap(nq, k, keep_max=metric == "innerproduct")
    worst = -np.inf if metric == "innerproduct" else np.inf
    for start, base in _storage_batches(inner, rows):
        if checkpoint is not None:
            checkpoint()
        kk = min(k, int(base.shape[0]))
        if metric == "hamming":
            distances, labels = faiss.knn_hamming(queries, np.ascontiguousarray(base), kk)
        else:
            distances, labels = faiss.knn(queries, base, kk, _float_metric(metric))
        distances = np.asarray(distances, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64) + start
        if kk < k:  # a short last batch: pad so the heap gets k columns
            distances = np.hstack([distances, np.full((nq, k - kk), worst, np.float32)])
            labels = np.hstack([labels, np.full((nq, k - kk), -1, np.int64)])
        heap.add_result(np.ascontiguousarray(distances), np.ascontiguousarray(labels))
    heap.finalize()
    return np.asarray(heap.D), np.asarray(heap.I)


def without_self(
    distances: np.ndarray, labels: np.ndarray, positions: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's own row from its ``k + 1`` results (else its last result)."""
    keep = labels != positions[:, None]
    # Where the own row is absent, drop the last column instead.
    keep[keep.all(axis=1), -1] = False
    shape = (labels.shape[0], labels.shape[1] - 1)
    return distances[keep].reshape(shape)[:, :k], labels[keep].reshape(shape)[:, :k]


def tie_aware_hits(
    truth_distances: np.ndarray, found_distances: np.ndarray, found: np.ndarray, metric: str
) -> int:
    """Found results no farther than each query's k-th true neighbour, summed.

    The same as counting found ids among the true ids when no distances tie;
    with ties (duplicate vectors, integer Hamming distances) any of the tied
    rows is a correct answer, and counting ids would call it a miss.
    """
    kth = truth_distances[:, -1:].astype(np.float64)
    got = found_distances.astype(np.float64)
    tolerance = 1e-5 * np.abs(kth) + 1e-6  # quantized storage: summation order differs
    close = got >= kth - tolerance if metric == "innerproduct" else got <= kth + tolerance
    return int(np.count_nonzero(close & (found >= 0)))


def sample_recall(
    index: Any,
    sample: QuerySample,
    k: int,
    ef_search: int,
    metric: str,
    checkpoint: Checkpoint | None = None,
) -> float:
    """Recall@k of ``index`` at ``ef_search`` for the sample rows, their own row excluded.

    The search runs at ``min(ef_search, ntotal)``: the same results (a search
    cannot keep more candidates than there are vectors), without the ef-sized
    heaps Faiss would allocate per query (16 GiB a thread at ef 2**31 - 1).
    ``checkpoint`` is called between batches and may raise to stop the check.
    """
    inner = inner_of(index)
    n = int(inner.ntotal)
    k = min(k, n - 1)
    if k <= 0 or len(sample.positions) == 0:
        return 1.0
    truth_d, _ = without_self(
        *exact_from_storage(inner, sample.rows, k + 1, metric, checkpoint=checkpoint),
        sample.positions,
        k,
    )
    ef = max(1, min(ef_search, n))
    parts = []
    for start in range(0, len(sample.rows), SEARCH_ROWS):
        if checkpoint is not None:
            checkpoint()
        parts.append(search(inner, sample.rows[start : start + SEARCH_ROWS], k + 1, ef))
    found_d, found = without_self(
        np.vstack([d for d, _ in parts]), np.vstack([i for _, i in parts]), sample.positions, k
    )
    return tie_aware_hits(truth_d, found_d, found, metric) / float(truth_d.size)


def search(
    inner: Any, queries: np.ndarray, k: int, ef_search: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distances and row positions found by the HNSW ``inner`` at ``ef_search``."""
    if isinstance(inner, faiss.IndexBinary):
        saved = inner.hnsw.efSearch
        inner.hnsw.efSearch = ef_search
        try:
            distances, labels = inner.search(queries, k)
        finally:
            inner.hnsw.efSearch = saved
    else:
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef_search
        distances, labels = inner.search(queries, k, params=params)
    return np.asarray(distances), np.asarray(labels, dtype=np.int64)


def hits(truth: np.ndarray, found: np.ndarray) -> int:
    """Found ids that are among the true ids, summed over queries."""
    return sum(
        len(set(t.tolist()) & set(f.tolist()) - {-1}) for t, f in zip(truth, found, strict=True)
    )


def check(
    request: BuildRequest,
    index: Any,
    sample: QuerySample,
    notes: BuildNotes | None = None,
    k: int = K,
    checkpoint: Checkpoint | None = None,
) -> QualityReport:
    """The quality report of a finished ``index`` (the workflow's step after the build).

    ``checkpoint`` (the job's cancel and time-limit check) runs between batches.
    """
    notes = notes or BuildNotes()
    started = time.perf_counter()
    recall = sample_recall(
        index, sample, k, request.ef_search, metric_of(request.space_type), checkpoint
    )
    report = QualityReport(
        recall=round(recall, 6),
        k=min(k, max(request.doc_count - 1, 0)),
        ef_search=request.ef_search,
        sample_size=len(sample.positions),
        seconds=round(time.perf_counter() - started, 6),
        build_mode=notes.mode,
        requested_mode=notes.requested_mode,
        fallback=notes.fallback,
        mode_reason=notes.reason,
        pilot=notes.pilot,
        device=notes.device,
        build_path=notes.path,
        assembly=notes.assembly,
        vectors_in_file=not request.skip_stored_vectors,
    )
    log.info(
        "index quality: %s",
        report.summary(),
        extra={"recall": report.recall, "data_type": request.data_type.value},
    )
    return report


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Row positions of the true k nearest neighbours."""
    if metric == "hamming":
        index: Any = faiss.IndexBinaryFlat(base.shape[1] * 8)
    elif metric == "innerproduct":
        index = faiss.IndexFlatIP(base.shape[1])
    else:
        index = faiss.IndexFlatL2(base.shape[1])
    index.add(base if metric == "hamming" else base.astype(np.float32))
    _, positions = index.search(queries if metric == "hamming" else queries.astype(np.float32), k)
    return np.asarray(positions)


def recall_at_k(
    index: Any,
    base: np.ndarray,
    doc_ids: np.ndarray,
    queries: np.ndarray,
    metric: str,
    k: int = 10,
) -> float:
    """Recall@k of ``index`` (returning doc ids) against exact search over ``base``."""
    truth = doc_ids[exact_neighbours(base, queries, k, metric)]
    q = queries if metric == "hamming" else queries.astype(np.float32)
    _, found = index.search(q, k)
    return float(hits(truth, found)) / float(truth.size)
