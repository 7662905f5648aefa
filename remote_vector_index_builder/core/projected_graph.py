"""The fast CPU build: the HNSW graph built on a reduced representation of the vectors.

Faiss's HNSW insertion spends much of its time in distances over the stored
rows, so the graph is built on fewer bytes: the vectors projected onto their leading
principal axes (as many as keep ``RETAINED_VARIANCE`` of the variance, rounded
up to a multiple of 16; none when that is most of the axes) and quantized to
8 bits per axis (``IndexHNSWSQ`` QT_8bit). The finished graph - every level, its
entry point - is then copied into the standard index of the request's data
type (``IndexHNSWFlat`` / ``IndexHNSWSQ`` fp16 / 8-bit direct signed), whose
storage holds the stored vectors, so the file is what the data node reads
today; only the graph's edges differ.

Order, for the memory promise: the storage is filled first, from the downloaded
blob, batch by batch, handing the blob's pages back as in the standard build;
the graph is then built from the storage (viewed in place, or decoded a batch
at a time), so only the n x d' 8-bit codes are extra, never a second copy.

Both modes first check that 8-bit codes keep near neighbours apart
(``MAX_CODE_NOISE``); where they would not (clusters far tighter than their
spread), the standard build runs. ``auto`` then decides with a pilot: a
seeded sample built both ways, compared on recall@10 over several
``ef_search`` values; the fast graph is used only where it is at least as good
as the standard one on the pilot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from remote_vector_index_builder.core import quality
from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.index_builder import (
    FaissIndex,
    Progress,
    checked_m,
    faiss_metric,
    fill_storage,
)
from remote_vector_index_builder.core.params import BuildRequest, SpaceType

log = logging.getLogger(__name__)

# Share of the neighbour-difference variance the ``fast`` mode's projection keeps;
# ``auto`` tries the smaller ones too, smallest first, and keeps the first its
# pilot accepts (benchmarks/build_modes.py). 0.9: MiniLM 29k x 384 (cosine) kept
# 192 axes and built in 8.2 CPU-s, against 9.6 for 0.95 (240 axes) and 8.5 for 0.8
# (144), all within 0.1 point of the standard build's recall@10 at ef 100
# (benchmarks/README.md, "Graph-first builds").
RETAINED_VARIANCE = 0.9
AUTO_RETAINED_VARIANCES = (0.8, 0.9)
# The graph's 8-bit codes may blur distances by at most this share of the typical
# squared distance between sampled nearest neighbours: each axis's code step is
# its range / 255, and two rows' codes differ by step^2 / 6 per axis on average.
# Clusters much tighter than their spacing break it (300 clusters of spread 0.05
# 10 apart: 2.1, fast recall@10 0.84 vs 0.95); real embeddings and the synthetic
# sets sit at 1e-4 to 4e-4 (benchmarks/README.md).
MAX_CODE_NOISE = 0.01
# Above this share of the dimensions, projecting saves too little: 8-bit codes of
# every dimension instead.
MAX_PROJECTED_SHARE = 0.75
MIN_PROJECTED_DIM = 32
# Rows the projection is fitted on (and the pilot drawn from).
PCA_ROWS = 4000
# A sample covariance of fewer rows than a few times the dimension spreads its
# eigenvalues (Marchenko-Pastur): 1000 difference rows of isotropic 768-d noise
# "kept 95 %" in 512 axes. Below this many rows per dimension: no projection.
MIN_ROWS_PER_DIM = 4
# Pilot: rows built both ways, rows searched in it, and the recall margin the fast
# graph may trail by (two builds' recalls on 200 x 10 results differ by about this
# much from seed to seed alone).
PILOT_MIN_ROWS = 2000
PILOT_SHARE = 0.04
PILOT_QUERIES = 200
PILOT_TOLERANCE = 0.002
# ``auto`` builds smaller segments the standard way: fitting the projection and
# the pilot cost about as much as a standard build of ~5k rows, more than the
# fast graph saves below ~20k (benchmarks/build_modes.py: cohere-1k).
AUTO_MIN_ROWS = 20000
# Rows decoded and projected per graph ``add``.
GRAPH_ROWS = 8192
SEED = 1234


@dataclass(frozen=True)
class Projection:
    """Rows @ ``matrix`` (d x d'), or the rows themselves when ``matrix`` is None."""

    matrix: np.ndarray | None
    retained: float
    dim: int

    def apply(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.matrix is None:
            return rows
        return np.ascontiguousarray(rows @ self.matrix)


@dataclass(frozen=True)
class Spectrum:
    """Principal axes of the differences between near neighbours, by decreasing variance."""

    axes: np.ndarray | None  # d x d; None when the sample is too small to trust
    shares: np.ndarray  # shares[i]: variance share of the first i + 1 axes
    # Median squared distance from a sampled row to its nearest other sampled row.
    neighbour_distance: float = 0.0

    def dim_for(self, share: float) -> int | None:
        """Axes keeping ``share`` (a multiple of 16), or None when projecting saves too little."""
        if self.axes is None:
            return None
        d = int(self.axes.shape[0])
        dim = int(np.searchsorted(self.shares, share) + 1)
        dim = max(MIN_PROJECTED_DIM, -(-dim // 16) * 16)
        return None if dim > MAX_PROJECTED_SHARE * d else dim

    def projection(self, dim: int | None, d: int) -> Projection:
        if dim is None or self.axes is None:
            return Projection(None, 1.0, d)
        matrix = np.ascontiguousarray(self.axes[:, :dim], dtype=np.float32)
        return Projection(matrix, float(self.shares[dim - 1]), dim)


def neighbour_spectrum(sample: np.ndarray, space_type: SpaceType) -> Spectrum:
    """Principal axes of the differences between each sampled row and its nearest other one.

    A graph needs the ranking of near candidates right, and that depends on
    how neighbours differ, not on how the data spreads overall: on clustered
    data the cluster centres hold most of the global variance, and a global
    PCA keeping 90 % of it kept 64 of 768 axes and lost recall (0.99 -> 0.77 at
    50k x 768, the clustered set of benchmarks/build_modes.py, built once with a
    global-PCA version of this function). Projecting onto these axes is a
    rotation plus truncation, which keeps L2 distances and inner products up
    to the dropped share.
    """
    d = int(sample.shape[1])
    x = np.ascontiguousarray(sample, dtype=np.float32)
    _, nearest = faiss.knn(x, x, min(2, len(x)), faiss_metric(space_type))
    own = np.arange(len(x))
    other = np.where(nearest[:, 0] == own, nearest[:, -1], nearest[:, 0])
    other = np.where(other < 0, nearest[:, 0], other)
    diff = x - x[other]
    spread = float(np.median(np.einsum("ij,ij->i", diff, diff))) if len(x) else 0.0
    if len(x) < MIN_ROWS_PER_DIM * d:
        return Spectrum(None, np.ones(d), spread)
    # One BLAS thread: the d x d problem is small, and threaded OpenBLAS next to
    # Faiss's spinning OpenMP threads on a busy host took 5x longer.
    with threadpool_limits(limits=1, user_api="blas"):
        moment = (diff.T @ diff).astype(np.float64) / max(1, len(diff))
        values, vectors = np.linalg.eigh(moment)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    total = float(values.sum())
    if total <= 0.0:
        return Spectrum(None, np.ones(d), spread)
    return Spectrum(vectors, np.cumsum(values) / total, spread)


def code_noise(projection: Projection, sample: np.ndarray, spectrum: Spectrum) -> float:
    """How much the graph's 8-bit codes blur distances, as a share of the typical squared
    distance between sampled nearest neighbours (see ``MAX_CODE_NOISE``)."""
    coded = projection.apply(sample)
    if len(coded) == 0:
        return 0.0
    step = (coded.max(axis=0) - coded.min(axis=0)).astype(np.float64) / 255.0
    noise = float((step**2).sum() / 6.0)
    if spectrum.neighbour_distance <= 0.0:
        return 0.0 if noise == 0.0 else float("inf")
    return noise / spectrum.neighbour_distance


def fit_projection(sample: np.ndarray, space_type: SpaceType) -> Projection:
    """The ``fast`` mode's projection: the axes keeping ``RETAINED_VARIANCE``."""
    spectrum = neighbour_spectrum(sample, space_type)
    d = int(sample.shape[1])
    return spectrum.projection(spectrum.dim_for(RETAINED_VARIANCE), d)


def candidates(spectrum: Spectrum, d: int) -> list[Projection]:
    """``auto``'s projections, fewest axes first, ending with every axis (8-bit codes only)."""
    dims = sorted(
        {dim for share in AUTO_RETAINED_VARIANCES if (dim := spectrum.dim_for(share)) is not None}
    )
    return [spectrum.projection(dim, d) for dim in dims] + [Projection(None, 1.0, d)]


def _storage(inner: FaissIndex) -> Any:
    return faiss.downcast_index(inner.storage)


def stored_rows(inner: FaissIndex, start: int, count: int) -> np.ndarray:
    """Rows ``[start, start + count)`` of the storage as float32 (a view where flat)."""
    storage = _storage(inner)
    if isinstance(storage, faiss.IndexFlat):
        whole = faiss.rev_swig_ptr(storage.codes.data(), int(storage.ntotal) * storage.code_size)
        view = whole[start * storage.code_size : (start + count) * storage.code_size]
        rows: np.ndarray = view.view(np.float32).reshape(count, storage.d)
        return rows
    return np.asarray(storage.reconstruct_n(start, count))


def graph_index(request: BuildRequest, projection: Projection, train: np.ndarray) -> FaissIndex:
    """The empty 8-bit HNSW the graph is built in, its quantizer trained on ``train``."""
    graph = faiss.IndexHNSWSQ(
        projection.dim,
        faiss.ScalarQuantizer.QT_8bit,
        checked_m(request.m),
        faiss_metric(request.space_type),
    )
    graph.hnsw.efConstruction = request.ef_construction
    graph.train(projection.apply(train))
    return graph


def transplant(graph: FaissIndex, inner: FaissIndex, request: BuildRequest) -> None:
    """Put ``graph``'s HNSW (all levels, entry point) over ``inner``'s filled storage."""
    inner.hnsw = graph.hnsw  # SWIG assigns by copy
    inner.hnsw.efConstruction = request.ef_construction
    inner.hnsw.efSearch = request.ef_search
    # The search orders candidates by this flag, not by the index's metric.
    inner.hnsw.is_similarity = request.space_type is SpaceType.INNER_PRODUCT
    inner.ntotal = int(_storage(inner).ntotal)


def add_to_graph(
    graph: FaissIndex, inner: FaissIndex, projection: Projection, progress: Progress | None
) -> None:
    """Insert ``inner``'s stored rows, projected, into ``graph`` (progress per batch)."""
    n = int(_storage(inner).ntotal)
    for start in range(0, n, GRAPH_ROWS):
        count = min(GRAPH_ROWS, n - start)
        graph.add(projection.apply(stored_rows(inner, start, count)))
        if progress is not None:
            progress(count)


@dataclass(frozen=True)
class Pilot:
    """A seeded sample of the segment built the standard way, to compare fast graphs with."""

    request: BuildRequest
    rows: np.ndarray
    queries: quality.QuerySample
    ef: tuple[int, ...]
    standard: tuple[float, ...]

    @classmethod
    def build(cls, request: BuildRequest, sample: np.ndarray, new_inner: Any, rows: int) -> Pilot:
        rng = np.random.default_rng(SEED)
        pilot = sample[np.sort(rng.choice(len(sample), min(rows, len(sample)), replace=False))]
        queries = quality.QuerySample.take(pilot, PILOT_QUERIES, seed=SEED)
        k = quality.K
        efs = tuple(sorted({k, 2 * k, max(k, request.ef_search // 2), request.ef_search}))
        standard = new_inner(request)
        standard.add(pilot)
        return cls(request, pilot, queries, efs, cls._curve(request, standard, queries, efs))

    @staticmethod
    def _curve(
        request: BuildRequest, index: Any, queries: quality.QuerySample, efs: tuple[int, ...]
    ) -> tuple[float, ...]:
        metric = quality.metric_of(request.space_type)
        return tuple(quality.sample_recall(index, queries, quality.K, ef, metric) for ef in efs)

    def fast_curve(
        self, projection: Projection, sample: np.ndarray, new_inner: Any
    ) -> tuple[float, ...]:
        fast = new_inner(self.request)
        _storage(fast).add(self.rows)
        graph = graph_index(self.request, projection, sample)
        graph.add(projection.apply(self.rows))
        transplant(graph, fast, self.request)
        return self._curve(self.request, fast, self.queries, self.ef)

    def as_good(self, fast: tuple[float, ...]) -> bool:
        """Fast trails standard by at most the tolerance on average, and twice it at any ef."""
        gaps = [f - s for f, s in zip(fast, self.standard, strict=True)]
        return min(gaps) >= -2 * PILOT_TOLERANCE and sum(gaps) / len(gaps) >= -PILOT_TOLERANCE


def pilot_rows(n: int) -> int:
    return min(n, PCA_ROWS, max(PILOT_MIN_ROWS, int(PILOT_SHARE * n)))


def _rounded(curve: tuple[float, ...]) -> list[float]:
    return [round(r, 4) for r in curve]


def choose_by_pilot(
    request: BuildRequest,
    sample: np.ndarray,
    new_inner: Any,
    n: int,
    details: dict[str, Any],
    spectrum: Spectrum,
) -> Projection | None:
    """The fewest-axes candidate whose pilot graph is as good as the standard one, or None."""
    pilot = Pilot.build(request, sample, new_inner, pilot_rows(n))
    details.update(
        rows=len(pilot.rows), ef_search=list(pilot.ef), recall_standard=_rounded(pilot.standard)
    )
    tried: list[dict[str, Any]] = []
    details["tried"] = tried
    for projection in candidates(spectrum, request.dimension):
        if code_noise(projection, sample, spectrum) > MAX_CODE_NOISE:
            continue
        curve = pilot.fast_curve(projection, sample, new_inner)
        good = pilot.as_good(curve)
        tried.append({"projected_dim": projection.dim, "recall_fast": _rounded(curve), "ok": good})
        if good:
            return projection
    return None


def build(
    request: BuildRequest,
    dataset: Dataset,
    inner: FaissIndex,
    new_inner: Any,
    *,
    auto: bool,
    rows: int,
    notes: quality.BuildNotes,
    progress: Progress | None = None,
) -> bool:
    """Build ``inner`` the fast way, unless ``auto``'s pilot says the standard way is better.

    Returns False, having touched neither ``inner`` nor the dataset, when the pilot
    chose the standard build (the caller then runs it). ``new_inner(request)``
    makes an empty standard inner index (for the pilot). The projection and the
    pilot use a seeded sample copied from the still complete blob.
    """
    if request.data_type.spec.packed_bits:
        raise ValueError("the fast build does not handle binary vectors")
    n = dataset.count
    rng = np.random.default_rng(SEED)
    sample = dataset.vectors[np.sort(rng.choice(n, min(n, PCA_ROWS), replace=False))]
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    details: dict[str, Any] = {}
    notes.pilot = details
    spectrum = neighbour_spectrum(sample, request.space_type)
    widest = spectrum.projection(spectrum.dim_for(RETAINED_VARIANCE), request.dimension)
    noise = code_noise(widest, sample, spectrum)
    details["code_noise"] = round(noise, 6)
    if noise > MAX_CODE_NOISE:
        notes.mode = "standard"
        notes.fallback = True
        notes.reason = (
            f"8-bit codes would blur distances by {noise:.3g} of the typical squared distance "
            f"between near neighbours (at most {MAX_CODE_NOISE}): the vectors are clustered far "
            "tighter than they spread"
        )
        log.info("fast build refused: %s", notes.reason)
        return False
    if auto:
        chosen = choose_by_pilot(request, sample, new_inner, n, details, spectrum)
        if chosen is None:
            notes.mode = "standard"
            notes.fallback = True
            notes.reason = (
                f"pilot on {details['rows']} rows: no fast graph as good as the standard one "
                f"(recall@10 at ef_search {details['ef_search']}: standard "
                f"{details['recall_standard']}, fast "
                + ", ".join(f"{t['projected_dim']}-d {t['recall_fast']}" for t in details["tried"])
                + ")"
            )
            log.info("fast build rejected by its pilot: %s", notes.reason)
            return False
        projection = chosen
    else:
        projection = widest
    details.update(projected_dim=projection.dim, retained_variance=round(projection.retained, 4))
    log.info(
        "fast build: graph on %d of %d dimensions (%.1f %% of the variance), 8-bit codes",
        projection.dim,
        request.dimension,
        100 * projection.retained,
    )
    notes.mode = "fast"
    graph = graph_index(request, projection, sample)
    del sample
    fill_storage(inner, dataset, rows)
    add_to_graph(graph, inner, projection, progress)
    transplant(graph, inner, request)
    return True
