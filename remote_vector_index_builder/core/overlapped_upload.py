"""The index upload overlapped with its build (memory mode): the storage section goes up early.

``faiss.write_index`` of ``IndexIDMap(IndexHNSW*)`` writes, in this order: the
``IxMp`` header, the inner index's header and HNSW graph, its storage index
(``IxF2`` / ``IxFI`` / ``IxSQ``: a header with ``ntotal``, then the codes as one
length-prefixed vector), then the id map (a length and int64 ids). Only the
graph changes until the build ends; the storage header is known from the row
count, each stored row is final once ``add`` has copied it in, and the ids are
the doc ids. So that *tail* goes up as the highest-numbered parts of one
``multipart.NumberedUpload`` while the build runs, and the *head* (headers and
graph) takes parts 1.. after it, with the tail's first ``MIN_PART_SIZE`` bytes,
so that the head's last part is never below S3's minimum however small the
graph. S3 joins parts by number: the object is byte for byte what
``index_io.write`` streams (``test_workflow`` checks).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
from zlib_ng import zlib_ng

from remote_vector_index_builder.core.checksums import b64, crc32_b64
from remote_vector_index_builder.core.errors import BuildError
from remote_vector_index_builder.core.index_builder import FaissIndex
from remote_vector_index_builder.core.index_io import id_map_header, write_faiss
from remote_vector_index_builder.core.multipart import (
    MAX_PARTS,
    CommitCheck,
    NumberedUpload,
    UploadPlan,
)
from remote_vector_index_builder.core.object_store import NumberedUploads
from remote_vector_index_builder.core.options import MIN_PART_SIZE

# Parts of the storage section in flight during the build, and the part numbers it
# may use (the highest ones; the rest are the head's).
OVERLAP_PARTS_IN_FLIGHT = 2
OVERLAP_PART_NUMBERS = 8_000


# The storage section is sent during the build in small parts, few at a time: the
# build produces far fewer bytes per second than one connection carries, and every
# buffer then stacks on the build's own peak.


def overlap_part(size: int) -> int:
    """Part size of the storage section sent during the build (``size``: its bytes)."""
    return max(MIN_PART_SIZE, -(-size // OVERLAP_PART_NUMBERS))


@dataclass(frozen=True)
class _TailLayout:
    prefix: bytes  # the storage section's header, through the codes' length field
    code_size: int
    rows: int
    ids: bytes  # the id map section: its length and the int64 ids

    @property
    def codes_end(self) -> int:
        return len(self.prefix) + self.rows * self.code_size

    @property
    def size(self) -> int:
        return self.codes_end + len(self.ids)


def _serialized(index: FaissIndex, io_flags: int = 0) -> bytes:
    writer = faiss.VectorIOWriter()
    faiss.write_index(index, writer, io_flags)
    return bytes(faiss.vector_to_array(writer.data).tobytes())


def _flat_storage(inner: FaissIndex) -> FaissIndex | None:
    """The flat-codes storage of a CPU HNSW index (float, half_float, byte), else None."""
    if isinstance(inner, faiss.IndexBinary) or not isinstance(inner, faiss.IndexHNSW):
        return None
    if isinstance(inner, faiss.IndexHNSWCagra):
        return None
    storage = faiss.downcast_index(inner.storage)
    return storage if isinstance(storage, faiss.IndexFlatCodes) else None


def _tail_layout(storage: FaissIndex, rows: int, ids: np.ndarray) -> _TailLayout | None:
    """The tail's layout, learned from Faiss itself: the empty storage and one row.

    None when the two serializations do not differ exactly as the layout above
    says (a Faiss version that writes otherwise): the upload is then sequential.
    """
    if storage.ntotal != 0:
        return None
    empty, one = faiss.clone_index(storage), faiss.clone_index(storage)
    one.add(np.zeros((1, storage.d), dtype=np.float32))
    s0, s1 = _serialized(empty), _serialized(one)
    size = len(s0) - 8
    row = bytes(faiss.vector_to_array(one.codes).tobytes())
    fits = (
        len(s0) >= 24
        and s1[:8] == s0[:8]
        and s0[8:16] == struct.pack("<q", 0)
        and s1[8:16] == struct.pack("<q", 1)
        and s1[16:size] == s0[16:size]
        and s0[size:] == struct.pack("<Q", 0)
        and s1[len(s0) :] == row
        and len(row) == storage.code_size
    )
    if not fits:
        return None
    per_row = struct.unpack_from("<Q", s1, size)[0]  # bytes or floats, by storage type
    prefix = s0[:8] + struct.pack("<q", rows) + s0[16:size] + struct.pack("<Q", per_row * rows)
    id_map = struct.pack("<Q", ids.size) + ids.astype("<i8", copy=False).tobytes()
    return _TailLayout(prefix, int(storage.code_size), rows, id_map)


def _address(storage: FaissIndex) -> int:
    """Where the storage's codes live (0 while empty): a moved buffer means a new copy."""
    codes = storage.codes
    return int(faiss.rev_swig_ptr(codes.data(), 1).ctypes.data) if codes.size() else 0


