"""Blob bytes -> numpy views, without copying.

The k-NN client writes headerless little-endian blobs (docs/knn-contract.md, section 4):
float32 rows for ``float``, float32 or float16 rows for ``half_float`` (told apart by
the object's size), int8 rows for ``byte``, packed bits for ``binary``, and strictly
increasing non-negative int32 doc ids. Parsing checks sizes and doc ids and builds
views over the downloaded buffers, so a multi-GB segment exists once in memory.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.errors import DatasetError
from remote_vector_index_builder.core.params import BuildRequest

_DOC_ID_DTYPE = np.dtype("<i4")
# half_float rows as some clients send them: 2 bytes a value instead of fp32's 4.
_FP16 = np.dtype("<f2")
# Doc ids checked this many at a time (a diff of all of them would be a blob-sized copy).
_ID_ROWS = 1 << 20


@dataclass
class Dataset:
    """Row *i* of ``vectors`` belongs to ``doc_ids[i]``; both are views of the blobs."""

    vectors: np.ndarray
    doc_ids: np.ndarray
    data_type: DataType

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    def release(self, start: int, stop: int) -> None:
        """Return the pages of rows ``[start, stop)`` to the OS; they read as zeros after.

        Only when the vectors live in an anonymous mapping (what the object
        store downloads into); otherwise nothing happens. The builder calls it
        for rows the index has already copied, so the raw blob and the index
        do not both exist in full at the end of a build.
        """
        mapping, root = _mapping_of(self.vectors)
        if mapping is None or stop <= start:
            return
        row_bytes = self.vectors.strides[0]
        offset = self.vectors.ctypes.data - root.ctypes.data
        first = offset + start * row_bytes
        last = offset + stop * row_bytes
        page = mmap.PAGESIZE
        first_page = -(-first // page) * page
        last_page = (last // page) * page
        if last_page > first_page:
            mapping.madvise(mmap.MADV_DONTNEED, first_page, last_page - first_page)

    def batches(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, view)`` slices of at most ``rows`` rows."""
        for start in range(0, self.count, rows):
            yield start, self.vectors[start : start + rows]


