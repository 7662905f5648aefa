"""Faiss CAGRA on the GPU; the index written on the host, as a full HNSW by default.

The parameters follow the reference service (docs/knn-contract.md, section 6).

::

    cagra_params(request)        pure; rejects what cuVS would fail or hang on, before any GPU work
    GpuIndex[Binary]Cagra.train  kNN graph + pruning on the GPU, in one call

then, by ``GpuLayout`` (``RVIB_GPU_INDEX_LAYOUT``):

* ``hnsw`` (default): ``get_knngraph`` (the CAGRA graph, ``4 m`` neighbours per
  vector) is the candidate list of ``core.graph_assembly``, which writes the
  standard CPU build's index (``IndexHNSWFlat`` / ``IndexHNSWSQ`` /
  ``IndexBinaryHNSW``; the CAGRA-typed HNSW for skip-storage) with every level:
  what every k-NN 3.x reads, searched from a hierarchical entry point;
* ``base_level_only``: ``copyTo(Index[Binary]HNSWCagra)`` puts the CAGRA graph into
  level 0 only (``IHc2`` / ``IBHc``), byte for byte the reference service's output
  (OpenSearch 3.2+ reads it; searches start from random level-0 entry points).

Either way the ID map (``Index[Binary]IDMap``) carries the doc ids in blob order.
When the GPU build raises and a fallback builder is given, that builder builds instead
(and the quality report says ``device: cpu``).
Calls that abort the process instead of raising (``GpuIndexBinaryCagra`` on a device Faiss
cannot use) are guarded here by a device check and probed once at start-up in a child
process (core/gpu_probe.py).

Choices taken from the reference service (opensearch-project/remote-vector-index-builder,
``faiss_gpu_index_cagra_builder.py`` and ``ivf_pq_build_cagra_config.py``): ``store_dataset``
off, ``noTempMemory()``, IVF-PQ ``force_random_rotation`` and ``conservative_memory_allocation``
on; each is explained where it is set.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import faiss
import numpy as np

from remote_vector_index_builder.core import graph_assembly
from remote_vector_index_builder.core.data_types import NumericType
from remote_vector_index_builder.core.dataset import Dataset, ids_as_int64, to_fp16
from remote_vector_index_builder.core.errors import BuildError, GpuUnavailableError
from remote_vector_index_builder.core.index_builder import (
    FaissIndex,
    IndexBuilder,
    PreparedIndex,
    Progress,
    ShareProgress,
    checked_m,
    faiss_metric,
    fill_storage,
    gpu_available,
    new_inner_index,
)
from remote_vector_index_builder.core.knn_graph import KnnGraph
from remote_vector_index_builder.core.options import GpuLayout
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.quality import BuildNotes, BuildPath

log = logging.getLogger(__name__)


# Share of a GPU build's progress given to the GPU's graph (the rest is the host's
# assembly): unmeasured here (no GPU was lent), so the two are given equal weight.
_GPU_SHARE = 0.5
# Rows copied into the assembled index's storage per batch (blob pages released behind).
_FILL_ROWS = 32768


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
    host_dtype: np.dtype  # of the rows train() reads (DataTypeSpec.gpu_row_dtype)
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
    # How many random level-0 vectors a base-level-only search samples for its entry point;
    # written into IHc2/IBHc and used by the data node. Faiss's default moved from 32 to 256
    # in IndexHNSWCagra (faiss-cpu/faiss-gpu-cuvs 1.15.1; IndexBinaryHNSWCagra stays 32), so
    # leaving it to Faiss makes the file depend on the release pip resolved. 32 is what the
    # reference service's Faiss (0ca9df47, June 2026) and every release up to 1.15.0 write.
    base_level_search_entrypoints: int = 32

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


def cagra_params(request: BuildRequest) -> CagraParams:
    spec = request.data_type.spec
    binary = spec.packed_bits
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
        numeric_type=spec.cagra_type,
        host_dtype=spec.gpu_row_dtype,
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
    """Set fields of a Faiss config struct, refusing names the struct does not have.

    SWIG proxies of plain structs (``GpuIndexCagraConfig``, ``IVFPQBuildCagraConfig``, ...)
    accept any attribute as a Python-only one that Faiss never reads; only index classes
    refuse unknown names. A SWIG field is a ``property`` of the proxy class, so that is what
    is checked, and scalar values are read back to catch silent narrowing.
    """
    kind = type(obj).__name__
    for name, value in fields.items():
        if not isinstance(getattr(type(obj), name, None), property):
            raise BuildError(
                f"this Faiss build's {kind} has no field {name!r}; install the Faiss release "
                "pinned in the gpu extra"
            )
        try:
            setattr(obj, name, value)
        except (TypeError, OverflowError) as exc:  # SWIG's conversions of wrong values
            raise BuildError(f"{kind}.{name} cannot hold {value!r}: {exc}") from exc
        if isinstance(value, bool | int | float):
            back = getattr(obj, name)
            if not math.isclose(float(back), float(value), rel_tol=1e-6):
                raise BuildError(f"{kind}.{name} was set to {value!r} but reads {back!r}")


def _host_rows(params: CagraParams, dataset: Dataset) -> np.ndarray:
    """The array train() gets: C-contiguous, of the exact dtype, so Faiss uses it without a copy."""
    if params.host_dtype == np.float16:
        return to_fp16(dataset.vectors)  # we keep no reference to the fp32 view after this
    rows = np.ascontiguousarray(dataset.vectors, dtype=params.host_dtype)
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
        resources = _api("StandardGpuResources")()
        # cuVS allocates through RMM, not Faiss's temporary stack: without these Faiss would
        # reserve up to 1.5 GiB of GPU memory and 256 MiB of pinned host memory that the CAGRA
        # build never touches (StandardGpuResources.cpp: kMaxTempMem,
        # kDefaultPinnedMemoryAllocation). The reference service calls noTempMemory() too.
        resources.noTempMemory()
        resources.setPinnedMemory(0)
        self._resources = resources
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._index = None
        self._resources = None
        self._held.clear()

    def train(self, params: CagraParams, rows: np.ndarray) -> None:
        config = self.config(params)
        self._held.append(rows)
        if params.ivf_pq is None:
            # GpuIndexBinaryCagra's constructor enters the device before any check, and a
            # device CUDA cannot use aborts the process there (DeviceScope -> CUDA_VERIFY);
            # GpuIndexCagra's raises "Invalid GPU device" first. Check it the same way here.
            visible = int(_api("get_num_gpus")())
            if self.device >= visible:
                raise GpuUnavailableError(
                    f"Invalid GPU device {self.device}: Faiss sees {visible} GPU(s)"
                )
            self._index = _api("GpuIndexBinaryCagra")(self._resources, params.dimension, config)
            self._index.train(rows)
            return
        self._index = _api("GpuIndexCagra")(
            self._resources, params.dimension, params.metric, config
        )
        if params.numeric_type is NumericType.FLOAT32:
            self._index.train(rows)
        else:
            self._index.train(rows, numeric_type=_api(params.numeric_type.value))

    def config(self, params: CagraParams) -> Any:
        """The ``GpuIndexCagraConfig`` (with its IVF-PQ sub-configs) that ``train`` uses."""
        config = _api("GpuIndexCagraConfig")()
        self._held.append(config)
        _set(
            config,
            device=self.device,
            graph_degree=params.graph_degree,
            intermediate_graph_degree=params.intermediate_graph_degree,
            # Binary CAGRA honours this too: NN-descent with nn_descent_niter iterations and
            # both degrees verbatim (BinaryCuvsCagra::train; it maps IVF-PQ to NN-descent).
            build_algo=_api(params.build_algo.value),
            nn_descent_niter=params.nn_descent_niter,
            # copyTo reads the vectors from the host rows given to train; attaching them to the
            # cuVS index as well would copy the whole dataset onto the GPU for nothing. The
            # reference service sets store_dataset False for the same reason.
            store_dataset=False,
        )
        pq = params.ivf_pq
        if pq is None:
            return config
        build, search = _api("IVFPQBuildCagraConfig")(), _api("IVFPQSearchCagraConfig")()
        self._held += [build, search]
        _set(
            build,
            n_lists=pq.n_lists,
            pq_dim=pq.pq_dim,
            pq_bits=pq.pq_bits,
            kmeans_n_iters=pq.kmeans_n_iters,
            kmeans_trainset_fraction=pq.kmeans_trainset_fraction,
            # Both as in the reference service's IVFPQBuildCagraConfig defaults. A random
            # rotation spreads variance over the PQ subspaces when dimension is a multiple of
            # pq_dim (otherwise cuVS rotates anyway), which is always the case at pq_dim =
            # dimension / 4; conservative allocation sizes the IVF lists exactly instead of
            # padding them for later extends, which this one-shot build never does.
            force_random_rotation=True,
            conservative_memory_allocation=True,
        )
        _set(search, n_probes=pq.n_probes)
        _set(config, ivf_pq_params=build, ivf_pq_search_params=search, refine_rate=pq.refine_rate)
        return config

    def copy_to(self, target: FaissIndex) -> None:
        self._index.copyTo(target)

    def knn_graph(self, n: int) -> KnnGraph:
        """The CAGRA graph on the host: ``n x graph_degree`` neighbour ids (``get_knngraph``)."""
        raw = self._index.get_knngraph()
        flat = raw if isinstance(raw, np.ndarray) else faiss.vector_to_array(raw)
        ids = np.asarray(flat, dtype=np.int64)
        if n == 0 or ids.size % n:
            raise BuildError(f"the CAGRA graph has {ids.size} entries for {n} vectors")
        return KnnGraph(ids.reshape(n, ids.size // n))


def _hnsw_target(params: CagraParams) -> FaissIndex:
    m = checked_m(params.hnsw_m)
    if params.ivf_pq is None:
        target = _api("IndexBinaryHNSWCagra")(params.dimension, m)
    else:
        target = _api("IndexHNSWCagra")(params.dimension, m, params.metric)
    # Before copyTo, for both kinds: copyTo then fills storage and copies the CAGRA graph into
    # level 0 only. Unset, it inserts every vector through add() on the CPU, building upper
    # levels no base-level search uses (binary: since Faiss 1.12 its copyTo honours the flag;
    # fp16/int8 conversions refuse to run without it).
    target.base_level_only = params.base_level_only
    return target


def _finish_hnsw(inner: FaissIndex, params: CagraParams) -> None:
    inner.num_base_level_search_entrypoints = params.base_level_search_entrypoints
    inner.hnsw.efConstruction = params.ef_construction
    inner.hnsw.efSearch = params.ef_search


def _id_map(inner: FaissIndex, binary: bool) -> FaissIndex:
    """Wrap the still empty ``inner`` (ID maps refuse non-empty indexes); see _CagraSession."""
    index = faiss.IndexBinaryIDMap(inner) if binary else faiss.IndexIDMap(inner)
    index.own_fields = True
    inner.thisown = False
    return index


def _finish(index: FaissIndex, inner: FaissIndex, params: CagraParams, ids: np.ndarray) -> None:
    """What follows ``copyTo``: search settings on the HNSW, then the doc ids on its ID map."""
    _finish_hnsw(inner, params)
    _attach_ids(index, ids)


def _attach_ids(index: FaissIndex, ids: np.ndarray) -> None:
    """Give the ID map the doc ids of vectors the inner index already holds (no re-add)."""
    held = int(index.index.ntotal)
    if ids.shape[0] != held:
        raise BuildError(f"the converted HNSW holds {held} vectors but {ids.shape[0]} doc ids")
    faiss.copy_array_to_vector(ids, index.id_map)
    index.ntotal = held


class HostAssemblyError(BuildError):
    """The host's half of a GPU build failed after the vectors were consumed: no fallback."""


