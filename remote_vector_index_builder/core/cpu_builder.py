"""Faiss HNSW on the CPU: the index a data node would build itself, per data type.

==============  =====================  ===============================
data_type       inner HNSW section     storage
==============  =====================  ===============================
float           ``IHNf``               ``IxF2`` (l2) / ``IxFI`` (ip)
half_float      ``IHNs``               ``IxSQ`` fp16
byte            ``IHNs``               ``IxSQ`` 8-bit direct signed
binary          ``IBHf``               ``IBxF``
skip storage    ``IHc2``               ``null`` (see ``index_io``)
==============  =====================  ===============================

``mode`` ``fast`` builds the same index with its graph built on a reduced
representation (``core.projected_graph``); ``auto`` does so where a pilot shows
the graph as good as the standard one. Binary vectors always take the standard
path: a Hamming distance over packed bits already reads 1/32 of an fp32 row's
bytes, so there is nothing to reduce.
"""

from __future__ import annotations

import ctypes
import math
import mmap

import faiss
import numpy as np

from remote_vector_index_builder.core import blocked_knn, graph_assembly, knn_graph, projected_graph
from remote_vector_index_builder.core.dataset import Dataset, ids_as_int64
from remote_vector_index_builder.core.errors import BuildError
from remote_vector_index_builder.core.index_builder import (
    CONVERT_ROWS,
    FaissIndex,
    PreparedIndex,
    Progress,
    ShareProgress,
    fill_storage,
    new_inner_index,
)
from remote_vector_index_builder.core.options import CpuBuildMode
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.quality import BuildNotes, BuildPath

# The standard build's empty inner index; the name tests and the fast build use.
_inner_index = new_inner_index

