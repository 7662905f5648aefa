"""The object store: the ``ObjectStore`` protocol and its S3 implementation.

A download lands in one pre-allocated numpy buffer that parallel ranged GETs
read straight into; an upload streams through a bounded multipart writer. So a
multi-GB blob exists once in memory in either direction. botocore errors are
translated here, once, into ``core.errors``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import logging
import math
import mmap
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import boto3
import numpy as np
from botocore import UNSIGNED
from botocore import exceptions as bce
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field, field_validator
from urllib3.exceptions import ProtocolError
from zlib_ng import zlib_ng

from remote_vector_index_builder.core import errors
from remote_vector_index_builder.core.errors import DatasetError, ObjectStoreError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIB = 1024**2
GIB = 1024**3
# S3's size limits for every multipart part but the last.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * GIB
# aws-c-s3 (the CRT transfer client) plans 10 connections per 4 Gbit/s S3 endpoint
# address, i.e. 0.4 Gbit/s (50 MB/s) per connection; we size the pools the same way.
GBPS_PER_CONNECTION = 0.4
MIN_CONCURRENCY = 2
MAX_CONCURRENCY = 64
# HEADs and the multipart control calls run beside a full set of part transfers.
_SPARE_CONNECTIONS = 4
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
# Progress granularity inside a part; it also bounds urllib3's temporary copy.
_READ_CHUNK = 1 * MIB
# Full-jitter exponential backoff (AWS's advice for throttling): 0.5, 1, 2, ... s, at most 10.
_BACKOFF_BASE_S = 0.25
_BACKOFF_CAP_S = 10.0

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_DENIED |= {"ExpiredToken", "InvalidToken", "AllAccessDisabled", "KMS.AccessDeniedException"}
_CHANGED = {"PreconditionFailed", "412"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}
_TRANSIENT |= {"InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
_NO_CREDS = (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)

Progress = Callable[[int], None]
Sleep = Callable[[float], None]
_T = TypeVar("_T")


class S3Config(BaseModel):
    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    unsigned: bool = False
    throughput_target_gbps: float = Field(10.0, gt=0)
    # 16 MiB ranges halved the requests, and so the client's CPU, of 8 MiB ones:
    # 0.55 vs 0.85 CPU-s per GiB downloaded (benchmarks/README.md, section 3).
    part_size: int = 16 * MIB
    max_attempts: int = Field(5, ge=1)
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)

    @field_validator("part_size")
    @classmethod
    def _check_part_size(cls, value: int) -> int:
        if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
            raise ValueError(
                f"part_size must be between 5 MiB ({MIN_PART_SIZE} bytes) and 5 GiB "
                f"({MAX_PART_SIZE} bytes), S3's multipart limits; got {value}"
            )
        return value

    @property
    def concurrency(self) -> int:
        wanted = math.ceil(self.throughput_target_gbps / GBPS_PER_CONNECTION)
        return max(MIN_CONCURRENCY, min(MAX_CONCURRENCY, wanted))


def make_s3_client(config: S3Config, concurrent_jobs: int = 1) -> S3Client:
    """One client for the process; ``concurrent_jobs`` builds may transfer at once."""
    extra: dict[str, Any] = {}
    s3: dict[str, Any] = {}
    if config.path_style:
        s3["addressing_style"] = "path"
    if config.endpoint_url is None or config.endpoint_url.lower().startswith("https:"):
        # Uploads carry a CRC32 we compute as a signed header, so over TLS botocore need
        # not hash each body again with SHA-256 (its own rule for TLS plus a checksum
        # header); without a header it would stream the body through its aws-chunked
        # trailer wrapper, which copies each 1 MiB chunk per 16 KiB read. Plain-HTTP
        # endpoints keep signed payloads. benchmarks/README.md has the CPU-s per GiB.
        s3["payload_signing_enabled"] = False
    if s3:
        extra["s3"] = s3
    if config.unsigned:
        extra["signature_version"] = UNSIGNED
    botocore_config = Config(
        # Each job's transfers open up to ``concurrency`` connections; a smaller pool
        # makes urllib3 drop and re-open connections for the jobs that share it.
        max_pool_connections=config.concurrency * concurrent_jobs + _SPARE_CONNECTIONS,
        # One attempt per botocore call: ``S3ObjectStore._call`` owns every retry, so
        # max_attempts bounds the attempts (botocore's retries inside ours multiplied
        # them: 3 x 3 GETs for max_attempts 3) and all backoff goes through one sleep.
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        tcp_keepalive=True,
        **extra,
    )
    # A session of its own: boto3's default session is not safe to share between threads.
    session = boto3.session.Session(region_name=config.region)
    return session.client("s3", endpoint_url=config.endpoint_url, config=botocore_config)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    sse_kms_key_id: str | None


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
    ) -> Upload: ...
    def upload_file(
        self,
        bucket: str,
        key: str,
        path: str | os.PathLike[str],
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
    ) -> int: ...
    def exists(self, bucket: str, key: str) -> bool: ...


class _ReadInto(Protocol):
    # botocore-stubs types StreamingBody.readinto as taking IO[bytes]; it takes a buffer.
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class _Cut(ConnectionError):
    """A body that ended early: the connection was cut."""


class _Corrupt(Exception):
    """A body other than the one asked for."""


# SSLError is a ConnectionError too, but a certificate problem does not heal by retrying.
_TRANSIENT_IO: tuple[type[Exception], ...] = (bce.HTTPClientError, bce.ConnectionError)
_TRANSIENT_IO += (bce.IncompleteReadError, ProtocolError, ConnectionError, TimeoutError)
_CORRUPT_IO = (bce.FlexibleChecksumError, bce.ChecksumError, _Corrupt)


def _crc32(data: bytes | bytearray) -> str:
    """S3's ``ChecksumCRC32``: the big-endian CRC32 of ``data``, base64-encoded."""
    return base64.b64encode(zlib_ng.crc32(data).to_bytes(4, "big")).decode("ascii")


