"""The streaming upload writer behind ``S3ObjectStore.open_upload``: writes in, parts out.

Writes fill one part buffer at a time; full parts go out as parts 1, 2, ... of
one ``multipart.NumberedUpload``, at most a bounded number in flight, so an
upload holds a few parts in memory whatever the object's size. An object
smaller than one part is a single PutObject.
"""

from __future__ import annotations

import queue
from types import TracebackType
from typing import Protocol

from remote_vector_index_builder.core.checksums import crc32_b64
from remote_vector_index_builder.core.errors import ObjectStoreError
from remote_vector_index_builder.core.multipart import (
    CommitCheck,
    NumberedUpload,
    abort_quietly,
    create_arguments,
)
from remote_vector_index_builder.core.options import MAX_PART_SIZE
from remote_vector_index_builder.core.s3_calls import Progress, S3Calls

# A streamed upload does not know its size: the part size doubles every
# _PARTS_PER_SIZE_STEP parts, so 16 MiB parts reach ~960 GiB, not 156 GiB, within
# S3's 10,000 parts, while small objects keep small parts.
_PARTS_PER_SIZE_STEP = 2_000


class ReadInto(Protocol):
    # botocore-stubs types StreamingBody.readinto as taking IO[bytes]; it takes a buffer.
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class MultipartUpload:
    """Streams writes into parts 1, 2, ... of a ``NumberedUpload``, started once a part is full.

    An object smaller than one part is one PutObject. At most ``slots`` parts
    are in flight (``write`` blocks beyond that), so memory stays near
    ``(slots + 1) * part_size`` whatever the object's size. ``commit_check``
    runs right before the PutObject or CompleteMultipartUpload (``close``).
    """

    def __init__(
        self,
        s3: S3Calls,
        bucket: str,
        key: str,
        sse: str | None,
        report: Progress,
        part_size: int,
        slots: int,
        commit_check: CommitCheck | None = None,
    ) -> None:
        self._s3 = s3
        self._commit_check = commit_check
        self._bucket, self._key, self._sse = bucket, key, sse
        self._report = report
        self._where = f"upload of s3://{bucket}/{key}"
        self.bytes_written = 0
        self._part_size = part_size
        self._buffer, self._filled = bytearray(part_size), 0
        self._spare: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._slot_count = slots
        self._upload: NumberedUpload | None = None
        self._parts = 0
        self._state = "open"  # -> "closed" | "aborted"

    @property
    def part_size(self) -> int:
        """The first part's size (later parts of a long stream grow)."""
        return self._part_size

    @property
    def parts_in_flight(self) -> int:
        return self._slot_count

    def __enter__(self) -> MultipartUpload:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            abort_quietly(self)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        source, done = memoryview(data).cast("B"), 0
        while done < len(source):
            self._make_room()
            take = min(len(source) - done, len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = source[done : done + take]
            self._filled += take
            done += take
        self.bytes_written += done
        return done

    def write_from(self, file: ReadInto) -> None:
        while True:
            self._make_room()
            got = file.readinto(memoryview(self._buffer)[self._filled :])
            if not got:
                return
            self._filled += got
            self.bytes_written += got

    def _make_room(self) -> None:
        if self._state != "open":
            raise ObjectStoreError(f"{self._where} failed: write after close or abort")
        if self._upload is not None:
            self._upload.check()
        if self._filled == len(self._buffer):
            self._send_buffer()

    def _send_buffer(self) -> None:
        if self._upload is None:
            self._upload = NumberedUpload(
                self._s3,
                self._bucket,
                self._key,
                self._sse,
                self._report,
                self._slot_count,
                workers=self._slot_count,
            )
        self._parts += 1
        number, buffer = self._parts, self._buffer
        if self._filled == len(buffer):
            self._upload.send(number, buffer, sent=lambda: self._spare.put(buffer))
        else:  # a short last part: only it is copied
            self._upload.send(number, bytes(memoryview(buffer)[: self._filled]))
            self._spare.put(buffer)
        size = min(MAX_PART_SIZE, self._part_size * 2 ** (number // _PARTS_PER_SIZE_STEP))
        self._buffer = self._spare.get_nowait() if not self._spare.empty() else bytearray(size)
        if len(self._buffer) != size:
            self._buffer = bytearray(size)
        self._filled = 0

    def close(self) -> None:
        if self._state == "closed":
            return
        if self._state == "aborted":
            raise ObjectStoreError(f"{self._where} failed: the upload was aborted")
        try:
            if self._upload is None:
                self._put()
            else:
                if self._filled:
                    self._send_buffer()
                self._upload.complete(self._commit_check)
        except BaseException:
            abort_quietly(self)
            raise
        self._state = "closed"

    def _put(self) -> None:
        body = bytes(memoryview(self._buffer)[: self._filled])
        # Reported before the PUT, so a cancelling callback leaves no object behind.
        self._report(len(body))
        create = create_arguments(self._bucket, self._key, self._sse)
        create["ChecksumCRC32"] = crc32_b64(body)
        if self._commit_check is not None:
            self._commit_check()
        self._s3.call(self._where, self._s3.client.put_object, **create, Body=body)

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        if self._upload is not None:
            self._upload.abort()
