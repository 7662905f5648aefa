"""The object store: the ``ObjectStore`` protocol and its S3 implementation.

A download lands in one pre-allocated numpy buffer that parallel ranged GETs
read straight into, checked against the CRC32 S3 stored (``core.checksums``);
an upload streams through a bounded multipart writer (``core.streaming_upload``
on ``core.multipart``). So a multi-GB blob exists once in memory in either
direction. botocore errors are translated once, in ``core.s3_errors``, into
``core.errors``.
"""

from __future__ import annotations

import functools
import http.client
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import numpy as np
from zlib_ng import zlib_ng

from remote_vector_index_builder.core.checksums import (
    Crc32Check,
    RangeCrcs,
    StoredCrc32,
    plan_ranges,
)
from remote_vector_index_builder.core.errors import (
    DatasetError,
    IntegrityError,
)
from remote_vector_index_builder.core.multipart import (
    CommitCheck,
    NumberedUpload,
    UploadPlan,
    abort_incomplete,
)
from remote_vector_index_builder.core.options import MIB
from remote_vector_index_builder.core.s3_calls import (
    ObjectInfo,
    Progress,
    S3Calls,
    S3Config,
    Sleep,
    submit_in_context,
)
from remote_vector_index_builder.core.s3_errors import BodyCut, Corrupt
from remote_vector_index_builder.core.streaming_upload import MultipartUpload, ReadInto

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# Progress granularity inside a part; it also bounds urllib3's temporary copy.
_READ_CHUNK = 1 * MIB
# Downloads of an object whose CRC32 does not match before the job fails: bits
# flipped in transit heal on the next download; a damaged object does not.
_DOWNLOAD_ROUNDS = 2


class Upload(Protocol):
    """A binary writable stream that becomes one object when closed."""

    bytes_written: int

    def write(self, data: bytes | bytearray | memoryview) -> int: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def __enter__(self) -> Upload: ...
    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class ObjectStore(Protocol):
    def head(self, bucket: str, key: str) -> ObjectInfo: ...
    def download(
        self,
        bucket: str,
        key: str,
        *,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray: ...
    def open_upload(
        self,
        bucket: str,
        key: str,
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
        size_hint: int | None = None,
        commit_check: CommitCheck | None = None,
    ) -> Upload: ...
    def upload_file(
        self,
        bucket: str,
        key: str,
        path: str | os.PathLike[str],
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
        commit_check: CommitCheck | None = None,
    ) -> int: ...
    def abort_incomplete_uploads(self, bucket: str, key: str) -> int: ...


@runtime_checkable
class NumberedUploads(Protocol):
    """A store that can take a multipart upload's parts in any order (S3 can)."""

    @property
    def upload_plan(self) -> UploadPlan: ...

    def open_numbered_upload(
        self,
        bucket: str,
        key: str,
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
        slots: int = 1,
    ) -> NumberedUpload: ...


def _serialized(progress: Progress | None) -> Progress:
    """Progress for worker threads: the caller's callback, one call at a time."""
    lock = threading.Lock()

    def report(nbytes: int) -> None:
        if progress is not None and nbytes > 0:
            with lock:
                progress(nbytes)

    return report


def _page_buffer(size: int) -> np.ndarray:
    """A writable buffer in an anonymous mapping of its own.

    Unlike ``np.empty``, its pages can be handed back to the OS while the array
    lives (``dataset.Dataset.release``), so the builder frees the raw vectors
    batch by batch as the index copies them.
    """
    if size == 0:
        return np.empty(0, dtype=np.uint8)
    # Private, not mmap's default shared mapping: dropping pages of a shared one
    # only unmaps them while the memory itself stays allocated. Not MAP_POPULATE:
    # Python's mmap() holds the GIL, and populating 1 GiB stalled every other thread
    # (the service's event loop too) for ~270 ms (benchmarks/README.md, section 5).
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Transparent huge pages (where the kernel allows them) take one fault per 2 MiB
        # instead of per 4 KiB: faulting in the buffer was ~40 % of a download's CPU
        # (benchmarks/README.md, section 3). Releasing rows later splits them as needed.
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, dtype=np.uint8)


