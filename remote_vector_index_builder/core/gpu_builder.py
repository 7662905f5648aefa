"""Faiss CAGRA on the GPU, converted on the host to a CAGRA-typed HNSW.

The parameters follow the reference service (docs/knn-contract.md, section 6).

::

    cagra_params(request)        pure; rejects what cuVS would fail or hang on, before any GPU work
    GpuIndex[Binary]Cagra.train  kNN graph + pruning on the GPU, in one call
    copyTo(Index[Binary]HNSWCagra)  on the host: CAGRA graph -> HNSW level 0, vectors -> storage
    Index[Binary]IDMap           doc ids in blob order

When the GPU build raises and a fallback builder is given, that builder builds instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import faiss
import numpy as np

from remote_vector_index_builder.core.builder import (
    FaissIndex,
    IndexBuilder,
    Progress,
    faiss_metric,
    gpu_available,
)
from remote_vector_index_builder.core.dataset import Dataset, ids_as_int64, to_fp16
from remote_vector_index_builder.core.errors import BuildError, GpuUnavailableError
from remote_vector_index_builder.core.params import BuildRequest, DataType

log = logging.getLogger(__name__)


class NumericType(StrEnum):  # element type handed to the GPU; values name Faiss constants
    FLOAT32 = "Float32"
    FLOAT16 = "Float16"
    INT8 = "Int8"
    UINT8_BITS = "uint8 bits"  # packed binary codes: GpuIndexBinaryCagra takes no numeric type


class GraphBuildAlgo(StrEnum):  # how cuVS builds the kNN graph it prunes; Faiss constants
    IVF_PQ = "graph_build_algo_IVF_PQ"
    NN_DESCENT = "graph_build_algo_NN_DESCENT"


@dataclass(frozen=True)
class IvfPqParams:
    n_lists: int
    pq_dim: int
    pq_bits: int = 8
    kmeans_n_iters: int = 20
    kmeans_trainset_fraction: float = 0.1
    n_probes: int = 5
    refine_rate: float = 1.0


@dataclass(frozen=True)
class CagraParams:
    """Everything the GPU build needs; constructing one checks what cuVS would reject."""

    dimension: int  # bits for binary data
    doc_count: int
    metric: int | None  # None for binary: binary CAGRA is always Hamming
    numeric_type: NumericType
    graph_degree: int
    # Stock Faiss widens this to 1.5 x graph_degree when the two are equal on the IVF-PQ path
    # (CuvsCagra::train), so at m=16 cuVS prunes 96 candidates per vector down to 64. We do not
    # counter it: stock Faiss cannot be asked for "equal" (any other value is passed verbatim,
    # so countering means picking an unbenchmarked number), and with equal degrees CAGRA's
    # pruning has no candidates to drop. The cost is graph_degree / 2 more uint32 entries per
    # vector in the kNN graph cuVS keeps in host memory (1.3 GB per 10M vectors at m=16).
    # Binary CAGRA passes both degrees to cuVS verbatim.
    intermediate_graph_degree: int
    build_algo: GraphBuildAlgo
    ivf_pq: IvfPqParams | None
    ef_construction: int
    ef_search: int
    nn_descent_niter: int = 20
    # No upper HNSW levels: search starts from random level-0 entry points (IHc2/IBHc flag).
    base_level_only: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        # cuVS shrinks the degrees (a log warning) for segments smaller than the graph, and the
        # conversion is known to hang for 3-4 vectors: segments this small belong on the CPU.
        if self.graph_degree >= self.doc_count:
            problems.append(f"graph degree {self.graph_degree} (4 x m) is not below doc_count")
        pq = self.ivf_pq
        if pq is not None and not 1 <= pq.pq_dim <= self.dimension:
            problems.append(f"IVF-PQ pq_dim {pq.pq_dim} is not in [1, dimension {self.dimension}]")
        if pq is not None and not 1 <= pq.n_lists <= self.doc_count:
            problems.append(f"IVF-PQ n_lists {pq.n_lists} is not in [1, doc_count]")
        if problems:
            raise BuildError(
                f"cannot build {self.doc_count} vectors with CAGRA: " + "; ".join(problems)
            )

    @property
    def hnsw_m(self) -> int:  # copyTo gives HNSW level 0 2 x M links: the whole CAGRA graph
        return self.graph_degree // 2

    @property
    def effective_intermediate_graph_degree(self) -> int:
        widened = self.build_algo is GraphBuildAlgo.IVF_PQ
        if widened and self.intermediate_graph_degree == self.graph_degree:
            return int(1.5 * self.graph_degree)
        return self.intermediate_graph_degree


_NUMERIC_TYPES = {
    DataType.FLOAT: NumericType.FLOAT32,
    DataType.HALF_FLOAT: NumericType.FLOAT16,
    DataType.BYTE: NumericType.INT8,
    DataType.BINARY: NumericType.UINT8_BITS,
}


def cagra_params(request: BuildRequest) -> CagraParams:
    binary = request.data_type is DataType.BINARY
    n_lists = max(1, int(math.sqrt(request.doc_count)))
    ivf_pq = IvfPqParams(
        n_lists=n_lists,
        pq_dim=max(1, request.dimension // 4),
        # cuVS cannot probe more lists than exist; only tiny segments are affected.
        n_probes=min(5, n_lists),
    )
    return CagraParams(
        dimension=request.dimension,
        doc_count=request.doc_count,
        metric=None if binary else faiss_metric(request.space_type),
        numeric_type=_NUMERIC_TYPES[request.data_type],
        graph_degree=4 * request.m,
        intermediate_graph_degree=4 * request.m,
        build_algo=GraphBuildAlgo.NN_DESCENT if binary else GraphBuildAlgo.IVF_PQ,
        ivf_pq=None if binary else ivf_pq,
        ef_construction=request.ef_construction,
        ef_search=request.ef_search,
    )


def _api(name: str) -> Any:
    """A Faiss symbol the CAGRA path needs; faiss-cpu and old Faiss builds lack some."""
    try:
        return getattr(faiss, name)
    except AttributeError as exc:
        raise GpuUnavailableError(
            f"this Faiss build has no {name}: install the gpu extra (Faiss with cuVS)"
        ) from exc


def _set(obj: Any, **fields: Any) -> None:
    for name, value in fields.items():
        try:
            setattr(obj, name, value)  # SWIG proxies refuse unknown fields with AttributeError
        except AttributeError as exc:
            raise BuildError(
                f"this Faiss build's {type(obj).__name__} has no field {name!r}; "
                "it predates the CAGRA options this service sets"
            ) from exc


def _host_rows(params: CagraParams, dataset: Dataset) -> np.ndarray:
    """The array train() gets: C-contiguous, of the exact dtype, so Faiss uses it without a copy."""
    if params.numeric_type is NumericType.FLOAT16:
        return to_fp16(dataset.vectors)  # we keep no reference to the fp32 view after this
    dtype = {
        NumericType.FLOAT32: np.float32,
        NumericType.INT8: np.int8,
        NumericType.UINT8_BITS: np.uint8,
    }[params.numeric_type]
    rows = np.ascontiguousarray(dataset.vectors, dtype=dtype)
    if params.numeric_type is NumericType.INT8 and not rows.flags.writeable:
        rows = rows.copy()  # copyTo shifts int8 rows by +128 in place to encode them, then back
    return rows


class _CagraSession:
    """Owns the GPU objects of one build and the host memory they point into.

    SWIG ownership and lifetimes, all of them in one place:

    - ``GpuIndexCagraConfig`` is copied by value into the index; its IVF-PQ sub-configs are
      ``shared_ptr`` on both sides (``%shared_ptr`` in Faiss's SWIG file). All are held here
      anyway, so nothing depends on that.
    - The GPU index keeps a raw pointer to the host rows given to ``train`` (cuVS's dataset
      ``storage_``) and ``copyTo`` reads the vectors back through it: that exact array must live
      until ``copyTo`` returns. Faiss's Python ``train`` passes a C-contiguous array of the right
      dtype through unchanged (anything else would become a temporary freed on return), which is
      what ``_host_rows`` produces; the session holds it.
    - On exit the GPU index goes first (it frees the cuVS graph and device dataset, and holds
      its own reference to the resources' implementation), then the resources (streams, cuBLAS
      handle, temporary memory), then the host rows and configs.
    - The HNSW target is not the session's: its ID map owns it in C++ (``own_fields``), so
      ``_id_map`` disowns the Python proxy, or both would delete it. Faiss's Python layer also
      keeps that proxy referenced from the ID map; it is harmless once disowned.
    """

    def __init__(self, device: int) -> None:
        self.device = device
        self._held: list[Any] = []
        self._resources: Any = None
        self._index: Any = None

    def __enter__(self) -> _CagraSession:
        self._resources = _api("StandardGpuResources")()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._index = None
        self._resources = None
        self._held.clear()

    def train(self, params: CagraParams, rows: np.ndarray) -> None:
        config = _api("GpuIndexCagraConfig")()
        self._held += [rows, config]
        _set(
            config,
            device=self.device,
            graph_degree=params.graph_degree,
            intermediate_graph_degree=params.intermediate_graph_degree,
            build_algo=_api(params.build_algo.value),
            nn_descent_niter=params.nn_descent_niter,
        )
        if params.ivf_pq is None:
            # Faiss's binary CAGRA builds its kNN graph with cuVS's iterative search whatever
            # build_algo says (Hamming supports nothing else); NN-descent is recorded for intent.
            self._index = _api("GpuIndexBinaryCagra")(self._resources, params.dimension, config)
            self._index.train(rows)
            return
        pq = params.ivf_pq
        build, search = _api("IVFPQBuildCagraConfig")(), _api("IVFPQSearchCagraConfig")()
        self._held += [build, search]
        _set(
            build,
            n_lists=pq.n_lists,
            pq_dim=pq.pq_dim,
            pq_bits=pq.pq_bits,
            kmeans_n_iters=pq.kmeans_n_iters,
            kmeans_trainset_fraction=pq.kmeans_trainset_fraction,
        )
        _set(search, n_probes=pq.n_probes)
        _set(config, ivf_pq_params=build, ivf_pq_search_params=search, refine_rate=pq.refine_rate)
        self._index = _api("GpuIndexCagra")(
            self._resources, params.dimension, params.metric, config
        )
        if params.numeric_type is NumericType.FLOAT32:
            self._index.train(rows)
        else:
            self._index.train(rows, numeric_type=_api(params.numeric_type.value))

    def copy_to(self, target: FaissIndex) -> None:
        self._index.copyTo(target)


def _hnsw_target(params: CagraParams) -> FaissIndex:
    if params.ivf_pq is None:
        return _api("IndexBinaryHNSWCagra")(params.dimension, params.hnsw_m)
    target = _api("IndexHNSWCagra")(params.dimension, params.hnsw_m, params.metric)
    # Before copyTo: it then copies level 0 only instead of inserting every vector on the CPU,
    # and fp16/int8 conversions accept nothing else.
    target.base_level_only = params.base_level_only
    return target


def _finish_hnsw(inner: FaissIndex, params: CagraParams) -> None:
    # Binary: only now, because the binary copyTo adds through IndexBinaryHNSWCagra.add, which
    # refuses base_level_only (that copyTo also inserts upper levels on the CPU, unused).
    inner.base_level_only = params.base_level_only
    inner.hnsw.efConstruction = params.ef_construction
    inner.hnsw.efSearch = params.ef_search


def _id_map(inner: FaissIndex, binary: bool) -> FaissIndex:
    """Wrap the still empty ``inner`` (ID maps refuse non-empty indexes); see _CagraSession."""
    index = faiss.IndexBinaryIDMap(inner) if binary else faiss.IndexIDMap(inner)
    index.own_fields = True
    inner.thisown = False
    return index


def _attach_ids(index: FaissIndex, ids: np.ndarray) -> None:
    """Give the ID map the doc ids of vectors the inner index already holds (no re-add)."""
    held = int(index.index.ntotal)
    if ids.shape[0] != held:
        raise BuildError(f"the converted HNSW holds {held} vectors but {ids.shape[0]} doc ids")
    faiss.copy_array_to_vector(ids, index.id_map)
    index.ntotal = held


class GpuBuilder:
    name = "gpu"

    def __init__(self, fallback: IndexBuilder | None = None, device: int = 0) -> None:
        self.fallback = fallback
        self.device = device

    def prepare(self, request: BuildRequest) -> None:
        """The GPU allocates during ``train``; nothing to set up before the download."""

    def build(
        self,
        request: BuildRequest,
        dataset: Dataset,
        progress: Progress | None = None,
        prepared: Any = None,
    ) -> FaissIndex:
        # CAGRA builds in one call with no progress callback: a cancellation is observed
        # only before the GPU starts and after the conversion.
        if progress is not None:
            progress(0)
        try:
            index = self._build_on_gpu(request, dataset)
        except BuildError as exc:
            if self.fallback is None:
                raise
            log.warning(
                "GPU build failed, using the %s builder instead: %s", self.fallback.name, exc
            )
            return self.fallback.build(request, dataset, progress)
        if progress is not None:
            progress(request.doc_count)
        return index

    def _build_on_gpu(self, request: BuildRequest, dataset: Dataset) -> FaissIndex:
        params = cagra_params(request)
        if not gpu_available():
            raise GpuUnavailableError("Faiss reports no CUDA GPU with CAGRA (cuVS) support")
        binary = params.ivf_pq is None
        # skip_stored_vectors needs nothing here: the inner index is IndexHNSWCagra either way
        # and index_io writes it without storage.
        try:
            with _CagraSession(self.device) as session:
                session.train(params, _host_rows(params, dataset))
                inner = _hnsw_target(params)
                index = _id_map(inner, binary)
                session.copy_to(inner)
            _finish_hnsw(inner, params)
            _attach_ids(index, ids_as_int64(dataset.doc_ids))
        except (RuntimeError, MemoryError) as exc:
            raise BuildError(
                f"Faiss CAGRA failed on GPU {self.device} for {request.doc_count} x "
                f"{request.dimension} {request.data_type.value} vectors: {exc}"
            ) from exc
        log.info("CAGRA built %d vectors with %s", request.doc_count, params)
        return index
