"""The largest segment a memory limit admits: what ``/_heart_beat`` and README's sizing table say.

Admission (``core.memory.estimate`` against ``CPU_MEMORY_LIMIT``/``GPU_MEMORY_LIMIT``)
answers 507 to a segment whose build can never fit, and the data node then builds it
on its own CPU, flush after flush. OpenSearch can avoid sending those: the cluster
setting ``knn.remote_index_build.size.max`` bounds the segments it sends by their
vector bytes (``doc_count x bytes per vector``, as the data node measures them), so
setting it to what fits here turns every 507 into a local build decided up front.
The estimate grows with ``doc_count`` at a fixed dimension, so the largest count that
fits is found by bisection over the estimate itself (no second formula to drift).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from remote_vector_index_builder.core import memory
from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.params import BuildRequest

# Dimensions reported: the common embedding widths (binary: bits).
DIMENSIONS = (128, 384, 768, 1024, 1536)
# The k-NN mapping's default m, which the client sends unless the mapping sets one.
DEFAULT_M = 16
_MIN_DOCS = 5  # the client never sends 4 or fewer
_MAX_DOCS = 2**31 - 1


@dataclass(frozen=True)
class Segment:
    doc_count: int
    # As the data node measures a segment for size.min / size.max (the vector blob).
    vector_bytes: int


@dataclass(frozen=True)
class Limits:
    """What admission compares a build's estimate with, and how it estimates."""

    host_bytes: int
    gpu_bytes: int
    options: memory.EstimateOptions


def _request(data_type: DataType, dimension: int, doc_count: int, m: int) -> BuildRequest:
    return BuildRequest.model_validate(
        {
            "repository_type": "s3",
            "container_name": "sizing",
            "vector_path": "s.knnvec",
            "doc_id_path": "s.knndid",
            "dimension": dimension,
            "doc_count": doc_count,
            "data_type": data_type.value,
            "index_parameters": {"algorithm_parameters": {"m": m}},
        }
    )


def _fits(limits: Limits, request: BuildRequest) -> bool:
    need = limits.options.estimate(request)
    return need.host_bytes <= limits.host_bytes and need.gpu_bytes <= limits.gpu_bytes


@lru_cache(maxsize=256)
def largest_segment(
    limits: Limits, data_type: DataType, dimension: int, m: int = DEFAULT_M
) -> Segment:
    """The most vectors of ``dimension`` a build admits under ``limits`` (0: none fit)."""
    if not _fits(limits, _request(data_type, dimension, _MIN_DOCS, m)):
        return Segment(0, 0)
    low, high = _MIN_DOCS, _MAX_DOCS  # low fits; anything above high does not exist
    if _fits(limits, _request(data_type, dimension, high, m)):
        low = high
    while low < high:
        middle = (low + high + 1) // 2
        if _fits(limits, _request(data_type, dimension, middle, m)):
            low = middle
        else:
            high = middle - 1
    return Segment(low, _request(data_type, dimension, low, m).vector_blob_bytes)


def largest_segments(
    limits: Limits, dimensions: tuple[int, ...] = DIMENSIONS
) -> dict[str, dict[str, Segment]]:
    """``{data_type: {dimension: Segment}}`` at the default m."""
    return {
        data_type.value: {str(d): largest_segment(limits, data_type, d) for d in dimensions}
        for data_type in DataType
    }
