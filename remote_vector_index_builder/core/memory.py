"""Peak memory of one build, estimated before it starts (for admission control).

The CPU path's host peak is the largest of three moments (``n`` vectors,
``b = min(add_batch_rows, n)``):

* **parse**: the downloaded blobs plus ``dataset.check_values``'s temporaries
  (16,384 rows of bools for ``float``; of fp32 and bools for ``half_float``);
* **build**: the builder copies one batch at a time into storage reserved up
  front and hands the blob's pages back behind it, so raw rows and stored rows
  add up to ``max(vector blob, storage)`` plus one batch held in both forms
  (``b * min(row bytes, storage bytes per vector)``), plus the HNSW graph
  twice (its vector grows by doubling), the int64 ids (a temporary and the id
  map) and, for ``byte``, the fp32 buffer int8 rows are converted through
  (``cpu_builder.CONVERT_ROWS`` rows). An overlapped upload
  (``index_io.OverlappedWrite``) cuts its few storage-section parts in flight
  (``UploadPlan.overlap_buffer_bytes``, 15 MiB) from a batch only after that
  batch's blob pages are released, so they fit in the batch term above (at
  least 15 MiB for 32k rows of 120 floats or more);
* **upload** (memory mode): the index plus the upload's part buffers, as the
  store's own ``multipart.UploadPlan`` cuts an upload of the index's size
  (for an object of known size a quarter of it in flight plus the part
  filling) plus the 4 MiB Faiss writes at a time.
  Disk mode peaks lower (the index is freed before its file is uploaded).

``index bytes = n * (storage per vector + graph per vector + 8)`` where the
HNSW graph keeps ``2m`` int32 neighbours on level 0 and ``m`` on each upper
level (a vector reaches level ``l`` with probability ``m**-l``, so about
``m / (m - 1)`` more), plus an 8-byte offset and a 4-byte level per vector.
On top of the largest moment come one more graph's worth (allocator slack
and graph growth that outlive the build: measured 100-125 B per vector at
m 16) and a fixed allowance for thread stacks, Faiss scratch space and
Python objects.

``python -m benchmarks.run --only memory`` (``benchmarks/memory_estimate.py``)
measures the peak of real jobs in fresh processes and prints it beside this
estimate; benchmarks/README.md has the table. The estimate is meant to be a
slight over-estimate of the peak over the process's baseline, and
``test_memory`` checks that on a small build.

The GPU estimate is coarser (CAGRA's working set is not documented in bytes):
the dataset in its input type, the intermediate graph and the final graph in
int32, and the IVF-PQ codes; its host side assumes the blobs stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from remote_vector_index_builder.core.multipart import UploadPlan
from remote_vector_index_builder.core.params import BuildRequest, DataType

MIB = 1024**2
# Per-job allowance for Faiss scratch space, thread stacks and Python objects:
# what remained of measured peaks beyond the moments above was 10-40 MB
# (benchmarks/README.md, section 2).
FIXED_OVERHEAD = 64 * MIB
# Rows per ``dataset.check_values`` batch and bytes per value of its temporaries.
_CHECK_ROWS = 16384
_CHECK_BYTES_PER_VALUE = {DataType.FLOAT: 1, DataType.HALF_FLOAT: 6}
# Faiss hands the upload 4 MiB at a time (index_io's chunk).
_WRITE_CHUNK = 4 * MIB


# cpu_builder.CONVERT_ROWS (not imported: this module must not load Faiss).
CONVERT_ROWS = 8192


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


def serialized_bytes(request: BuildRequest) -> int:
    """About the size of the index file: the size hint the index upload is planned for."""
    size = index_bytes(request)
    if request.skip_stored_vectors:
        size -= int(request.doc_count * storage_bytes_per_vector(request))
    return max(size, 1)


def upload_buffer_bytes(request: BuildRequest, upload: UploadPlan) -> int:
    """The part buffers of this request's index upload, as the store plans it."""
    return upload.buffer_bytes(serialized_bytes(request))


def cpu_host_bytes(request: BuildRequest, *, upload: UploadPlan, add_batch_rows: int) -> int:
    """The largest of the parse, build and upload moments (see the module docstring)."""
    n, d = request.doc_count, request.dimension
    vector_blob, doc_ids = request.vector_blob_bytes, request.doc_id_blob_bytes
    storage_pv = storage_bytes_per_vector(request)
    storage = n * storage_pv
    graph = n * graph_bytes_per_vector(request.m)
    index = index_bytes(request)
    batch = min(add_batch_rows, n)

    check = min(_CHECK_ROWS, n) * d * _CHECK_BYTES_PER_VALUE.get(request.data_type, 0)
    parse = vector_blob + doc_ids + check

    overlap = batch * min(request.row_bytes, storage_pv)
    convert = min(batch, CONVERT_ROWS) * d * 4 if request.data_type is DataType.BYTE else 0
    build = max(vector_blob, storage) + overlap + convert + 2 * graph + 2 * n * 8 + doc_ids

    sending = index + upload_buffer_bytes(request, upload) + _WRITE_CHUNK
    return int(max(parse, build, sending) + graph) + FIXED_OVERHEAD


def estimate(
    request: BuildRequest,
    *,
    upload: UploadPlan,
    add_batch_rows: int,
    gpu: bool = False,
) -> MemoryEstimate:
    """``upload`` is the store's plan (``UploadPlan.of(s3_config)``)."""
    n, d = request.doc_count, request.dimension
    if not gpu:
        host = cpu_host_bytes(request, upload=upload, add_batch_rows=add_batch_rows)
        return MemoryEstimate(host_bytes=host, gpu_bytes=0)
    # Every connection busy plus the part filling: an upload of unknown size.
    upload_buffer_bytes = upload.buffer_bytes(None)
    blobs = request.vector_blob_bytes + request.doc_id_blob_bytes
    index = index_bytes(request)
    temporaries = n * 8  # int64 ids passed to add_with_ids
    if request.data_type is DataType.BYTE:
        temporaries += min(add_batch_rows, n) * d * 4
    build_peak = blobs + index + temporaries
    upload_peak = index + upload_buffer_bytes
    host = max(build_peak, upload_peak) + FIXED_OVERHEAD
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