# Share of an exact-kNN build done when its storage is filled and when its kNN
# graph is (the rest is the assembly): in a profile of a 900 x 768 build the kNN
# graph took 0.35 s of about 0.6 s.
_EXACT_SHARES = (0.02, 0.6)
# The same for the blocked kNN graph (MiniLM 29k x 384: kNN 4.3 of 8.2 CPU-s).
_BLOCKED_SHARES = (0.02, 0.5)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _uncommit(address: int, length: int) -> None:
    """Hand back the whole pages in ``[address, address + length)``; they read as zeros."""
    page = mmap.PAGESIZE
    first = -(-address // page) * page
    last = ((address + length) // page) * page
    if last > first:
        _libc().madvise(first, last - first, mmap.MADV_DONTNEED)


def reserve_storage(inner: FaissIndex, rows: int) -> None:
    """Give the vector storage its final capacity, uncommitted, before the batched adds.

    Each ``add`` grows the storage's byte vector; when it reallocates, old and
    new buffers coexist (at 100k x 768 float: 180 MB more at the peak). Growing
    to the final size once and shrinking back keeps the capacity, since
    ``std::vector`` never releases it on ``resize``. The growth zero-fills, so
    the pages are handed back right away: they are committed again batch by
    batch as Faiss copies vectors in, while ``Dataset.release`` returns the
    matching pages of the downloaded blob. The build thus never holds the raw
    vectors and their copy in full at the same time.
    """
    storage = (
        faiss.downcast_IndexBinary(inner.storage)
        if isinstance(inner, faiss.IndexBinary)
        else faiss.downcast_index(inner.storage)
    )
    codes = storage.xb if isinstance(inner, faiss.IndexBinary) else storage.codes
    nbytes = rows * storage.code_size
    codes.resize(nbytes)
    if nbytes:
        # Pages wholly inside our own vector's buffer: nothing else lives there.
        _uncommit(faiss.rev_swig_ptr(codes.data(), nbytes).ctypes.data, nbytes)
    codes.resize(0)


def id_mapped(inner: FaissIndex, binary: bool) -> FaissIndex:
    """Wrap ``inner`` in an ID map; Faiss's Python layer keeps ``inner`` alive."""
    return faiss.IndexBinaryIDMap(inner) if binary else faiss.IndexIDMap(inner)


class CpuBuilder:
    name = "cpu"

    def __init__(
        self,
        add_batch_rows: int = 32768,
        mode: CpuBuildMode = CpuBuildMode.STANDARD,
        auto_min_rows: int = projected_graph.AUTO_MIN_ROWS,
        knn_graph_max_rows: int = knn_graph.EXACT_KNN_MAX_ROWS,
        blocked: blocked_knn.BlockedRule = blocked_knn.DEFAULT_RULE,
    ) -> None:
        self.add_batch_rows = add_batch_rows
        self.mode = mode
        self.auto_min_rows = auto_min_rows
        # Segments up to this many rows: exact kNN graph + assembly (0: never).
        self.knn_graph_max_rows = knn_graph_max_rows
        # Larger segments the rule admits: blocked kNN graph + assembly.
        self.blocked = blocked

    def prepare(self, request: BuildRequest) -> PreparedIndex:
        """The empty inner index with its storage reserved (see ``reserve_storage``).

        Reserving touches the storage's pages once before handing them back;
        doing it before the download keeps that moment off the build's peak.
        """
        inner = _inner_index(request)
        reserve_storage(inner, request.doc_count)
        return PreparedIndex(inner, BuildNotes(requested_mode=self.mode.value))

    def build(
        self,
        request: BuildRequest,
        dataset: Dataset,
        progress: Progress | None = None,
        prepared: PreparedIndex | None = None,
    ) -> FaissIndex:
        binary = request.data_type.spec.packed_bits
        prepared = prepared if prepared is not None else self.prepare(request)
        inner, notes = prepared.inner, prepared.notes
        index = id_mapped(inner, binary)
        ids = ids_as_int64(dataset.doc_ids)
        mode = self.mode
        if mode is CpuBuildMode.AUTO and dataset.count < self.auto_min_rows:
            mode = CpuBuildMode.STANDARD
            notes.reason = (
                f"{dataset.count} rows are fewer than {self.auto_min_rows}: "
                "too few for the fast build to pay for its projection and pilot"
            )
        notes.device = "cpu"
        try:
            if mode is not CpuBuildMode.STANDARD and not binary:
                if projected_graph.build(
                    request,
                    dataset,
                    inner,
                    _inner_index,
                    auto=mode is CpuBuildMode.AUTO,
                    rows=self.add_batch_rows,
                    notes=notes,
                    progress=progress,
                ):
                    notes.path = BuildPath.PROJECTED
                    _attach_ids(index, ids)
                    return index
            elif binary and mode is not CpuBuildMode.STANDARD:
                notes.reason = "binary vectors are always built the standard way"
            if dataset.count <= self.knn_graph_max_rows:
                self._assemble(request, inner, dataset, progress, notes, BuildPath.EXACT_KNN)
                _attach_ids(index, ids)
                return index
            if mode is CpuBuildMode.STANDARD and self.blocked.admits(request, dataset):
                self._assemble(request, inner, dataset, progress, notes, BuildPath.BLOCKED_KNN)
                _attach_ids(index, ids)
                return index
            notes.path = BuildPath.INSERTION
            self._add_all(request, index, dataset, ids, progress)
        except RuntimeError as exc:
            raise BuildError(f"Faiss failed to build the HNSW index on the CPU: {exc}") from exc
        except MemoryError as exc:
            raise BuildError(
                f"out of host memory while building {request.doc_count} x {request.dimension} "
                f"{request.data_type.value} vectors; lower CPU_MEMORY_LIMIT or MAX_WORKERS "
                "so fewer builds share the host"
            ) from exc
        return index

    def _assemble(
        self,
        request: BuildRequest,
        inner: FaissIndex,
        dataset: Dataset,
        progress: Progress | None,
        notes: BuildNotes,
        path: str,
    ) -> None:
        """Storage first, then a kNN graph (exact by GEMM for a small segment, blocked for a
        larger one the rule admits), then ``core.graph_assembly``."""
        share = ShareProgress(progress, dataset.count)
        low, high = _EXACT_SHARES if path is BuildPath.EXACT_KNN else _BLOCKED_SHARES
        fill_storage(inner, dataset, self.add_batch_rows)
        share.to(low)
        rows = knn_graph.StoredRows(inner)

        def knn_progress(done: float) -> None:
            share.to(low + (high - low) * done)

        counts: dict[str, float] = {}
        if path is BuildPath.EXACT_KNN:
            k = knn_graph.EXACT_KNN_CANDIDATES_PER_M * request.m
            knn = knn_graph.exact_knn(rows, k, progress=knn_progress)
        else:
            stats = blocked_knn.BlockedStats()
            params = self.blocked.params(request.m)
            knn = blocked_knn.blocked_knn(rows, params, progress=knn_progress, stats=stats)
            counts = stats.as_dict()
        assembled = graph_assembly.assemble(
            inner, knn, request.m, progress=lambda done: share.to(high + (1 - high) * done)
        )
        share.finish()
        notes.path = path
        notes.assembly = {**assembled.as_dict(), **counts}

    def _add_all(
        self,
        request: BuildRequest,
        index: FaissIndex,
        dataset: Dataset,
        ids: np.ndarray,
        progress: Progress | None,
    ) -> None:
        """The standard build: batches through ``add_with_ids``, releasing the blob.

        Progress after each batch is weighted by ``insertion_share``, so that its
        rate, and so the ETA, stays even. Batches are not split further for
        smoother progress: Faiss inserts each ``add``'s upper-level vectors before
        its level-0 ones, and smaller adds built worse graphs (man-page LSA, 20k x
        256: recall@10 at ef 100 0.9208 in one add, 0.9016 in 8192-row adds,
        0.8845 in 2048-row adds, deterministic over 3 builds each; the effect runs
        both ways, LSA 50k: 0.9121 in one add, 0.9508 in 32k-row adds).
        """
        scratch: np.ndarray | None = None
        binary = request.data_type.spec.packed_bits
        n = dataset.count
        step = min(self.add_batch_rows, CONVERT_ROWS) if not binary else self.add_batch_rows
        share = ShareProgress(progress, n)
        for start, batch in dataset.batches(self.add_batch_rows):
            if binary or batch.dtype == np.float32:
                index.add_with_ids(batch, ids[start : start + len(batch)])
                share.to(insertion_share(start + len(batch), n))
                dataset.release(start, start + len(batch))
                continue
            for first in range(0, len(batch), step):
                # Faiss's scalar quantizer encodes from float32: int8 rows go through
                # one reused fp32 buffer of CONVERT_ROWS rows. A fresh ``astype`` of the
                # whole batch held two 4x temporaries at each hand-over (+200 MB at
                # 32k x 768); 8k-row adds of int8 built as fast as 32k-row ones
                # (benchmarks/README.md, section 4).
                part = batch[first : first + step]
                begin = start + first
                if scratch is None:
                    scratch = np.empty((len(part), batch.shape[1]), dtype=np.float32)
                rows = scratch[: len(part)]
                np.copyto(rows, part)
                index.add_with_ids(rows, ids[begin : begin + len(part)])
                share.to(insertion_share(begin + len(part), n))
            dataset.release(start, start + len(batch))
        share.finish()


# HNSW insertion gets slower as the graph grows (longer searches, more cache
# misses); progress counts each vector as ln(i + INSERTION_COST_OFFSET), so that
# progress per second, and the ETA computed from it, stays even.
INSERTION_COST_OFFSET = 4096


def insertion_share(done: int, n: int) -> float:
    """The share of an insertion build's work done after ``done`` of ``n`` vectors."""

    def work(i: int) -> float:
        x = i + INSERTION_COST_OFFSET
        return x * math.log(x) - x

    total = work(n) - work(0)
    return 1.0 if total <= 0 else (work(done) - work(0)) / total


def _attach_ids(index: FaissIndex, ids: np.ndarray) -> None:
    """Give an ID map wrapped around an empty inner index that has since been filled its ids."""
    faiss.copy_array_to_vector(ids, index.id_map)
    index.ntotal = int(index.index.ntotal)
