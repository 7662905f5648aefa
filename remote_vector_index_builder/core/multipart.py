"""The streaming multipart upload writer behind ``S3ObjectStore.open_upload``.

Writes fill one part buffer at a time; full parts go out in parallel, at most a
bounded number in flight, so an upload holds a few parts in memory whatever the
object's size. The part size and the parts in flight are chosen here too
(``core.memory`` mirrors that choice for admission).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from botocore import exceptions as bce
from zlib_ng import zlib_ng

from remote_vector_index_builder.core.errors import ObjectStoreError
from remote_vector_index_builder.core.s3_errors import code_of

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

    from remote_vector_index_builder.core.object_store import (
        Progress,
        S3Config,
        S3ObjectStore,
        _ReadInto,
    )

log = logging.getLogger(__name__)

MIB = 1024**2
GIB = 1024**3
# S3's size limits for every multipart part but the last.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * GIB
# A streamed upload does not know its size: the part size doubles every
# _PARTS_PER_SIZE_STEP parts, so 16 MiB parts reach ~960 GiB, not 156 GiB, within
# S3's 10,000 parts, while small objects keep small parts.
_PARTS_PER_SIZE_STEP = 2_000
# An upload whose size is known keeps at most this share of it in flight (and at
# least one part): with every connection busy, a 92 MB index held 88 MB of part
# copies beside itself. Its parts are at most an eighth of it (and at least 5 MiB),
# so that share is two parts or more.
UPLOAD_BUFFER_SHARE = 4
_PARTS_PER_KNOWN_SIZE = 8


def crc32_b64(data: bytes | bytearray) -> str:
    """S3's ``ChecksumCRC32``: the big-endian CRC32 of ``data``, base64-encoded."""
    return base64.b64encode(zlib_ng.crc32(data).to_bytes(4, "big")).decode("ascii")


