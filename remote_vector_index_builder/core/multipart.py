"""S3's multipart upload protocol, spoken in one place.

``NumberedUpload`` is the one engine: it creates the upload, sends numbered
parts with their CRC32 from a bounded pool, completes it (recovering a
completion whose answer was lost) and aborts it. Both index upload writers
drive it: the streaming writer behind ``S3ObjectStore.open_upload``
(``core.streaming_upload``) numbers its parts 1, 2, ... as its buffers fill;
the upload overlapped with the build (``core.overlapped_upload``) sends the
storage section's parts first, under the highest numbers. The part size and
the parts in flight are chosen here too, by ``UploadPlan``, which
``core.memory`` reads for admission.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

from remote_vector_index_builder.core.checksums import crc32_b64
from remote_vector_index_builder.core.errors import ObjectStoreError
from remote_vector_index_builder.core.options import MIN_PART_SIZE
from remote_vector_index_builder.core.s3_calls import (
    MAX_CONCURRENCY,
    Progress,
    S3Calls,
    S3Config,
    submit_in_context,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

# Runs right before the request that makes an object visible (CompleteMultipartUpload,
# PutObject); raising stops the upload (``workflow.Tracker.commit_check``).
CommitCheck = Callable[[], None]

# An upload whose size is known keeps at most this share of it in flight (and at
# least one part): with every connection busy, a 92 MB index held 88 MB of part
# copies beside itself. Its parts are at most an eighth of it (and at least 5 MiB),
# so that share is two parts or more.
UPLOAD_BUFFER_SHARE = 4
_PARTS_PER_KNOWN_SIZE = 8
# S3's largest part number.
MAX_PARTS = 10_000


@dataclass(frozen=True)
class UploadPlan:
    """How uploads are cut into parts and how many are in flight.

    One plan, derived from the S3 settings, is read both by the store
    (``S3ObjectStore.open_upload``) and by admission (``core.memory.estimate``),
    so the memory a job is admitted with is the memory its upload holds.
    """

    part_size: int
    concurrency: int

    @classmethod
    def of(cls, config: S3Config) -> UploadPlan:
        return cls(config.part_size, config.concurrency)

    def first_part(self, size: int | None) -> int:
        """The (first) part size of an upload of ``size`` bytes (None: unknown)."""
        if size is None:
            return self.part_size
        return min(self.part_size, max(MIN_PART_SIZE, size // _PARTS_PER_KNOWN_SIZE))

    def in_flight(self, size: int | None) -> int:
        """Parts sent at once by an upload of ``size`` bytes."""
        if size is None:
            return self.concurrency
        part = self.first_part(size)
        return max(1, min(self.concurrency, size // (UPLOAD_BUFFER_SHARE * part)))

    def buffer_bytes(self, size: int | None) -> int:
        """Most memory the part buffers of one upload hold: in flight plus the one filling."""
        return self.first_part(size) * (self.in_flight(size) + 1)


def abort_upload(s3: S3Calls, where: str, target: dict[str, Any], upload_id: str) -> None:
    """Abort a multipart upload; one already gone (NoSuchUpload) counts as aborted.

    Retried like any call: a throttled abort would leave the parts behind.
    """
    abort = s3.client.abort_multipart_upload
    try:
        s3.call(f"abort of {where}", abort, **target, UploadId=upload_id)
    except ObjectStoreError as exc:
        if exc.code != "NoSuchUpload":
            raise


def abort_incomplete(s3: S3Calls, bucket: str, key: str) -> int:
    """Abort every incomplete multipart upload of exactly ``key``; returns how many.

    What a process killed mid-upload leaves behind (its parts are stored, and
    billed, until aborted). Listed by prefix, so keys that only start with
    ``key`` are skipped.
    """
    where = f"listing of incomplete uploads of s3://{bucket}/{key}"
    target = {"Bucket": bucket, "Key": key}
    aborted, markers = 0, dict[str, str]()
    while True:
        listing = s3.call(
            where, s3.client.list_multipart_uploads, Bucket=bucket, Prefix=key, **markers
        )
        for upload in listing.get("Uploads", []):
            if upload.get("Key") == key and "UploadId" in upload:
                abort_upload(s3, f"upload of s3://{bucket}/{key}", target, upload["UploadId"])
                aborted += 1
        if not listing.get("IsTruncated"):
            return aborted
        markers = {
            "KeyMarker": listing.get("NextKeyMarker", ""),
            "UploadIdMarker": listing.get("NextUploadIdMarker", ""),
        }


class _Abortable(Protocol):
    def abort(self) -> None: ...


def abort_quietly(upload: _Abortable) -> None:
    """Abort after a failure: the error that made us abort matters more than the clean-up's."""
    try:
        upload.abort()
    except ObjectStoreError as exc:
        log.warning("%s; an incomplete multipart upload may remain", exc)


