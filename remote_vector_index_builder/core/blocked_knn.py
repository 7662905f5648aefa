"""Approximate kNN graphs on the CPU by blocked GEMM: the input of ``core.graph_assembly``
for segments too large for the exact graph (``knn_graph.exact_knn``).

HNSW insertion computes each distance by a random gather (about 170 ns at 384-d
here); a BLAS GEMM computes one for about 14 ns. So the graph's candidates come
from GEMMs over blocks of nearby rows:

1. **build space**: the stored rows (decoded to fp32), centred and projected on
   their principal axes, as many as keep ``RETAINED_VARIANCE`` of the variance
   (a multiple of 16, fitted on a seeded sample). L2 in this space ranks pairs
   as L2 does, and as inner product does over rows of one length (cosine sends
   unit vectors: ``|a - b|^2 = 2 - 2 a.b``);
2. **clusters**: k-means (``faiss.Kmeans``, on a sample) into clusters of about
   ``CLUSTER_ROWS``; a cluster over ``SPLIT_FACTOR`` times that is split by a
   k-means of its own (raw L2 embeddings have a few huge clusters, whose GEMMs
   would cost their size squared);
3. **blocks**: each row belongs to its nearest cluster and probes its
   ``nprobe`` nearest; per cluster one ``faiss.knn`` of every row probing it
   against its members, merged into each row's running ``k`` best.

The assembly then ranks and selects the candidates by the storage's own
distances, so the projection decides only which rows are candidates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.knn_graph import KnnGraph, StoredRows, of_one_length
from remote_vector_index_builder.core.params import BuildRequest, SpaceType

log = logging.getLogger(__name__)

# Share of the variance the build space keeps (MiniLM: 176-192 of 384 axes).
RETAINED_VARIANCE = 0.9
# Rows of the seeded sample the principal axes and the k-means are fitted on.
SAMPLE_ROWS = 20000
# Target rows per cluster (one GEMM of its probing rows against it), and the size
# over which a cluster is split.
CLUSTER_ROWS = 1000
SPLIT_FACTOR = 2
KMEANS_ITERATIONS = 8
# Sample rows per centroid the k-means trains on (Faiss's default is 256).
KMEANS_POINTS_PER_CENTROID = 128
# Rows of the build space projected per block (its fp32 decode is that many rows).
PROJECT_ROWS = 16384
SEED = 1234


@dataclass(frozen=True)
class BlockedParams:
    """``k`` candidates per row, from its ``nprobe`` nearest clusters."""

    k: int
    nprobe: int
    refine_rounds: int = 0
    refine_fan: int = 8
    cluster_rows: int = CLUSTER_ROWS


@dataclass(frozen=True)
class BlockedRule:
    """Which segments the CPU builds from a blocked kNN graph, and with what parameters.

    A segment qualifies with at least ``min_rows`` rows (None: none does), a data
    type in ``data_types``, and L2, or inner product over rows of one length
    (cosine): the build space ranks pairs by L2. Everything else is built by
    insertion.
    """

    min_rows: int | None
    data_types: frozenset[DataType]
    candidates_per_m: int
    nprobe: int
    refine_rounds: int
    refine_fan: int = 8
    cluster_rows: int = CLUSTER_ROWS

    def params(self, m: int) -> BlockedParams:
        return BlockedParams(
            self.candidates_per_m * m,
            self.nprobe,
            self.refine_rounds,
            self.refine_fan,
            self.cluster_rows,
        )

    def admits(self, request: BuildRequest, dataset: Dataset) -> bool:
        if self.min_rows is None or dataset.count < self.min_rows:
            return False
        if request.data_type not in self.data_types:
            return False
        if request.space_type is SpaceType.L2:
            return True
        if request.space_type is not SpaceType.INNER_PRODUCT:
            return False
        return of_one_length(batch for _, batch in dataset.batches(BATCH_ROWS))


# Rows per block of the equal-length check over the downloaded vectors.
BATCH_ROWS = 16384
DEFAULT_RULE = BlockedRule(
    min_rows=None,
    data_types=frozenset({DataType.FLOAT, DataType.HALF_FLOAT, DataType.BYTE}),
    candidates_per_m=3,
    nprobe=4,
    refine_rounds=1,
)


@dataclass
class BlockedStats:
    dim: int = 0
    clusters: int = 0
    split: int = 0
    distances_per_row: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "build_dim": self.dim,
            "clusters": self.clusters,
            "split_clusters": self.split,
            "distances_per_row": round(self.distances_per_row, 1),
        }


def _sample(n: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return np.sort(rng.choice(n, min(n, rows), replace=False))


def principal_axes(sample: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, d x d' axes) keeping ``share`` of ``sample``'s variance, d' a multiple of 16."""
    d = int(sample.shape[1])
    mean = sample.mean(axis=0, dtype=np.float64)
    centred = sample - mean.astype(np.float32)
    moment = (centred.T @ centred).astype(np.float64)
    values, vectors = np.linalg.eigh(moment)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0.0, None)
    total = max(float(values.sum()), np.finfo(np.float64).tiny)  # identical rows: no variance
    dim = int(np.searchsorted(np.cumsum(values) / total, share) + 1)
    dim = min(d, -(-min(dim, d) // 16) * 16)
    axes = np.ascontiguousarray(vectors[:, order[:dim]], dtype=np.float32)
    return mean.astype(np.float32), axes


def build_space(rows: StoredRows, share: float = RETAINED_VARIANCE) -> np.ndarray:
    """``n x d'`` fp32: the stored rows centred and projected (step 1 of the module doc)."""
    mean, axes = principal_axes(rows.take(_sample(rows.n, SAMPLE_ROWS)), share)
    space = np.empty((rows.n, axes.shape[1]), dtype=np.float32)
    for start in range(0, rows.n, PROJECT_ROWS):
        stop = min(rows.n, start + PROJECT_ROWS)
        block = rows.take(np.arange(start, stop))
        block -= mean
        np.matmul(block, axes, out=space[start:stop])
    return space


def _kmeans(points: np.ndarray, clusters: int) -> np.ndarray:
    d = int(points.shape[1])
    if clusters <= 1 or len(points) <= clusters:
        return np.ascontiguousarray(points[:1] if clusters <= 1 else points, dtype=np.float32)
    km = faiss.Kmeans(
        d,
        clusters,
        niter=KMEANS_ITERATIONS,
        seed=SEED,
        max_points_per_centroid=KMEANS_POINTS_PER_CENTROID,
        spherical=False,
    )
    km.train(np.ascontiguousarray(points))
    centroids: np.ndarray = km.centroids
    return centroids


def cluster_centres(space: np.ndarray, cluster_rows: int = CLUSTER_ROWS) -> tuple[np.ndarray, int]:
    """Centroids of clusters of about ``cluster_rows`` (step 2), and how many were split."""
    n = len(space)
    centroids = _kmeans(space[_sample(n, SAMPLE_ROWS)], max(1, round(n / cluster_rows)))
    _, nearest = faiss.knn(space, centroids, 1)
    sizes = np.bincount(nearest[:, 0], minlength=len(centroids))
    big = np.flatnonzero(sizes > SPLIT_FACTOR * cluster_rows)
    if len(big) == 0:
        return centroids, 0
    parts = [centroids[sizes <= SPLIT_FACTOR * cluster_rows]]
    for cluster in big.tolist():
        members = np.flatnonzero(nearest[:, 0] == cluster)
        members = members[_sample(len(members), SAMPLE_ROWS)]
        parts.append(_kmeans(space[members], -(-int(sizes[cluster]) // cluster_rows)))
    return np.ascontiguousarray(np.concatenate(parts)), len(big)


def blocked_knn(
    rows: StoredRows,
    params: BlockedParams,
    *,
    progress: Callable[[float], None] | None = None,
    stats: BlockedStats | None = None,
) -> KnnGraph:
    """Each stored row's ``params.k`` approximate nearest others (see the module doc).

    ``progress`` gets the share done (0..1) after each cluster.
    """
    # One BLAS thread throughout: every BLAS call here is small or runs beside
    # Faiss's OpenMP team, and two BLAS threads on two busy cores cost 28x the CPU
    # of one for the k-means (MiniLM 29k x 176: 0.85 vs 0.03 CPU-s).
    with threadpool_limits(limits=1, user_api="blas"):
        return _blocked_knn(rows, params, progress, stats or BlockedStats())


def _blocked_knn(
    rows: StoredRows,
    params: BlockedParams,
    progress: Callable[[float], None] | None,
    stats: BlockedStats,
) -> KnnGraph:
    n = rows.n
    k = max(0, min(params.k, n - 1))
    space = build_space(rows)
    stats.dim = int(space.shape[1])
    centroids, stats.split = cluster_centres(space, params.cluster_rows)
    stats.clusters = len(centroids)
    blocks = Blocks.of(space, centroids, params.nprobe)
    del space  # the blocks hold it sorted by cluster
    best_d, best_i, computed = blocks.search(k + 1, progress)
    for _ in range(params.refine_rounds):
        computed += refine(blocks.space, best_d, best_i, params.refine_fan)
    stats.distances_per_row = computed / max(1, n)
    return blocks.graph(best_i, k)


@dataclass
class Blocks:
    """The build space sorted by nearest cluster (each cluster's members one slice), and
    which rows probe each cluster."""

    space: np.ndarray
    order: np.ndarray  # sorted position -> storage position
    bounds: np.ndarray  # cluster c's members: space[bounds[c]:bounds[c + 1]]
    askers: np.ndarray  # sorted positions probing each cluster, grouped by cluster
    ask_bounds: np.ndarray

    @classmethod
    def of(cls, space: np.ndarray, centroids: np.ndarray, nprobe: int) -> Blocks:
        nprobe = max(1, min(nprobe, len(centroids)))
        _, probes = faiss.knn(space, centroids, nprobe)
        order = np.argsort(probes[:, 0], kind="stable")
        probes = probes[order]
        bounds = np.searchsorted(probes[:, 0], np.arange(len(centroids) + 1))
        flat = probes.ravel()
        by_cluster = np.argsort(flat, kind="stable")
        ask_bounds = np.searchsorted(flat[by_cluster], np.arange(len(centroids) + 1))
        return cls(space[order], order, bounds, by_cluster // nprobe, ask_bounds)

    def search(
        self, width: int, progress: Callable[[float], None] | None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Each row's ``width`` nearest among the members of the clusters it probes
        (itself included), by sorted position: (distances, positions, distances computed).

        Clusters are searched by as many threads as the build has, each running
        its GEMMs on one BLAS thread: Faiss runs a ``knn``'s GEMM blocks one after
        another with BLAS's own threads beside its OpenMP team, which on two cores
        spent 2.6x the CPU of the GEMM alone (numpy's GEMM: 60 GFLOP per CPU-s,
        ``faiss.knn`` at k 49: 18 with two BLAS threads, 26 with one).
        """
        n, clusters = len(self.space), len(self.bounds) - 1
        best_d = np.full((n, width), np.inf, dtype=np.float32)
        best_i = np.full((n, width), -1, dtype=np.int64)
        lock = threading.Lock()
        done = [0, 0]  # clusters, distances
        stop = threading.Event()  # a worker failed (or progress cancelled): the rest stop

        def one(cluster: int) -> None:
            lo, hi = int(self.bounds[cluster]), int(self.bounds[cluster + 1])
            askers = self.askers[self.ask_bounds[cluster] : self.ask_bounds[cluster + 1]]
            if hi > lo and len(askers):
                found_d, found_i = faiss.knn(
                    self.space[askers], self.space[lo:hi], min(width, hi - lo)
                )
                found_i += lo
                if found_d.shape[1] < width:
                    pad = ((0, 0), (0, width - found_d.shape[1]))
                    found_d = np.pad(found_d, pad, constant_values=np.inf)
                    found_i = np.pad(found_i, pad, constant_values=-1)
                with lock:
                    merged_d, merged_i = faiss.merge_knn_results(
                        np.stack([best_d[askers], found_d]), np.stack([best_i[askers], found_i])
                    )
                    best_d[askers], best_i[askers] = merged_d, merged_i
            with lock:
                done[0] += 1
                done[1] += len(askers) * (hi - lo)
                if progress is not None:
                    progress(done[0] / clusters)

        threads = max(1, min(clusters, faiss.omp_get_max_threads()))

        def worker(first: int) -> None:
            faiss.omp_set_num_threads(1)  # per thread: this one's GEMMs run alone
            try:
                for cluster in range(first, clusters, threads):
                    if stop.is_set():
                        return
                    one(cluster)
            except BaseException:
                stop.set()
                raise

        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(worker, t) for t in range(threads)]
        for future in futures:
            future.result()  # the first failure, once every worker has stopped
        return best_d, best_i, done[1]

    def graph(self, best_i: np.ndarray, k: int) -> KnnGraph:
        """Sorted positions back to storage positions, each row's own position dropped."""
        n = len(self.order)
        ids = np.where(best_i >= 0, self.order[np.maximum(best_i, 0)], -1)
        rank = np.empty(n, dtype=np.int64)
        rank[self.order] = np.arange(n)
        ids = ids[rank]
        keep = ids != np.arange(n)[:, None]
        keep[keep.all(axis=1), -1] = False
        return KnnGraph(ids[keep].reshape(n, k))


REFINE_ROWS = 4096


def _fresh(nodes: np.ndarray, own: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per row, the distinct ``cand`` ids that are neither the row nor in ``own``, in
    ascending order at the front (int64, ``-1`` pads, as wide as the widest row)."""
    big = np.int64(1) << 40
    both = np.concatenate([own, cand], axis=1).astype(np.int64)
    # key = id * 2 + (1 for a candidate): a candidate sorts right after an own copy of itself.
    key = np.where(both >= 0, both, big) * 2
    key[:, own.shape[1] :] += 1
    key[both == nodes[:, None]] = 2 * big + 1
    key.sort(axis=1)
    ids = key >> 1
    first = np.ones(key.shape, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    new = first & ((key & 1) == 1) & (ids < big)
    out = np.where(new, ids, big)
    out.sort(axis=1)
    wide = int(new.sum(axis=1).max()) if len(out) else 0
    out = out[:, :wide]
    out[out == big] = -1
    return np.ascontiguousarray(out)


def refine(space: np.ndarray, best_d: np.ndarray, best_i: np.ndarray, fan: int) -> int:
    """One join round: each row's candidates gain its ``fan`` nearest's ``fan`` nearest
    (neighbours of neighbours are often neighbours), merged in place. Returns the
    distances computed."""
    n, width = best_i.shape
    d = int(space.shape[1])
    computed = 0
    for start in range(0, n, REFINE_ROWS):
        stop = min(n, start + REFINE_ROWS)
        nodes = np.arange(start, stop)
        near = best_i[start:stop, 1 : fan + 1]
        cand = np.where(near[:, :, None] >= 0, best_i[np.maximum(near, 0), 1 : fan + 1], -1)
        own = best_i[start:stop]
        fresh = _fresh(nodes, own, cand.reshape(len(nodes), -1))
        wide = fresh.shape[1]
        if wide == 0:
            continue
        computed += int((fresh >= 0).sum())
        query = np.ascontiguousarray(space[start:stop])
        vals = np.empty((len(nodes), width), dtype=np.float32)
        ids = np.empty((len(nodes), width), dtype=np.int64)
        faiss.knn_L2sqr_by_idx(
            faiss.swig_ptr(query),
            faiss.swig_ptr(space),
            faiss.swig_ptr(fresh),
            d,
            len(nodes),
            n,
            wide,
            width,
            faiss.swig_ptr(vals),
            faiss.swig_ptr(ids),
            wide,
        )
        merged_d, merged_i = faiss.merge_knn_results(
            np.stack([best_d[start:stop], vals]), np.stack([own, ids])
        )
        best_d[start:stop], best_i[start:stop] = merged_d, merged_i
    return computed