def part_plan(size: int | None, part_size: int, concurrency: int) -> tuple[int, int]:
    """(first part size, parts in flight) of an upload of ``size`` bytes (None: unknown)."""
    if size is None:
        return part_size, concurrency
    part = min(part_size, max(MIN_PART_SIZE, size // _PARTS_PER_KNOWN_SIZE))
    return part, max(1, min(concurrency, size // (UPLOAD_BUFFER_SHARE * part)))


def planned_buffer_bytes(size: int | None, part_size: int, concurrency: int) -> int:
    """Most memory the part buffers of one upload hold: in flight plus the one filling."""
    part, in_flight = part_plan(size, part_size, concurrency)
    return part * (in_flight + 1)


def upload_part_size(config: S3Config, size: int | None) -> int:
    return part_plan(size, config.part_size, config.concurrency)[0]


def parts_in_flight(config: S3Config, size: int | None) -> int:
    return part_plan(size, config.part_size, config.concurrency)[1]


def upload_buffer_bytes(config: S3Config, size: int | None) -> int:
    return planned_buffer_bytes(size, config.part_size, config.concurrency)


class MultipartUpload:
    """Streams writes into parts; a multipart upload starts only once a part is full.

    At most ``slots`` parts are in flight (``write`` blocks beyond that), so
    memory stays near ``(slots + 1) * part_size`` whatever the object's size.
    """

    def __init__(
        self,
        store: S3ObjectStore,
        bucket: str,
        key: str,
        sse: str | None,
        report: Progress,
        part_size: int,
        slots: int,
    ) -> None:
        self._store, self._client, self._config = store, store._client, store._config
        self._report = report
        self._where = f"upload of s3://{bucket}/{key}"
        self._object: dict[str, Any] = {"Bucket": bucket, "Key": key}
        # The parameters of the calls that create the object.
        self._create: dict[str, Any] = {**self._object, "ChecksumAlgorithm": "CRC32"}
        if sse is not None:
            self._create |= {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": sse}
        self.bytes_written = 0
        self._part_size = part_size
        self._buffer, self._filled = bytearray(part_size), 0
        self._spare: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._slots, self._slot_count = threading.Semaphore(slots), slots
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._parts: list[Future[CompletedPartTypeDef]] = []
        self._failure: BaseException | None = None
        self._state = "open"  # -> "closed" | "aborted"

    def __enter__(self) -> MultipartUpload:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self._abort_quietly()

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

    def write_from(self, file: _ReadInto) -> None:
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
        if self._failure is not None:
            raise self._failure
        if self._filled == len(self._buffer):
            self._send_buffer()

    def _send_buffer(self) -> None:
        if self._upload_id is None:
            create = self._client.create_multipart_upload
            self._upload_id = self._store._call(self._where, create, **self._create)["UploadId"]
            self._pool = ThreadPoolExecutor(self._slot_count, thread_name_prefix="s3-put")
        assert self._pool is not None
        self._slots.acquire()  # blocks while `slots` parts are in flight
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._send_part, number, self._buffer, self._filled))
        size = min(MAX_PART_SIZE, self._part_size * 2 ** (number // _PARTS_PER_SIZE_STEP))
        self._buffer = self._spare.get_nowait() if not self._spare.empty() else bytearray(size)
        if len(self._buffer) != size:
            self._buffer = bytearray(size)
        self._filled = 0

    def _send_part(self, number: int, buffer: bytearray, filled: int) -> CompletedPartTypeDef:
        # botocore takes bytes or bytearray, not a memoryview: only a short last part is copied.
        body = cast(bytes, buffer) if filled == len(buffer) else bytes(memoryview(buffer)[:filled])
        try:
            # zlib-ng releases the GIL: parts are checksummed in parallel, once, not per attempt.
            checksum = crc32_b64(body)
            response = self._store._call(
                f"{self._where} (part {number})",
                self._client.upload_part,
                **self._object,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32",
                ChecksumCRC32=checksum,
            )
            self._report(filled)
        except BaseException as exc:
            self._failure = self._failure or exc  # any one failure will do
            raise
        finally:
            self._spare.put(buffer)
            self._slots.release()
        part: CompletedPartTypeDef = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in response:  # some S3-compatible stores ignore checksums
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part

    def close(self) -> None:
        if self._state == "closed":
            return
        if self._state == "aborted":
            raise ObjectStoreError(f"{self._where} failed: the upload was aborted")
        try:
            if self._upload_id is None:
                body = bytes(memoryview(self._buffer)[: self._filled])
                # Reported before the PUT, so a cancelling callback leaves no object behind.
                self._report(len(body))
                put = self._client.put_object
                checksum = crc32_b64(body)
                create = {**self._create, "ChecksumCRC32": checksum}
                self._store._call(self._where, put, **create, Body=body)
            else:
                self._complete()
        except BaseException:
            self._abort_quietly()
            raise
        self._state = "closed"

    def _complete(self) -> None:
        assert self._pool is not None
        if self._filled:
            self._send_buffer()
        self._pool.shutdown(wait=True)
        if self._failure is not None:
            raise self._failure
        parts = [future.result() for future in self._parts]
        complete = self._client.complete_multipart_upload
        upload = {"UploadId": self._upload_id, "MultipartUpload": {"Parts": parts}}
        try:
            self._store._call(self._where, complete, **self._object, **upload)
        except ObjectStoreError as exc:
            cause = exc.__cause__
            lost = isinstance(cause, bce.ClientError) and code_of(cause) == "NoSuchUpload"
            if not (lost and self._completed_as(parts)):
                raise

    def _completed_as(self, parts: list[CompletedPartTypeDef]) -> bool:
        """Whether the object is the one these parts make (a retried complete whose
        first response was lost finds the upload gone: S3 answers NoSuchUpload).

        S3's multipart ETag is the MD5 of the parts' binary MD5s, then "-<parts>".
        """
        try:
            digests = b"".join(bytes.fromhex(part["ETag"].strip('"')) for part in parts)
        except ValueError:
            return False  # a store whose part ETags are not MD5s: nothing to compare
        expected = f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'
        try:
            info = self._store._head("upload check", self._object["Bucket"], self._object["Key"])
        except ObjectStoreError:
            return False
        found = info.etag == expected and info.size == self.bytes_written
        if found:
            log.info(
                "%s: the completed object exists, its completion response was lost", self._where
            )
        return found

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        if self._pool is not None:
            # Parts still in flight would otherwise land after the abort and linger.
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._upload_id is None:
            return
        abort = self._client.abort_multipart_upload
        try:
            # Retried like any call: a throttled abort would leave the parts behind.
            where = f"abort of {self._where}"
            self._store._call(where, abort, **self._object, UploadId=self._upload_id)
        except ObjectStoreError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, bce.ClientError) and code_of(cause) == "NoSuchUpload"):
                raise

    def _abort_quietly(self) -> None:
        # The error that made us abort matters more than a failed clean-up.
        try:
            self.abort()
        except ObjectStoreError as exc:
            log.warning("%s; an incomplete multipart upload may remain", exc)