def create_arguments(bucket: str, key: str, sse: str | None) -> dict[str, Any]:
    """The parameters of the calls that create the object (CreateMultipartUpload, PutObject)."""
    create: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumAlgorithm": "CRC32"}
    if sse is not None:
        create |= {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": sse}
    return create


class NumberedUpload:
    """One multipart upload, started at once; the caller numbers the parts.

    S3 joins parts in part-number order, gaps allowed, once ``complete`` lists
    them; every part but the one with the highest number must be at least 5 MiB
    (the caller's business), and parts may be sent in any order. Each part
    carries its CRC32, which S3 checks before taking it. Parts are sent from a
    pool, at most ``slots`` in flight (``send`` blocks beyond that; ``widen``
    raises the bound up to ``workers``). Any failure is raised by the next
    ``send`` (or ``check``) or by ``complete``; ``abort`` (also on leaving a
    ``with`` block by an exception, and on any failure of ``complete``) removes
    every part sent.
    """

    def __init__(
        self,
        s3: S3Calls,
        bucket: str,
        key: str,
        sse: str | None,
        report: Progress,
        slots: int,
        *,
        workers: int = MAX_CONCURRENCY,
    ) -> None:
        self._s3 = s3
        self._report = report
        self._where = f"upload of s3://{bucket}/{key}"
        self._object: dict[str, Any] = {"Bucket": bucket, "Key": key}
        create = s3.client.create_multipart_upload
        arguments = create_arguments(bucket, key, sse)
        self._upload_id: str = s3.call(self._where, create, **arguments)["UploadId"]
        self._slots = threading.Semaphore(slots)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="s3-put")
        self._parts: dict[int, Future[CompletedPartTypeDef]] = {}
        self._failure: BaseException | None = None
        self.bytes_sent = 0
        self._state = "open"  # -> "closed" | "aborted"

    def __enter__(self) -> NumberedUpload:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            abort_quietly(self)

    def widen(self, slots: int) -> None:
        """Allow ``slots`` more parts in flight."""
        for _ in range(slots):
            self._slots.release()

    def has_room(self) -> bool:
        """Whether a ``send`` now would not wait for a part in flight (one sending thread)."""
        if not self._slots.acquire(blocking=False):
            return False
        self._slots.release()
        return True

    def check(self) -> None:
        """Raise the failure of a part sent earlier, if any."""
        if self._failure is not None:
            raise self._failure

    def send(
        self,
        number: int,
        body: bytes | bytearray,
        *,
        checksum: str | None = None,
        sent: Callable[[], None] | None = None,
    ) -> None:
        """Send part ``number``; ``body`` must stay unchanged until ``sent`` is called.

        ``checksum`` (S3's base64 CRC32 of ``body``) is computed in the sending
        thread when not given: zlib-ng releases the GIL, so parts are checksummed
        in parallel, and once, not per attempt. ``sent`` runs once the part is
        done with, sent or not.
        """
        if self._state != "open":
            raise ObjectStoreError(f"{self._where} failed: send after complete or abort")
        if number in self._parts or not 1 <= number <= MAX_PARTS:
            raise ValueError(f"part number {number} is sent already or out of 1..{MAX_PARTS}")
        self.check()
        self._slots.acquire()  # blocks while `slots` parts are in flight
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        self.bytes_sent += len(body)
        task = self._send
        self._parts[number] = submit_in_context(self._pool, task, number, body, checksum, sent)

    def _send(
        self,
        number: int,
        body: bytes | bytearray,
        checksum: str | None,
        sent: Callable[[], None] | None,
    ) -> CompletedPartTypeDef:
        try:
            response = self._s3.call(
                f"{self._where} (part {number})",
                self._s3.client.upload_part,
                **self._object,
                UploadId=self._upload_id,
                PartNumber=number,
                # botocore takes bytes or bytearray (not a memoryview) and copies neither.
                Body=cast(bytes, body),
                ChecksumAlgorithm="CRC32",
                ChecksumCRC32=checksum or crc32_b64(body),
            )
            self._report(len(body))
        except BaseException as exc:
            self._failure = self._failure or exc  # any one failure will do
            raise
        finally:
            if sent is not None:
                sent()
            self._slots.release()
        part: CompletedPartTypeDef = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in response:  # some S3-compatible stores ignore checksums
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part

    def complete(self, commit_check: CommitCheck | None = None) -> None:
        """Wait for every part, then join them into the object (in part-number order).

        ``commit_check`` runs right before the request that makes the object
        visible; if it raises, the upload is aborted and nothing is visible.
        """
        if self._state != "open":
            raise ObjectStoreError(f"{self._where} failed: the upload was aborted")
        try:
            self._pool.shutdown(wait=True)
            self.check()
            parts = [self._parts[number].result() for number in sorted(self._parts)]
            upload = {"UploadId": self._upload_id, "MultipartUpload": {"Parts": parts}}
            complete = self._s3.client.complete_multipart_upload
            if commit_check is not None:
                commit_check()
            try:
                self._s3.call(self._where, complete, **self._object, **upload)
            except ObjectStoreError as exc:
                if not (exc.code == "NoSuchUpload" and self._completed_as(parts)):
                    raise
        except BaseException:
            abort_quietly(self)
            raise
        self._state = "closed"

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
            info = self._s3.head("upload check", self._object["Bucket"], self._object["Key"])
        except ObjectStoreError:
            return False
        found = info.etag == expected and info.size == self.bytes_sent
        if found:
            log.info(
                "%s: the completed object exists, its completion response was lost", self._where
            )
        return found

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        # Parts still in flight would otherwise land after the abort and linger.
        self._pool.shutdown(wait=True, cancel_futures=True)
        abort_upload(self._s3, self._where, self._object, self._upload_id)
