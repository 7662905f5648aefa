"""Peak memory of one build, estimated before it starts (for admission control).

Host peak of the CPU path is the larger of two moments:

* **build**: the downloaded blobs (vectors + doc ids) are alive while the index
  fills with its own copy of the vectors plus the HNSW graph, the int64 ids (in
  the id map and one temporary) and, for ``byte``, one batch converted to fp32;
* **upload**: the index alone plus the upload's in-flight part buffers.

``index bytes = n * (storage per vector + graph per vector + 8)`` where the
HNSW graph keeps ``2m`` int32 neighbours on level 0 and ``m`` on each upper
level (a vector reaches level ``l`` with probability ``m**-l``, so about
``m / (m - 1)`` more), plus an 8-byte offset and a 4-byte level per vector.
A fixed allowance covers Faiss's visited tables, thread stacks and Python
objects. ``benchmarks/memory_estimate.py`` checks the formula against measured
peaks; it is meant to be a slight over-estimate.

The GPU estimate is coarser (CAGRA's working set is not documented in bytes):
the dataset in its input type, the intermediate graph and the final graph in
int32, and the IVF-PQ codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from remote_vector_index_builder.core.params import BuildRequest, DataType

MIB = 1024**2
# Per-job allowance for Faiss scratch space, thread stacks and Python objects;
# measured overheads stayed below 40 MiB up to 1M vectors.
FIXED_OVERHEAD = 64 * MIB


@dataclass(frozen=True)
class MemoryEstimate:
    host_bytes: int
    gpu_bytes: int


def storage_bytes_per_vector(request: BuildRequest) -> float:
    d = request.dimension
    if request.skip_stored_vectors:
        return 4.0 * d  # built with flat fp32 storage, dropped at write time
    return {
        DataType.FLOAT: 4.0 * d,
        DataType.HALF_FLOAT: 2.0 * d,
        DataType.BYTE: 1.0 * d,
        DataType.BINARY: d / 8,
    }[request.data_type]


def graph_bytes_per_vector(m: int) -> float:
    # Expected upper levels per vector: sum over l >= 1 of m**-l = 1 / (m - 1).
    upper_levels = 1.0 / (m - 1) if m > 1 else 1.0
    neighbours = 2 * m + m * upper_levels
    return neighbours * 4 + 12


def index_bytes(request: BuildRequest) -> int:
    per_vector = storage_bytes_per_vector(request) + graph_bytes_per_vector(request.m) + 8
    return int(request.doc_count * per_vector)


def estimate(
    request: BuildRequest,
    *,
    upload_buffer_bytes: int,
    add_batch_rows: int,
    gpu: bool = False,
) -> MemoryEstimate:
    n, d = request.doc_count, request.dimension
    blobs = request.vector_blob_bytes + request.doc_id_blob_bytes
    index = index_bytes(request)
    temporaries = n * 8  # int64 ids passed to add_with_ids
    if request.data_type is DataType.BYTE:
        temporaries += min(add_batch_rows, n) * d * 4
    build_peak = blobs + index + temporaries
    upload_peak = index + upload_buffer_bytes
    host = max(build_peak, upload_peak) + FIXED_OVERHEAD
    gpu_bytes = 0
    if gpu:
        degree = 4 * request.m
        element = {DataType.HALF_FLOAT: 2, DataType.BINARY: 1 / 8}.get(request.data_type, 4)
        if request.data_type is DataType.BYTE:
            element = 1
        dataset = n * d * element
        graphs = n * (int(degree * 1.5) + degree) * 4
        pq_codes = 0 if request.data_type is DataType.BINARY else n * max(1, d // 4)
        gpu_bytes = int(dataset + graphs + pq_codes) + FIXED_OVERHEAD
        # the host also holds the converted HNSW graph while the GPU index lives
        host += n * degree * 4
    return MemoryEstimate(host_bytes=int(host), gpu_bytes=gpu_bytes)