def _mapping_of(array: np.ndarray) -> tuple[mmap.mmap | None, np.ndarray]:
    """The anonymous mapping under ``array`` and the array directly over it."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    owner = root.base.obj if isinstance(root.base, memoryview) else root.base
    return (owner if isinstance(owner, mmap.mmap) else None), root


def _check_size(what: str, actual: int, expected: int, formula: str, key: str) -> None:
    if actual != expected:
        raise DatasetError(
            f"{what} object {key!r} holds {actual} bytes, expected {expected} "
            f"({formula}); check dimension, doc_count and data_type in the request"
        )


def vector_blob_sizes(request: BuildRequest) -> tuple[int, ...]:
    """The vector blob sizes ``request`` allows: one per row layout the client may send.

    ``half_float`` arrives as fp32 (the client's wire format since OpenSearch 3.2) or,
    from clients that send what the field stores, as fp16; the size tells which.
    """
    if request.data_type is DataType.HALF_FLOAT:
        return request.vector_blob_bytes, request.doc_count * request.dimension * _FP16.itemsize
    return (request.vector_blob_bytes,)


def check_sizes(request: BuildRequest, vector_bytes: int, doc_id_bytes: int) -> None:
    """Compare blob sizes with what the request implies (called before downloading)."""
    spec = request.data_type.spec
    allowed = vector_blob_sizes(request)
    if vector_bytes not in allowed:
        key = request.vector_path
        rows = f"doc_count {request.doc_count} x dimension {request.dimension}"
        if spec.packed_bits:
            expected = f"{allowed[0]} ({rows} bits / 8 bytes)"
        elif len(allowed) == 2:
            expected = (
                f"{allowed[0]} ({rows} x 4 bytes, fp32) or {allowed[1]} ({rows} x 2 bytes, fp16)"
            )
        else:
            expected = f"{allowed[0]} ({rows} x {spec.blob_dtype.itemsize} bytes)"
        raise DatasetError(
            f"vector object {key!r} holds {vector_bytes} bytes, expected {expected}; check "
            "dimension, doc_count and data_type in the request"
        )
    _check_size(
        "doc id",
        doc_id_bytes,
        request.doc_id_blob_bytes,
        f"doc_count {request.doc_count} x 4 bytes",
        request.doc_id_path,
    )


def parse(request: BuildRequest, vector_blob: np.ndarray, doc_id_blob: np.ndarray) -> Dataset:
    """View the two downloaded ``uint8`` buffers as typed arrays (no copies); check the ids."""
    check_sizes(request, vector_blob.nbytes, doc_id_blob.nbytes)
    row_dtype = request.data_type.spec.blob_dtype
    if vector_blob.nbytes != request.vector_blob_bytes:
        row_dtype = _FP16  # the other size check_sizes allows: half_float sent as fp16
    columns = vector_blob.nbytes // (request.doc_count * row_dtype.itemsize)
    vectors = vector_blob.view(row_dtype).reshape(request.doc_count, columns)
    doc_ids = doc_id_blob.view(_DOC_ID_DTYPE)
    check_doc_ids(doc_ids, request.doc_id_path)
    return Dataset(vectors=vectors, doc_ids=doc_ids, data_type=request.data_type)


def check_doc_ids(doc_ids: np.ndarray, key: str, rows: int = _ID_ROWS) -> None:
    """Lucene doc ids are non-negative and strictly increasing (docs/knn-contract.md, 4):
    anything else is not a segment's id list, and an index over it would answer wrong ids."""
    for start in range(0, len(doc_ids), rows):
        batch = doc_ids[start : start + rows + 1]  # one more: the step into the next batch
        negative = np.flatnonzero(batch < 0)
        if negative.size:
            row = start + int(negative[0])
            raise DatasetError(
                f"doc id object {key!r} holds a negative doc id ({int(doc_ids[row])}) at row "
                f"{row}; doc ids must be non-negative and strictly increasing"
            )
        # Both non-negative int32: their difference cannot overflow.
        stalls = np.flatnonzero(np.diff(batch) <= 0)
        if stalls.size:
            row = start + int(stalls[0]) + 1
            raise DatasetError(
                f"doc id object {key!r} is not strictly increasing: row {row} holds "
                f"{int(doc_ids[row])} after {int(doc_ids[row - 1])}"
            )


def check_values(dataset: Dataset, rows: int = 16384) -> None:
    """Reject values the index cannot hold, in batches so no full-size temporary exists."""
    spec = dataset.data_type.spec
    if not spec.finite_only:
        return
    limit = spec.max_magnitude
    for start, batch in dataset.batches(rows):
        finite = np.isfinite(batch)
        if not finite.all():
            row = start + int(np.argwhere(~finite)[0][0])
            raise DatasetError(
                f"vector at row {row} (doc id {int(dataset.doc_ids[row])}) holds NaN or "
                "infinity; only finite values can be indexed"
            )
        if limit is not None:
            too_big = np.abs(batch) > limit
            if too_big.any():
                row = start + int(np.argwhere(too_big)[0][0])
                raise DatasetError(
                    f"vector at row {row} (doc id {int(dataset.doc_ids[row])}) has a value "
                    f"beyond the fp16 range (+-{limit:.0f}) of data_type {dataset.data_type.value}"
                )


def to_fp16(vectors: np.ndarray, rows: int = 65536) -> np.ndarray:
    """fp32 -> fp16 into one pre-allocated array, batch by batch.

    ``astype`` on the whole array would need an fp32 temporary per operation on
    some numpy paths; converting in batches bounds the extra memory to one batch.
    """
    out = np.empty(vectors.shape, dtype=np.float16)
    for start in range(0, vectors.shape[0], rows):
        np.copyto(out[start : start + rows], vectors[start : start + rows], casting="same_kind")
    return out


def ids_as_int64(doc_ids: np.ndarray) -> np.ndarray:
    """Faiss id maps hold int64; doc ids arrive as int32 (4 bytes a row, small)."""
    return doc_ids.astype(np.int64)
