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
  (``index_builder.CONVERT_ROWS`` rows). An overlapped upload
  (``overlapped_upload.OverlappedWrite``) cuts its few storage-section parts in flight
  (``OVERLAP_PARTS_IN_FLIGHT`` + 1 parts of 5 MiB, 15 MiB) from a batch only after that
  batch's blob pages are released, so they fit in the batch term above (at
  least 15 MiB for 32k rows of 120 floats or more);
* **upload** (memory mode): the index plus the upload's part buffers, as the
  store's own ``multipart.UploadPlan`` cuts an upload of the index's size
  (for an object of known size a quarter of it in flight plus the part
  filling) plus the 4 MiB Faiss writes at a time.
  Disk mode peaks lower (the index is freed before its file is uploaded).

Two CPU paths add to the build moment: a segment of at most
``EXACT_KNN_MAX_ROWS`` rows is built from its exact kNN graph
(``exact_knn_bytes``: the assembly's arrays, ``assembly_bytes``, and fp32 rows
for quantized storage), and ``RVIB_CPU_BUILD`` fast/auto hold the graph's 8-bit
codes and its graph twice (``fast_build_bytes``).

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

The GPU path (``gpu_estimate``) is derived from the Faiss 1.15 / cuVS 26.06 code paths
rather than measured (no GPU was lent where it was written; ``benchmarks/gpu_check.py``
prints its peaks beside these numbers): cuVS ``cagra::build`` (cagra_build.cuh) keeps
the intermediate kNN graph and the pruned graph as host matrices while ``optimize``
(graph_core.cuh) holds the intermediate graph and then a reverse graph on the device;
Faiss's ``copyTo`` adds the storage, level 0 and ``get_knngraph``'s int64 copy.
Its host side assumes the blobs stay whole and peaks at one of

* **train**: the rows handed to the GPU (``half_float``: an fp16 copy of the
  fp32 rows) plus the kNN graph cuVS keeps on the host while it prunes: the
  intermediate graph and the pruned one, uint32;
* **copyTo**: storage filled in its numeric type, HNSW level 0 at ``4 m`` int32
  links (plus the few upper-level slots ``prepare_level_tab`` allocates and
  leaves empty), and the temporary int64 copy of the graph ``get_knngraph``
  returns, while the rows of the train moment are still held;
* **upload**, as on the CPU.

With the default ``RVIB_GPU_INDEX_LAYOUT=hnsw`` there is no ``copyTo``: the host
peaks at one of **train** (as above), **graph out** (``get_knngraph``'s int64
graph and its numpy copy beside cuVS's pruned graph), **assemble** (the blobs,
the standard CPU index and ``assembly_bytes`` for ``4 m`` candidates) and
**upload**. ``test_memory`` measures a replayed host assembly against it.

Its device side is the larger of the kNN-graph build (IVF-PQ: the k-means train
set in fp32, the PQ codes and list ids; binary NN-descent: the packed rows and
its candidate lists) and the pruning (intermediate + pruned + reverse graph),
plus a fixed allowance for the CUDA context and cuVS workspaces. The dataset
itself is not on the device: ``store_dataset`` is off and cuVS streams host rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from remote_vector_index_builder.core.multipart import UploadPlan
from remote_vector_index_builder.core.params import BuildRequest

MIB = 1024**2
# Per-job allowance for Faiss scratch space, thread stacks and Python objects:
# what remained of measured peaks beyond the moments above was 10-40 MB
# (benchmarks/README.md, section 2).
FIXED_OVERHEAD = 64 * MIB
# Rows per ``dataset.check_values`` batch (its temporaries: ``DataTypeSpec``).
_CHECK_ROWS = 16384
# Faiss hands the upload 4 MiB at a time (index_io's chunk).
_WRITE_CHUNK = 4 * MIB


# index_builder.CONVERT_ROWS (not imported: this module must not load Faiss).
CONVERT_ROWS = 8192
# knn_graph.EXACT_KNN_MAX_ROWS and EXACT_KNN_CANDIDATES_PER_M (test_memory checks they agree).
EXACT_KNN_MAX_ROWS = 6000
EXACT_KNN_CANDIDATES_PER_M = 3
# neighbour_selection.BLOCK_BYTES: decoded candidate rows per numpy block, and as much
# again for the reverse-edge rows graph_assembly builds a chunk at a time.
ASSEMBLY_BLOCK_BYTES = 2 * 32 * MIB


def assembly_bytes(request: BuildRequest, candidates: int) -> int:
    """``core.graph_assembly``'s own arrays for ``n`` vectors with ``candidates`` each.

    The int64 kNN ids; the selection's scratch HNSW over the storage (a level-0
    list as wide as the candidates, an offset and a level per vector); the
    selected lists (``2 m`` int32); the reverse edges (source and target int32
    and the int64 order that sorts them); and the numpy blocks.
    """
    n, width = request.doc_count, 2 * request.m
    knn = n * candidates * 8
    scratch = n * (candidates * 4 + 8 + 4)
    lists = n * width * 4
    reverse = n * width * (4 + 4 + 8)
    return knn + scratch + lists + reverse + ASSEMBLY_BLOCK_BYTES


