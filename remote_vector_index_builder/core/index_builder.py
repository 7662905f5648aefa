"""The index-builder boundary: the protocol each builder implements and what builders share.

Builders return the finished, ID-mapped Faiss index (``IndexIDMap`` or
``IndexBinaryIDMap``) whose ids are the doc ids in blob order. Choosing one is
``core.builder.choose_builder``; this module sits below both implementations so
the imports run one way (builder -> cpu_builder/gpu_builder -> index_builder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import faiss

from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.errors import BuildError
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
