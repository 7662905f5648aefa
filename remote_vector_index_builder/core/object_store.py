"""The object store: the ``ObjectStore`` protocol and its S3 implementation.

A download lands in one pre-allocated numpy buffer that parallel ranged GETs
read straight into; an upload streams through a bounded multipart writer
(``core.multipart``). So a multi-GB blob exists once in memory in either
direction. botocore errors are translated once, in ``core.s3_errors``, into
``core.errors``.
"""

from __future__ import annotations

import functools
import http.client
import logging
import math
import mmap
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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

from remote_vector_index_builder.core import errors
from remote_vector_index_builder.core.errors import DatasetError

# Re-exported (``X as X``): app.settings, the tests and the benchmarks import them from here.
from remote_vector_index_builder.core.multipart import GIB as GIB
from remote_vector_index_builder.core.multipart import MAX_PART_SIZE as MAX_PART_SIZE
from remote_vector_index_builder.core.multipart import MIB as MIB
from remote_vector_index_builder.core.multipart import MIN_PART_SIZE as MIN_PART_SIZE
from remote_vector_index_builder.core.multipart import (
    UPLOAD_BUFFER_SHARE as UPLOAD_BUFFER_SHARE,
)
from remote_vector_index_builder.core.multipart import (
    MultipartUpload,
    parts_in_flight,
    upload_part_size,
)
from remote_vector_index_builder.core.s3_errors import (
    BodyCut,
    Corrupt,
    bucket_missing,
    code_of,
    retryable,
    translate,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# aws-c-s3 (the CRT transfer client) plans 10 connections per 4 Gbit/s S3 endpoint
# address, i.e. 0.4 Gbit/s (50 MB/s) per connection; we size the pools the same way.
GBPS_PER_CONNECTION = 0.4
MIN_CONCURRENCY = 2
MAX_CONCURRENCY = 64
# HEADs and the multipart control calls run beside a full set of part transfers.
_SPARE_CONNECTIONS = 4
# Progress granularity inside a part; it also bounds urllib3's temporary copy.
_READ_CHUNK = 1 * MIB
# Full-jitter exponential backoff (AWS's advice for throttling): 0.5, 1, 2, ... s, at most 10.
_BACKOFF_BASE_S = 0.25
_BACKOFF_CAP_S = 10.0

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
            except (bce.ClientError, bce.BotoCoreError, ProtocolError, OSError, Corrupt) as exc:
                if attempt == attempts or not retryable(exc):
                    raise translate(exc, where, attempt) from exc
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
                if code_of(exc) in {"404", "NoSuchBucket"}:
                    raise bucket_missing(where) from exc
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
            direct = _direct_reader(response["Body"]) if ranged else None
            body = direct or cast(_ReadInto, response["Body"])
            part, filled = target[first : last + 1], 0
            try:
                while filled < len(part) and not stop.is_set():
                    got = body.readinto(part[filled : filled + _READ_CHUNK])
                    if not got:
                        raise BodyCut(f"body ended after {filled} of {len(part)} bytes")
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
    ) -> MultipartUpload:
        """A streaming upload; ``size_hint`` (the expected size) bounds its buffers."""
        part = upload_part_size(self._config, size_hint)
        slots = parts_in_flight(self._config, size_hint)
        return MultipartUpload(
            self, bucket, key, sse_kms_key_id, _serialized(progress), part, slots
        )

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