def _direct_reader(body: object) -> http.client.HTTPResponse | None:
    """The ``http.client`` response under a botocore body, when reading it is equivalent.

    botocore's and urllib3's ``readinto`` each read into a temporary ``bytes`` and
    copy it on; the ``http.client`` response reads from the socket straight into the
    caller's buffer. Equivalent only for a plain body (no chunking, no content
    encoding, a Content-Length); otherwise None and the caller reads the usual way.
    """
    raw = getattr(body, "_raw_stream", None)
    reader = getattr(raw, "_fp", None)
    if not isinstance(reader, http.client.HTTPResponse) or reader.chunked:
        return None
    if reader.length is None or reader.getheader("Content-Encoding", "identity") != "identity":
        return None
    return reader


class S3ObjectStore:
    def __init__(self, client: S3Client, config: S3Config, *, sleep: Sleep | None = None) -> None:
        self._s3 = (
            S3Calls(client, config) if sleep is None else S3Calls(client, config, sleep=sleep)
        )
        self._config = config
        self._plan = UploadPlan.of(config)

    @property
    def upload_plan(self) -> UploadPlan:
        return self._plan

    def head(self, bucket: str, key: str) -> ObjectInfo:
        return self._s3.head("head", bucket, key)

    def download(
        self,
        bucket: str,
        key: str,
        *,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        where = f"download of s3://{bucket}/{key}"
        info = self._s3.head("download", bucket, key, checksums=True)
        if expected_size is not None and info.size != expected_size:
            raise DatasetError(
                f"object s3://{bucket}/{key} holds {info.size} bytes, expected {expected_size}"
            )
        buffer = _page_buffer(info.size)
        stored = StoredCrc32.of(info)
        check = None if stored is None else Crc32Check(self._s3, bucket, key, info, stored)
        # Ranges cut at the parts' boundaries where the parts are known: each part's
        # CRC32 then comes from its ranges', with no pass over the buffer afterwards.
        ranged = info.size > self._config.part_size
        parts = check.part_sizes() if check is not None and ranged else None
        crcs = RangeCrcs(plan_ranges(info.size, self._config.part_size, parts))
        for round_ in range(1, _DOWNLOAD_ROUNDS + 1):
            # A repeated download reports no progress: its bytes were counted once.
            self._fetch(bucket, key, info, buffer, progress if round_ == 1 else None, crcs)
            if check is None:
                return buffer  # nothing S3 can verify: sizes and the ETag (IfMatch) only
            mismatch = check.mismatch(buffer, crcs)
            if mismatch is None:
                return buffer
            log.warning("%s: %s (download %d of %d)", where, mismatch, round_, _DOWNLOAD_ROUNDS)
        raise IntegrityError(
            f"{where} failed: the data arrived corrupt {_DOWNLOAD_ROUNDS} times ({mismatch}); "
            "if the object itself is intact (the writer's checksum), retrying the build may "
            "succeed, otherwise upload the vectors again"
        )

    def _fetch(
        self,
        bucket: str,
        key: str,
        info: ObjectInfo,
        buffer: np.ndarray,
        progress: Progress | None,
        crcs: RangeCrcs,
    ) -> None:
        """Fill ``buffer`` with the object (one GET, or parallel ranged GETs) and ``crcs``."""
        target, report, stop = buffer.data, _serialized(progress), threading.Event()
        ranged = info.size > self._config.part_size

        def attempt(index: int, first: int, last: int, reported: list[int]) -> None:
            # A whole-object GET (no Range) lets botocore verify the stored CRC, if any.
            extra: dict[str, Any] = {"Range": f"bytes={first}-{last}"} if ranged else {}
            response = self._s3.client.get_object(
                Bucket=bucket, Key=key, IfMatch=info.etag, **extra
            )
            direct = _direct_reader(response["Body"]) if ranged else None
            body = direct or cast(ReadInto, response["Body"])
            part, filled, crc = target[first : last + 1], 0, 0
            try:
                while filled < len(part) and not stop.is_set():
                    got = body.readinto(part[filled : filled + _READ_CHUNK])
                    if not got:
                        raise BodyCut(f"body ended after {filled} of {len(part)} bytes")
                    # While the chunk is in the cache; zlib-ng releases the GIL.
                    crc = zlib_ng.crc32(part[filled : filled + got], crc)
                    filled += got
                    # A retried range reports only the bytes it did not report before.
                    report(filled - reported[0])
                    reported[0] = max(reported[0], filled)
                if stop.is_set():
                    return
                if direct is not None:
                    # http.client counts down the Content-Length and closes itself at 0.
                    if not direct.isclosed():
                        raise Corrupt(f"body is longer than the {len(part)} bytes asked for")
                    # Fully read: the connection goes back to the pool for the next range.
                    response["Body"]._raw_stream.release_conn()  # type: ignore[attr-defined]
                # Reading past the end lets botocore check Content-Length and any checksum.
                elif body.readinto(memoryview(bytearray(1))):
                    raise Corrupt(f"body is longer than the {len(part)} bytes asked for")
                crcs.crcs[index] = crc
            finally:
                response["Body"].close()

        def fetch(index: int) -> None:
            first, last = crcs.ranges[index]
            where = f"download of s3://{bucket}/{key} (bytes {first}-{last})"
            self._s3.call(where, attempt, index=index, first=first, last=last, reported=[0])

        if len(crcs.ranges) == 1:
            fetch(0)
        elif ranged:
            tasks = [functools.partial(fetch, index) for index in range(len(crcs.ranges))]
            _run_all(tasks, stop, min(self._config.concurrency, len(tasks)))

    def open_upload(
        self,
        bucket: str,
        key: str,
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
        size_hint: int | None = None,
        commit_check: CommitCheck | None = None,
    ) -> MultipartUpload:
        """A streaming upload; ``size_hint`` (the expected size) bounds its buffers.

        ``commit_check`` runs right before the request that makes the object visible.
        """
        part, slots = self._plan.first_part(size_hint), self._plan.in_flight(size_hint)
        report = _serialized(progress)
        return MultipartUpload(
            self._s3, bucket, key, sse_kms_key_id, report, part, slots, commit_check
        )

    def open_numbered_upload(
        self,
        bucket: str,
        key: str,
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
        slots: int = 1,
    ) -> NumberedUpload:
        """A multipart upload started now, whose parts the caller numbers."""
        report = _serialized(progress)
        return NumberedUpload(self._s3, bucket, key, sse_kms_key_id, report, slots)

    def upload_file(
        self,
        bucket: str,
        key: str,
        path: str | os.PathLike[str],
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
        commit_check: CommitCheck | None = None,
    ) -> int:
        size = os.stat(path).st_size
        upload = self.open_upload(
            bucket,
            key,
            sse_kms_key_id=sse_kms_key_id,
            progress=progress,
            size_hint=size,
            commit_check=commit_check,
        )
        # Unbuffered, so the file is read straight into the part buffers.
        with upload, open(path, "rb", buffering=0) as file:
            upload.write_from(file)
        return upload.bytes_written

    def abort_incomplete_uploads(self, bucket: str, key: str) -> int:
        """Abort the incomplete multipart uploads of exactly ``key`` (an earlier attempt's)."""
        return abort_incomplete(self._s3, bucket, key)


def _run_all(tasks: list[functools.partial[None]], stop: threading.Event, workers: int) -> None:
    """Run tasks on a pool; the first failure stops the rest and is raised here."""
    failures: list[BaseException] = []

    def run(task: functools.partial[None]) -> None:
        if not stop.is_set():
            try:
                task()
            except BaseException as exc:
                failures.append(exc)  # list.append is atomic
                stop.set()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-get") as pool:
        for task in tasks:
            # In the caller's contextvars: retry lines carry the job id and stage.
            submit_in_context(pool, run, task)
    if failures:
        raise failures[0]