def exact_knn_bytes(request: BuildRequest) -> int:
    """A segment built from its exact kNN graph (``n <= EXACT_KNN_MAX_ROWS``): the assembly,
    and for quantized storage the fp32 rows ``faiss.knn`` runs over."""
    if request.doc_count > EXACT_KNN_MAX_ROWS:
        return 0
    decoded = 0 if request.data_type.spec.storage_bytes_per_dimension == 4 else 1
    rows = decoded * request.doc_count * request.dimension * 4
    return rows + assembly_bytes(request, EXACT_KNN_CANDIDATES_PER_M * request.m)


def fast_build_bytes(request: BuildRequest) -> int:
    """What the fast build (``RVIB_CPU_BUILD`` fast/auto) holds beside the standard one: the
    8-bit codes of the graph index (at most one byte per dimension) and its HNSW graph,
    which for a moment exists twice (moved over the storage by copy)."""
    if request.data_type.spec.packed_bits:
        return 0  # binary vectors always take the standard path
    n = request.doc_count
    return int(n * request.dimension + n * graph_bytes_per_vector(request.m))


@dataclass(frozen=True)
class MemoryEstimate:
    host_bytes: int
    gpu_bytes: int


def storage_bytes_per_vector(request: BuildRequest) -> float:
    d = request.dimension
    if request.skip_stored_vectors:
        return 4.0 * d  # built with flat fp32 storage, dropped at write time
    return d * request.data_type.spec.storage_bytes_per_dimension


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


def cpu_host_bytes(
    request: BuildRequest, *, upload: UploadPlan, add_batch_rows: int, cpu_build: str = "standard"
) -> int:
    """The largest of the parse, build and upload moments (see the module docstring).

    ``cpu_build`` is ``RVIB_CPU_BUILD``: ``fast`` and ``auto`` hold the fast build's
    codes and second graph during the build.
    """
    n, d = request.doc_count, request.dimension
    vector_blob, doc_ids = request.vector_blob_bytes, request.doc_id_blob_bytes
    storage_pv = storage_bytes_per_vector(request)
    storage = n * storage_pv
    graph = n * graph_bytes_per_vector(request.m)
    index = index_bytes(request)
    batch = min(add_batch_rows, n)

    spec = request.data_type.spec
    check = min(_CHECK_ROWS, n) * d * spec.check_bytes_per_value
    parse = vector_blob + doc_ids + check

    overlap = batch * min(request.row_bytes, storage_pv)
    convert = min(batch, CONVERT_ROWS) * d * 4 if spec.converts_for_faiss else 0
    build = max(vector_blob, storage) + overlap + convert + 2 * graph + 2 * n * 8 + doc_ids
    build += exact_knn_bytes(request)
    if cpu_build != "standard":
        build += fast_build_bytes(request)

    sending = index + upload_buffer_bytes(request, upload) + _WRITE_CHUNK
    return int(max(parse, build, sending) + graph) + FIXED_OVERHEAD


def estimate(
    request: BuildRequest,
    *,
    upload: UploadPlan,
    add_batch_rows: int,
    gpu: bool = False,
    cpu_build: str = "standard",
    gpu_layout: str = "hnsw",
) -> MemoryEstimate:
    """``upload`` is the store's plan (``UploadPlan.of(s3_config)``); ``cpu_build`` and
    ``gpu_layout`` are ``RVIB_CPU_BUILD`` and ``RVIB_GPU_INDEX_LAYOUT``."""
    if not gpu:
        host = cpu_host_bytes(
            request, upload=upload, add_batch_rows=add_batch_rows, cpu_build=cpu_build
        )
        return MemoryEstimate(host_bytes=host, gpu_bytes=0)
    return gpu_estimate(request, upload=upload, layout=gpu_layout)


@dataclass(frozen=True)
class EstimateOptions:
    """How one replica estimates its builds: built once from its settings, read by admission
    and by ``/_heart_beat``'s sizing (``core.sizing``) alike."""

    upload: UploadPlan
    add_batch_rows: int
    gpu: bool = False
    cpu_build: str = "standard"
    gpu_layout: str = "hnsw"

    def estimate(self, request: BuildRequest) -> MemoryEstimate:
        return estimate(
            request,
            upload=self.upload,
            add_batch_rows=self.add_batch_rows,
            gpu=self.gpu,
            cpu_build=self.cpu_build,
            gpu_layout=self.gpu_layout,
        )


