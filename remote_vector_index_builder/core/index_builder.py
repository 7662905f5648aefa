"""The index-builder boundary: the protocol each builder implements and what builders share.

Builders return the finished, ID-mapped Faiss index (``IndexIDMap`` or
``IndexBinaryIDMap``) whose ids are the doc ids in blob order. Choosing one is
``core.builder_choice.choose_builder``; this module sits below both implementations so
the imports run one way (builder -> cpu_builder/gpu_builder -> index_builder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import faiss
import numpy as np

from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.errors import BuildError, InvalidRequestError
from remote_vector_index_builder.core.params import BuildRequest, SpaceType
from remote_vector_index_builder.core.quality import BuildNotes

# Called with the number of vectors added since the last call; may raise
# CancelledError to stop the build at a batch boundary.
Progress = Callable[[int], None]
FaissIndex = Any  # faiss.Index or faiss.IndexBinary; SWIG types are not typed


@dataclass
class PreparedIndex:
    """What a builder set up before the download: the empty inner index whose storage
    the build fills in row order (the overlapped upload reads it), and the notes the
    build writes for the quality report."""

    inner: FaissIndex
    notes: BuildNotes = field(default_factory=BuildNotes)


class IndexBuilder(Protocol):
    name: str

    def prepare(self, request: BuildRequest) -> PreparedIndex | None:
        """Allocate, before the blobs are downloaded, what ``build`` will fill.

        Whatever it returns is handed to ``build`` as ``prepared``; a builder
        with nothing to set up early returns None.
        """

    def build(
        self,
        request: BuildRequest,
        dataset: Dataset,
        progress: Progress | None = None,
        prepared: PreparedIndex | None = None,
    ) -> FaissIndex: ...


# Rows of int8 converted to fp32 per ``add`` (``core.memory`` counts one such buffer).
CONVERT_ROWS = 8192
# Below this, Faiss's HNSW level generator divides by log(1) and the first add
# writes out of bounds: the process dies (SIGSEGV), not the build.
MIN_HNSW_M = 2


def checked_m(m: int) -> int:
    """``m`` for a Faiss HNSW constructor, refused with a typed error where Faiss would crash."""
    if m < MIN_HNSW_M:
        raise InvalidRequestError(
            f"m must be at least {MIN_HNSW_M} for an HNSW graph, got {m}; "
            "set index_parameters.algorithm_parameters.m to 2 or more"
        )
    return m


class ShareProgress:
    """A build's share done (0..1) reported through ``Progress`` as vectors, in whole steps.

    Builders that do not add vectors one batch at a time (kNN graph, assembly)
    report the share of their work done; the callback sees vectors, as for adds.
    """

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.reported = 0

    def to(self, share: float) -> None:
        target = int(self.total * min(1.0, max(0.0, share)))
        if self.progress is not None and target > self.reported:
            self.progress(target - self.reported)
        self.reported = max(self.reported, target)

    def finish(self) -> None:
        self.to(1.0)


def new_inner_index(request: BuildRequest) -> FaissIndex:
    """The empty HNSW of the standard CPU build for ``request`` (the contract's layout)."""
    d, m = request.dimension, checked_m(request.m)
    spec = request.data_type.spec
    if spec.packed_bits:
        inner = faiss.IndexBinaryHNSW(d, m)
    elif request.skip_stored_vectors:
        # A CAGRA-typed HNSW is the only section the data node accepts without
        # storage; built as a full multi-level HNSW on the CPU.
        inner = faiss.IndexHNSWCagra(d, m, faiss_metric(request.space_type))
        inner.base_level_only = False
    elif spec.sq_type is None:
        inner = faiss.IndexHNSWFlat(d, m, faiss_metric(request.space_type))
    else:
        qtype = getattr(faiss.ScalarQuantizer, spec.sq_type)
        inner = faiss.IndexHNSWSQ(d, qtype, m, faiss_metric(request.space_type))
    inner.hnsw.efConstruction = request.ef_construction
    inner.hnsw.efSearch = request.ef_search
    return inner


def faiss_metric(space_type: SpaceType) -> int:
    if space_type is SpaceType.INNER_PRODUCT:
        return int(faiss.METRIC_INNER_PRODUCT)
    if space_type is SpaceType.L2:
        return int(faiss.METRIC_L2)
    raise BuildError(f"space_type {space_type.value} has no float metric; it needs binary data")


def gpu_available() -> bool:
    """True only when Faiss sees a GPU and was compiled with CAGRA (cuVS).

    In-process: call it only where the start-up probe (core/gpu_probe.py) already ran
    ``get_num_gpus`` without aborting, or with faiss-cpu (tests).
    """
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None or not hasattr(faiss, "GpuIndexCagra"):
        return False
    try:
        return int(get_num_gpus()) > 0
    except RuntimeError:
        return False


def set_build_threads(threads: int) -> None:
    """Give Faiss ``threads`` OpenMP threads for builds started from the calling thread.

    OpenMP's thread count is a per-thread setting: a thread that did not set it
    gets the process default (every CPU), whatever another thread set. Each
    build thread calls this before it builds; the service once set it only on
    the thread that started, and two replicas with one thread each then each
    ran two spinning OpenMP threads on 2 cores (0.88 x the throughput of one).
    """
    faiss.omp_set_num_threads(threads)


def fill_storage(inner: FaissIndex, dataset: Dataset, rows: int) -> None:
    """Copy the vectors into ``inner``'s storage batch by batch, releasing the blob's pages."""
    storage = (
        faiss.downcast_IndexBinary(inner.storage)
        if isinstance(inner, faiss.IndexBinary)
        else faiss.downcast_index(inner.storage)
    )
    scratch: np.ndarray | None = None
    for start, batch in dataset.batches(rows):
        if batch.dtype in (np.float32, np.uint8):
            storage.add(batch)
        else:  # int8: the scalar quantizer encodes from float32 (see cpu_builder._add_all)
            for first in range(0, len(batch), CONVERT_ROWS):
                chunk = batch[first : first + CONVERT_ROWS]
                if scratch is None:
                    scratch = np.empty((len(chunk), batch.shape[1]), dtype=np.float32)
                np.copyto(scratch[: len(chunk)], chunk)
                storage.add(scratch[: len(chunk)])
        dataset.release(start, start + len(batch))