class OverlappedWrite:
    """The index file as a numbered multipart upload, its storage section sent early.

    ``stored(start, stop)`` (from the build thread, between two ``add`` calls)
    sends the parts that rows ``[start, stop)`` complete, copying them out of
    the storage while no ``add`` runs, as far as there is room in flight (it
    never waits: a waiting build thread leaves the build's cores idle).
    ``finish(index)`` checks the finished
    index is the one those parts were cut from (same storage buffer, rows, ids
    and every early part's CRC32), sends the rest and completes the object;
    ``None`` if it is not (the caller then uploads sequentially). ``abort``
    removes the parts on failure or cancel.
    """

    def __init__(
        self, upload: NumberedUpload, inner: FaissIndex, layout: _TailLayout, plan: UploadPlan
    ) -> None:
        self._upload, self._inner, self._layout, self._plan = upload, inner, layout, plan
        # The tail's first bytes go out with the head (see above).
        self._held = MIN_PART_SIZE
        early = layout.size - self._held
        self._part = overlap_part(early)
        self._count = -(-early // self._part)
        self._first_number = MAX_PARTS - self._count + 1
        self._next = 0  # the next early part to send
        self._rows = 0  # rows [0, _rows) are in the storage
        self._codes_at = 0  # where the codes live, once the first rows are in
        self._in_order = True
        self._checksums: dict[int, str] = {}  # early part number -> CRC32 (S3's base64)

    @classmethod
    def start(
        cls,
        store: NumberedUploads,
        bucket: str,
        key: str,
        *,
        inner: FaissIndex,
        ids: np.ndarray,
        sse_kms_key_id: str | None = None,
    ) -> OverlappedWrite | None:
        """None where the overlap does not apply: no flat storage, or a tail under 2 parts."""
        storage = _flat_storage(inner)
        layout = None if storage is None else _tail_layout(storage, int(ids.size), ids)
        if layout is None or layout.size < MIN_PART_SIZE + 2 * MIN_PART_SIZE:
            return None
        upload = store.open_numbered_upload(
            bucket, key, sse_kms_key_id=sse_kms_key_id, slots=OVERLAP_PARTS_IN_FLIGHT
        )
        return cls(upload, inner, layout, store.upload_plan)

    def stored(self, start: int, stop: int) -> None:
        """Rows ``[start, stop)`` are in the storage for good."""
        address = _address(faiss.downcast_index(self._inner.storage))
        self._codes_at = self._codes_at or address
        if start != self._rows or address != self._codes_at:
            self._in_order = False  # finish() falls back; nothing more goes early
        if not self._in_order:
            return
        self._rows = stop
        # The build never waits for the network: a part that finds no room goes with a
        # later batch, or at the end.
        self._send_ready(stop, wait=False)

    def _range(self, part: int) -> tuple[int, int]:
        start = self._held + part * self._part
        return start, min(start + self._part, self._layout.size)

    def _rows_for(self, end: int) -> int:
        layout = self._layout
        if end >= layout.codes_end:
            return layout.rows
        return -(-(end - len(layout.prefix)) // layout.code_size)

    def _send_ready(self, rows: int, *, wait: bool = True) -> None:
        while self._next < self._count:
            start, end = self._range(self._next)
            if self._rows_for(end) > rows or not (wait or self._upload.has_room()):
                return
            body, number = self._tail(start, end), self._first_number + self._next
            # Computed here, once, to compare with the finished index's rows (``_matches``).
            self._checksums[number] = crc32_b64(body)
            self._upload.send(number, body, checksum=self._checksums[number])
            self._next += 1

    def _pieces(self, start: int, end: int) -> list[memoryview | bytes]:
        layout, pieces = self._layout, list[memoryview | bytes]()
        prefix, codes_end = len(layout.prefix), layout.codes_end
        if start < prefix:
            pieces.append(layout.prefix[start : min(end, prefix)])
        first, last = max(start, prefix), min(end, codes_end)
        if first < last:
            storage = faiss.downcast_index(self._inner.storage)
            codes = faiss.rev_swig_ptr(storage.codes.data(), storage.codes.size())
            pieces.append(memoryview(codes[first - prefix : last - prefix]))
        first, last = max(start, codes_end), end
        if first < last:
            pieces.append(layout.ids[first - codes_end : last - codes_end])
        return pieces

    def _tail(self, start: int, end: int) -> bytes:
        return b"".join(self._pieces(start, end))

    def _matches(self, index: FaissIndex) -> bool:
        if not self._in_order or not isinstance(index, faiss.IndexIDMap):
            return False
        inner = faiss.downcast_index(index.index)
        storage = _flat_storage(inner)
        if storage is None or storage.ntotal != self._layout.rows:
            return False
        if _address(storage) != self._codes_at:
            return False
        ids = faiss.vector_to_array(index.id_map).astype("<i8", copy=False)
        if ids.tobytes() != self._layout.ids[8:]:
            return False
        self._inner = inner
        # Every early part still reads as it was sent (no builder rewrote a stored row).
        for part in range(self._next):
            crc = 0
            for piece in self._pieces(*self._range(part)):
                crc = zlib_ng.crc32(piece, crc)
            expected = self._checksums[self._first_number + part]
            if b64(crc) != expected:
                return False
        return True

    def finish(
        self,
        index: FaissIndex,
        progress: Callable[[int], None],
        commit_check: CommitCheck | None = None,
    ) -> int | None:
        """Complete the object from the finished ``index``; its size, or None (see class).

        ``commit_check`` runs right before the request that makes the object visible.
        """
        if not self._matches(index):
            self.abort()
            return None
        # The parts sent during the build count now (a cancel point, too).
        early = self._upload.bytes_sent
        progress(early)
        self._send_ready(self._layout.rows)
        size_hint = self._layout.size
        # What the plan keeps in flight for this index, less the head's own buffer (up
        # to two parts): the upload holds no more than a sequential one (core.memory).
        self._upload.widen(max(0, self._plan.in_flight(size_hint) - 2 - OVERLAP_PARTS_IN_FLIGHT))
        head = _HeadParts(self._upload, self._plan.first_part(size_hint), self._first_number)
        head.write(id_map_header(index))
        held_back = _HoldBack(head.write, len(_NO_STORAGE))
        try:
            write_faiss(self._inner, held_back.write, faiss.IO_FLAG_SKIP_STORAGE)
        except RuntimeError as exc:
            raise BuildError(f"Faiss failed to serialize the index: {exc}") from exc
        if held_back.held != _NO_STORAGE:
            self.abort()
            return None
        head.finish(self._tail(0, self._held))
        self._upload.complete(commit_check)
        total = head.count + self._layout.size
        progress(total - early)
        return total

    def abort(self) -> None:
        self._upload.abort()

    def __enter__(self) -> OverlappedWrite:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self._upload.__exit__(None, exc, None)


# What the inner index writes in place of its storage with IO_FLAG_SKIP_STORAGE.
_NO_STORAGE = b"null"


class _HoldBack:
    """Passes a stream on but its last ``n`` bytes, which stay in ``held``."""

    def __init__(self, write: Callable[[bytes], int], n: int) -> None:
        self._write, self._n, self.held = write, n, b""

    def write(self, data: bytes) -> int:
        joined = self.held + data if len(data) < self._n else None
        if joined is not None:
            self._write(joined[: -self._n])
            self.held = joined[-self._n :]
        else:
            self._write(self.held)
            self._write(data[: -self._n])
            self.held = data[-self._n :]
        return len(data)


class _HeadParts:
    """The head's parts, numbered from 1; every one of them at least ``MIN_PART_SIZE``.

    Up to two parts' worth stays buffered, so that ``finish`` can always make
    the last part large enough from what it is given (at least ``MIN_PART_SIZE``).
    """

    def __init__(self, upload: NumberedUpload, part: int, limit: int) -> None:
        self._upload, self._part, self._limit = upload, part, limit
        self._buffer = bytearray()
        self._number = 1
        self.count = 0

    def write(self, data: bytes) -> int:
        self._buffer += data
        self.count += len(data)
        while len(self._buffer) >= 2 * self._part:
            self._send(self._part)
        return len(data)

    def _send(self, size: int) -> None:
        if self._number >= self._limit:
            raise BuildError("the index graph needs more multipart parts than S3 allows")
        with memoryview(self._buffer) as view:
            body = bytes(view[:size])
        del self._buffer[:size]
        self._upload.send(self._number, body)
        self._number += 1

    def finish(self, last: bytes) -> None:
        """Append ``last`` (at least ``MIN_PART_SIZE`` bytes) and send everything."""
        self._buffer += last
        while len(self._buffer) >= 2 * self._part:
            self._send(self._part)
        if len(self._buffer) > self._part + MIN_PART_SIZE:
            self._send(self._part)
        self._send(len(self._buffer))