# GPU path. cuVS and CUDA allocate outside Faiss's accounting: the CUDA context (about
# 0.5 GiB on recent GPUs) and cuVS's batch workspaces on the device; the loaded CUDA
# libraries' pages and handles on the host. Allowances, to be checked by gpu_check.py.
GPU_DEVICE_OVERHEAD = 1024 * MIB
GPU_HOST_OVERHEAD = 512 * MIB
# gpu_builder.cagra_params's IVF-PQ choices (not imported: that module loads Faiss);
# test_gpu_replay checks the train-set fraction agrees.
_KMEANS_TRAINSET_FRACTION = 0.1
_NN_DESCENT_ROUND = 32  # cuVS NN-descent pads node degrees to a multiple of 32


def _cagra_degrees(request: BuildRequest) -> tuple[int, int]:
    """(intermediate degree cuVS uses, final degree): stock Faiss widens the intermediate
    degree 1.5x on the IVF-PQ path when the two are equal (gpu_builder.CagraParams)."""
    degree = 4 * request.m
    if request.data_type.spec.packed_bits:
        return degree, degree
    return int(1.5 * degree), degree


def gpu_storage_bytes_per_vector(request: BuildRequest) -> float:
    """What copyTo fills, by numeric type; skip_stored_vectors drops it only when writing."""
    return request.dimension * request.data_type.spec.storage_bytes_per_dimension


def gpu_graph_bytes_per_vector(request: BuildRequest) -> float:
    """HNSW after copyTo: level 0 at 4 m links, the empty upper-level slots
    ``prepare_level_tab`` allocates for the ~1/M vectors it draws above level 0, then each
    vector's level (int32) and offset (int64)."""
    degree = 4 * request.m
    hnsw_m = degree // 2  # copyTo's M: level 0 holds 2 M = degree links
    upper_slots = hnsw_m / (hnsw_m - 1) if hnsw_m > 1 else 1.0
    return (degree + upper_slots) * 4 + 12


def gpu_index_bytes(request: BuildRequest) -> int:
    """The converted, ID-mapped index in memory (storage + graph + int64 doc ids)."""
    per_vector = gpu_storage_bytes_per_vector(request) + gpu_graph_bytes_per_vector(request) + 8
    return int(request.doc_count * per_vector)


def gpu_estimate(
    request: BuildRequest, *, upload: UploadPlan, layout: str = "hnsw"
) -> MemoryEstimate:
    """Host and device peaks of one CAGRA build (module docstring, GPU path)."""
    n, d = request.doc_count, request.dimension
    intermediate, degree = _cagra_degrees(request)
    blobs = request.vector_blob_bytes + request.doc_id_blob_bytes
    spec = request.data_type.spec
    # half_float: the fp16 copy of the rows that CAGRA trains on.
    converted = n * d * spec.gpu_row_dtype.itemsize if spec.gpu_converts else 0

    graph_pv = gpu_graph_bytes_per_vector(request)
    index = gpu_index_bytes(request)

    train = blobs + converted + n * (intermediate + degree) * 4
    copy = (
        blobs
        + converted
        + n * gpu_storage_bytes_per_vector(request)
        + n * graph_pv
        + n * degree * 8  # get_knngraph's int64 graph
    )
    finish = blobs + index + 2 * n * 8  # int64 ids: the temporary and the id map
    sending = index + upload_buffer_bytes(request, upload) + _WRITE_CHUNK
    moments = [train, copy, finish, sending]
    if layout == "hnsw":
        # get_knngraph's int64 vector and its numpy copy, beside the pruned graph cuVS
        # still holds; then the standard CPU index assembled from it on the host.
        graph_out = blobs + converted + n * degree * 4 + 2 * n * degree * 8
        cpu_index = index_bytes(request)
        assemble = blobs + cpu_index + assembly_bytes(request, degree) + 2 * n * 8
        moments = [train, graph_out, assemble, cpu_index + upload_buffer_bytes(request, upload)]
    host = max(moments) + FIXED_OVERHEAD + GPU_HOST_OVERHEAD

    if spec.packed_bits:
        padded = -(-intermediate // _NN_DESCENT_ROUND) * _NN_DESCENT_ROUND
        graph_build = n * d / 8 + 2 * n * padded * (4 + 4)  # rows; ids + distances, twice
    else:
        n_lists = max(1, int(math.sqrt(n)))
        pq_dim = max(1, d // 4)
        graph_build = (
            n * _KMEANS_TRAINSET_FRACTION * d * 4  # k-means train set, fp32 whatever the input
            + n * pq_dim  # PQ codes at 8 bits
            + n * 8  # list ids
            + n_lists * d * 4  # centres
            + d * d * 4  # the rotation (force_random_rotation)
        )
    prune = n * intermediate * 4 + 2 * n * degree * 4  # input, output and reverse graphs
    device = max(graph_build, prune) + GPU_DEVICE_OVERHEAD
    return MemoryEstimate(host_bytes=int(host), gpu_bytes=int(device))