def _serialized(progress: Progress | None) -> Progress:
    """Progress for worker threads: the caller's callback, one call at a time."""
    lock = threading.Lock()

    def report(nbytes: int) -> None:
        if progress is not None and nbytes > 0:
            with lock:
                progress(nbytes)

    return report


def _code(exc: bce.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _code(exc) in _TRANSIENT or status >= 500
    return isinstance(exc, _TRANSIENT_IO + _CORRUPT_IO) and not isinstance(exc, bce.SSLError)


def _bucket_missing(where: str) -> errors.BucketNotFoundError:
    return errors.BucketNotFoundError(
        f"{where} failed: bucket does not exist; check container_name and the "
        "S3 endpoint and region of the service"
    )


def _translate(exc: Exception, where: str, attempts: int) -> ObjectStoreError:
    """Our error for a botocore/urllib3 one; ``where`` reads "<op> of s3://b/k (detail)"."""
    if isinstance(exc, bce.ClientError):
        code = _code(exc)
        if code == "NoSuchBucket":
            return _bucket_missing(where)
        if code in _NOT_FOUND:
            return errors.ObjectNotFoundError(
                f"{where} failed: object does not exist; check vector_path / doc_id_path "
                "and that the client finished uploading it"
            )
        if code in _DENIED:
            return errors.AccessDeniedError(
                f"{where} failed: access denied ({code}); check the service's AWS "
                "credentials, the bucket policy (S3 answers 403 for a missing key when "
                "s3:ListBucket is not granted) and, for SSE-KMS objects, the KMS key policy"
            )
        if code in _CHANGED:
            return errors.IntegrityError(
                f"{where} failed: the object was replaced while it was being read "
                "(its ETag changed); start the build again once the writer has finished"
            )
        if not _retryable(exc):
            message = exc.response.get("Error", {}).get("Message", "")
            return ObjectStoreError(f"{where} failed: S3 error {code}: {message}")
    elif isinstance(exc, _NO_CREDS):
        return errors.AccessDeniedError(
            f"{where} failed: no usable AWS credentials ({exc}); configure the standard "
            "credential chain (environment, profile, instance or pod role)"
        )
    elif isinstance(exc, _CORRUPT_IO):
        return errors.IntegrityError(
            f"{where} failed: the data arrived corrupt {attempts} time(s) ({exc}); "
            "if the object itself is intact, retrying the build may succeed"
        )
    elif not _retryable(exc):
        return ObjectStoreError(f"{where} failed: {type(exc).__name__}: {exc}")
    return errors.TransientStoreError(
        f"{where} failed after {attempts} attempt(s): {_cause(exc)}; the error is "
        "transient (throttling, 5xx, timeout or reset): the build is retryable"
    )


def _cause(exc: Exception) -> str:
    # botocore's own wording says "reached max retries: 0" (we retry, it does not) and,
    # for a body that stalls, names the endpoint URL "None".
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"S3 answered {status} {error.get('Code', '')}: {error.get('Message', '')}"
    if isinstance(exc, (bce.ReadTimeoutError, TimeoutError)):
        return "ReadTimeoutError: no data arrived within the read timeout"
    return f"{type(exc).__name__}: {exc}"


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
    def __init__(self, client: S3Client, config: S3Config, *, sleep: Sleep = time.sleep) -> None:
        self._client = client
        self._config = config
        self._sleep = sleep

    def _call(self, where: str, call: Callable[..., _T], **kwargs: Any) -> _T:
        """``call(**kwargs)`` with bounded, jittered exponential backoff on transient errors.

        botocore retries the request itself; this loop also covers what it cannot:
        a body that breaks or ends early while we stream it.
        """
        attempts = self._config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return call(**kwargs)
            except (bce.ClientError, bce.BotoCoreError, ProtocolError, OSError, _Corrupt) as exc:
                if attempt == attempts or not _retryable(exc):
                    raise _translate(exc, where, attempt) from exc
                log.info("%s: attempt %d failed (%s), retrying", where, attempt, exc)
            self._sleep(random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt)))
        raise AssertionError("unreachable")

    def _head(self, op: str, bucket: str, key: str) -> ObjectInfo:
        where = f"{op} of s3://{bucket}/{key}"
        try:
            response = self._call(where, self._client.head_object, Bucket=bucket, Key=key)
        except errors.ObjectNotFoundError:
            # HEAD has no body, so a missing bucket is a bare 404 too: ask the bucket.
            try:
                self._client.head_bucket(Bucket=bucket)
            except bce.ClientError as exc:
                if _code(exc) in {"404", "NoSuchBucket"}:
                    raise _bucket_missing(where) from exc
            except (bce.BotoCoreError, OSError):
                pass  # the object is missing either way
            raise
        key_id = response.get("SSEKMSKeyId")
        return ObjectInfo(response["ContentLength"], response["ETag"], key_id)

    def head(self, bucket: str, key: str) -> ObjectInfo:
        return self._head("head", bucket, key)

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._head("exists check", bucket, key)
        except errors.ObjectNotFoundError:
            return False
        return True

    def download(
        self,
        bucket: str,
        key: str,
        *,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        info = self._head("download", bucket, key)
        if expected_size is not None and info.size != expected_size:
            raise DatasetError(
                f"object s3://{bucket}/{key} holds {info.size} bytes, expected {expected_size}"
            )
        buffer = _page_buffer(info.size)
        target, report, stop = buffer.data, _serialized(progress), threading.Event()
        ranged = info.size > self._config.part_size

        def attempt(first: int, last: int, reported: list[int]) -> None:
            # A whole-object GET (no Range) lets botocore verify the stored CRC, if any.
            extra: dict[str, Any] = {"Range": f"bytes={first}-{last}"} if ranged else {}
            response = self._client.get_object(Bucket=bucket, Key=key, IfMatch=info.etag, **extra)
            # Whole objects go through botocore, which verifies a stored checksum.
            direct = _direct_reader(response["Body"]) if ranged else None
            body = direct or cast(_ReadInto, response["Body"])
            part, filled = target[first : last + 1], 0
            try:
                while filled < len(part) and not stop.is_set():
                    got = body.readinto(part[filled : filled + _READ_CHUNK])
                    if not got:
                        raise _Cut(f"body ended after {filled} of {len(part)} bytes")
                    filled += got
                    # A retried range reports only the bytes it did not report before.
                    report(filled - reported[0])
                    reported[0] = max(reported[0], filled)
                if stop.is_set():
                    return
                if direct is not None:
                    # http.client counts down the Content-Length and closes itself at 0.
                    if not direct.isclosed():
                        raise _Corrupt(f"body is longer than the {len(part)} bytes asked for")
                    # Fully read: the connection goes back to the pool for the next range.
                    response["Body"]._raw_stream.release_conn()  # type: ignore[attr-defined]
                # Reading past the end lets botocore check Content-Length and any checksum.
                elif body.readinto(memoryview(bytearray(1))):
                    raise _Corrupt(f"body is longer than the {len(part)} bytes asked for")
            finally:
                response["Body"].close()

        def fetch(first: int) -> None:
            last = min(first + self._config.part_size, info.size) - 1
            where = f"download of s3://{bucket}/{key} (bytes {first}-{last})"
            self._call(where, attempt, first=first, last=last, reported=[0])

        starts = range(0, info.size, self._config.part_size)
        if len(starts) == 1:
            fetch(0)
        elif ranged:
            tasks = [functools.partial(fetch, first) for first in starts]
            _run_all(tasks, stop, min(self._config.concurrency, len(tasks)))
        return buffer

    def open_upload(
        self,
        bucket: str,
        key: str,
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
        size_hint: int | None = None,
    ) -> _S3Upload:
        """A streaming upload; ``size_hint`` (the expected size) bounds its buffers."""
        part = upload_part_size(self._config, size_hint)
        slots = parts_in_flight(self._config, size_hint)
        return _S3Upload(self, bucket, key, sse_kms_key_id, _serialized(progress), part, slots)

    def upload_file(
        self,
        bucket: str,
        key: str,
        path: str | os.PathLike[str],
        *,
        sse_kms_key_id: str | None = None,
        progress: Progress | None = None,
    ) -> int:
        size = os.stat(path).st_size
        upload = self.open_upload(
            bucket, key, sse_kms_key_id=sse_kms_key_id, progress=progress, size_hint=size
        )
        # Unbuffered, so the file is read straight into the part buffers.
        with upload, open(path, "rb", buffering=0) as file:
            upload.write_from(file)
        return upload.bytes_written


def upload_part_size(config: S3Config, size: int | None) -> int:
    """The first part size of an upload of ``size`` bytes (None: unknown)."""
    if size is None:
        return config.part_size
    return min(config.part_size, max(MIN_PART_SIZE, size // _PARTS_PER_KNOWN_SIZE))


def parts_in_flight(config: S3Config, size: int | None) -> int:
    """Parts an upload of ``size`` bytes (None: unknown) sends at once."""
    if size is None:
        return config.concurrency
    share = size // (UPLOAD_BUFFER_SHARE * upload_part_size(config, size))
    return max(1, min(config.concurrency, share))


def upload_buffer_bytes(config: S3Config, size: int | None) -> int:
    """Most memory the part buffers of one upload hold: in flight plus the one filling."""
    return upload_part_size(config, size) * (parts_in_flight(config, size) + 1)


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
            pool.submit(run, task)
    if failures:
        raise failures[0]


class _S3Upload:
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

    def __enter__(self) -> _S3Upload:
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
            checksum = _crc32(body)
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
                checksum = _crc32(body)
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
            lost = isinstance(cause, bce.ClientError) and _code(cause) == "NoSuchUpload"
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
            if not (isinstance(cause, bce.ClientError) and _code(cause) == "NoSuchUpload"):
                raise

    def _abort_quietly(self) -> None:
        # The error that made us abort matters more than a failed clean-up.
        try:
            self.abort()
        except ObjectStoreError as exc:
            log.warning("%s; an incomplete multipart upload may remain", exc)