def assemble_from_graph(
    request: BuildRequest,
    dataset: Dataset,
    knn: KnnGraph,
    notes: BuildNotes,
    progress: ShareProgress | None = None,
) -> FaissIndex:
    """The host half of the ``hnsw`` layout: the CAGRA graph assembled into the standard
    CPU build's index over the rows of ``dataset`` (whose blob pages are released as the
    storage is filled). ``test_gpu_replay`` runs exactly this with an exact kNN graph."""
    binary = request.data_type.spec.packed_bits
    inner = new_inner_index(request)
    index = _id_map(inner, binary)
    fill_storage(inner, dataset, _FILL_ROWS)
    low = 0.0 if progress is None else progress.reported / max(1, progress.total)

    def advance(done: float) -> None:
        if progress is not None:
            progress.to(low + (1 - low) * done)

    stats = graph_assembly.assemble(inner, knn, request.m, progress=advance)
    _attach_ids(index, ids_as_int64(dataset.doc_ids))
    notes.path = BuildPath.GPU_ASSEMBLY
    notes.assembly = stats.as_dict()
    return index


class GpuBuilder:
    name = "gpu"

    def __init__(
        self,
        fallback: IndexBuilder | None = None,
        device: int = 0,
        layout: GpuLayout = GpuLayout.HNSW,
    ) -> None:
        self.fallback = fallback
        self.device = device
        self.layout = layout

    def prepare(self, request: BuildRequest) -> PreparedIndex:
        """Nothing to allocate before the download (the GPU allocates in ``train``); the
        notes say how the build went, a fallback to the CPU included."""
        return PreparedIndex(None, BuildNotes(requested_mode="gpu", mode="gpu", device="gpu"))

    def build(
        self,
        request: BuildRequest,
        dataset: Dataset,
        progress: Progress | None = None,
        prepared: PreparedIndex | None = None,
    ) -> FaissIndex:
        # CAGRA builds in one call with no progress callback: a cancellation is observed
        # only before the GPU starts and while the host assembles.
        prepared = prepared if prepared is not None else self.prepare(request)
        notes = prepared.notes
        share = ShareProgress(progress, request.doc_count)
        if progress is not None:
            progress(0)
        try:
            index = self._build_on_gpu(request, dataset, notes, share)
        except BuildError as exc:
            if self.fallback is None or isinstance(exc, HostAssemblyError):
                raise
            log.warning(
                "GPU build failed, using the %s builder instead: %s", self.fallback.name, exc
            )
            fallback = self.fallback.prepare(request)
            index = self.fallback.build(request, dataset, progress, fallback)
            if fallback is not None:  # the report describes the build that ran
                prepared.notes = fallback.notes
            prepared.notes.device = self.fallback.name
            prepared.notes.reason = f"the GPU build failed, built on the CPU: {exc}"
            prepared.notes.fallback = True
            prepared.notes.requested_mode = "gpu"
            return index
        share.finish()
        return index

    def _build_on_gpu(
        self, request: BuildRequest, dataset: Dataset, notes: BuildNotes, share: ShareProgress
    ) -> FaissIndex:
        params = cagra_params(request)
        if not gpu_available():
            raise GpuUnavailableError("Faiss reports no CUDA GPU with CAGRA (cuVS) support")
        binary = params.ivf_pq is None
        try:
            with _CagraSession(self.device) as session:
                session.train(params, _host_rows(params, dataset))
                if self.layout is GpuLayout.HNSW:
                    knn = session.knn_graph(request.doc_count)
                else:
                    # skip_stored_vectors needs nothing here: the inner index is
                    # IndexHNSWCagra either way and index_io writes it without storage.
                    inner = _hnsw_target(params)
                    index = _id_map(inner, binary)
                    session.copy_to(inner)
            if self.layout is not GpuLayout.HNSW:
                _finish(index, inner, params, ids_as_int64(dataset.doc_ids))
                notes.path = BuildPath.GPU_BASE_LEVEL
        except (RuntimeError, MemoryError) as exc:
            raise BuildError(
                f"Faiss CAGRA failed on GPU {self.device} for {request.doc_count} x "
                f"{request.dimension} {request.data_type.value} vectors: {exc}"
            ) from exc
        log.info(
            "CAGRA built %d vectors (%s layout) with %s", request.doc_count, self.layout, params
        )
        if self.layout is not GpuLayout.HNSW:
            return index
        # The GPU and its host rows are freed: the host assembles the graph. From here
        # the blob's pages are handed back, so a failure cannot fall back to the CPU.
        share.to(_GPU_SHARE)
        try:
            return assemble_from_graph(request, dataset, knn, notes, share)
        except (BuildError, RuntimeError, MemoryError) as exc:
            raise HostAssemblyError(
                f"assembling the GPU's graph of {request.doc_count} vectors on the host "
                f"failed: {exc}"
            ) from exc
