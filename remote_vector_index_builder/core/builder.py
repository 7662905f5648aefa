"""The index-builder boundary: one protocol, a CPU and a GPU implementation.

Builders return the finished, ID-mapped Faiss index (``IndexIDMap`` or
``IndexBinaryIDMap``) whose ids are the doc ids in blob order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import faiss

from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.errors import BuildError, GpuUnavailableError
from remote_vector_index_builder.core.params import BuildRequest, SpaceType

log = logging.getLogger(__name__)

# Called with the number of vectors added since the last call; may raise
# CancelledError to stop the build at a batch boundary.
Progress = Callable[[int], None]
FaissIndex = Any  # faiss.Index or faiss.IndexBinary; SWIG types are not typed


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


class CpuBuildMode(StrEnum):
    STANDARD = "standard"  # Faiss HNSW over the stored vectors
    FAST = "fast"  # graph on projected 8-bit codes (core.projected_graph)
    AUTO = "auto"  # fast where a pilot shows it as good as standard


@dataclass(frozen=True)
class BuilderOptions:
    device: Device = Device.AUTO
    # Rows per add() call on the CPU: how often progress and cancellation are
    # checked and how much of the downloaded blob is handed back at a time. At
    # 100k x 768 float on 2 cores, 32k-row adds built 7% faster than 8k-row ones
    # and as fast as one add of every row (which frees nothing until the end:
    # +75 MB), at the same job peak in memory mode, where the upload's buffers
    # dominate (benchmarks/README.md, section 4). int8 rows are converted to
    # fp32 8k rows at a time whatever this is (cpu_builder.CONVERT_ROWS).
    add_batch_rows: int = 32768
    # How the CPU builds the graph; see benchmarks/README.md ("build modes") for the default.
    cpu_build: CpuBuildMode = CpuBuildMode.STANDARD
    # GPU only: fall back to the CPU builder when the GPU build raises.
    gpu_fallback_to_cpu: bool = True


class IndexBuilder(Protocol):
    name: str

    def prepare(self, request: BuildRequest) -> Any:
        """Allocate, before the blobs are downloaded, what ``build`` will fill.

        Whatever it returns is handed to ``build`` as ``prepared``; a builder
        with nothing to set up early returns None.
        """

    def build(
        self,
        request: BuildRequest,
        dataset: Dataset,
        progress: Progress | None = None,
        prepared: Any = None,
    ) -> FaissIndex: ...


def faiss_metric(space_type: SpaceType) -> int:
    if space_type is SpaceType.INNER_PRODUCT:
        return int(faiss.METRIC_INNER_PRODUCT)
    if space_type is SpaceType.L2:
        return int(faiss.METRIC_L2)
    raise BuildError(f"space_type {space_type.value} has no float metric; it needs binary data")


def gpu_available() -> bool:
    """True only when Faiss sees a GPU and was compiled with CAGRA (cuVS)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None or not hasattr(faiss, "GpuIndexCagra"):
        return False
    try:
        return int(get_num_gpus()) > 0
    except RuntimeError:
        return False


def choose_builder(options: BuilderOptions) -> IndexBuilder:
    """Pick the builder for ``options.device``; ``auto`` means GPU when usable."""
    from remote_vector_index_builder.core.cpu_builder import CpuBuilder

    cpu = CpuBuilder(add_batch_rows=options.add_batch_rows, mode=options.cpu_build)
    if options.device is Device.CPU:
        return cpu
    if not gpu_available():
        if options.device is Device.GPU:
            raise GpuUnavailableError(
                "device gpu was requested but Faiss reports no GPU with CAGRA support; "
                "install the gpu extra on a CUDA host or use device cpu/auto"
            )
        log.info("no GPU with CAGRA support found: building on the CPU")
        return cpu
    from remote_vector_index_builder.core.gpu_builder import GpuBuilder

    return GpuBuilder(fallback=cpu if options.gpu_fallback_to_cpu else None)
