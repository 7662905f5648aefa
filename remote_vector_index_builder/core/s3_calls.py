"""The S3 boundary: the client, its configuration and the one retrying call.

``S3Calls`` is what the object store and its multipart writer share: every S3
request of either goes through ``S3Calls.call``, which retries transient
failures and translates what it gives up on into ``core.errors`` (with the S3
error code kept on the exception, so callers never look at botocore again).
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import boto3
from botocore import UNSIGNED
from botocore import exceptions as bce
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field, field_validator
from urllib3.exceptions import ProtocolError

from remote_vector_index_builder.core import errors
from remote_vector_index_builder.core.options import MIB, check_part_size
from remote_vector_index_builder.core.s3_errors import (
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
        return check_part_size("part_size", value)

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
        # One attempt per botocore call: ``S3Calls.call`` owns every retry, so
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
    # The object's full-object checksums S3 reported ({"CRC32": base64, ...}); empty
    # when the HEAD did not ask for them or the object has none.
    checksums: dict[str, str] | None = None
    # "FULL_OBJECT" or "COMPOSITE" (checksums of the parts' checksums), when known.
    checksum_type: str | None = None


_CHECKSUM_FIELDS = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")


class S3Calls:
    """The client, its config and the retrying call every S3 request goes through."""

    def __init__(self, client: S3Client, config: S3Config, *, sleep: Sleep = time.sleep) -> None:
        self.client = client
        self.config = config
        self._sleep = sleep

    def call(self, where: str, call: Callable[..., _T], **kwargs: Any) -> _T:
        """``call(**kwargs)`` with bounded, jittered exponential backoff on transient errors.

        botocore makes one attempt per call; this loop also covers what it cannot:
        a body that breaks or ends early while we stream it.
        """
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return call(**kwargs)
            except (bce.ClientError, bce.BotoCoreError, ProtocolError, OSError, Corrupt) as exc:
                if attempt == attempts or not retryable(exc):
                    raise translate(exc, where, attempt) from exc
                log.info("%s: attempt %d failed (%s), retrying", where, attempt, exc)
            self._sleep(random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt)))
        raise AssertionError("unreachable")

    def head(
        self, op: str, bucket: str, key: str, *, checksums: bool = False, part: int | None = None
    ) -> ObjectInfo:
        """HEAD the object (or one of its multipart parts, ``part`` from 1).

        With ``checksums``, S3 also reports the checksum it stored (of the part, for
        ``part``); ``size`` is then the part's size.
        """
        where = f"{op} of s3://{bucket}/{key}"
        extra: dict[str, Any] = {"ChecksumMode": "ENABLED"} if checksums else {}
        if part is not None:
            extra["PartNumber"] = part
        try:
            response = self.call(where, self.client.head_object, Bucket=bucket, Key=key, **extra)
        except errors.ObjectNotFoundError:
            # HEAD has no body, so a missing bucket is a bare 404 too: ask the bucket.
            try:
                self.client.head_bucket(Bucket=bucket)
            except bce.ClientError as exc:
                if code_of(exc) in {"404", "NoSuchBucket"}:
                    raise bucket_missing(where) from exc
            except (bce.BotoCoreError, OSError):
                pass  # the object is missing either way
            raise
        stored = cast(dict[str, Any], response)
        found = {name: stored.get(f"Checksum{name}") for name in _CHECKSUM_FIELDS}
        return ObjectInfo(
            response["ContentLength"],
            response["ETag"],
            response.get("SSEKMSKeyId"),
            {name: str(value) for name, value in found.items() if value} or None,
            stored.get("ChecksumType"),
        )


def submit_in_context(pool: ThreadPoolExecutor, task: Callable[..., _T], *args: Any) -> Future[_T]:
    """``pool.submit`` that runs ``task`` in a copy of the submitting thread's contextvars.

    The log context (job id, stage: ``app.logs``) lives in contextvars, which
    pool threads do not inherit; without this, retry and part-failure lines of
    transfer threads carried no job id.
    """
    context = contextvars.copy_context()
    return pool.submit(context.run, task, *args)


@dataclass(frozen=True)
class S3Access:
    """How this process signs S3 requests: boto3's credential source, or why it cannot."""

    source: str | None
    problem: str | None


def s3_access(config: S3Config) -> S3Access:
    """Resolve credentials once through boto3's chain (as the client will) at start-up."""
    if config.unsigned:
        return S3Access("unsigned (RVIB_S3_UNSIGNED)", None)
    try:
        credentials = boto3.session.Session(region_name=config.region).get_credentials()
    except bce.BotoCoreError as exc:
        return S3Access(None, f"the AWS credentials cannot be resolved: {exc}")
    if credentials is None:
        return S3Access(
            None,
            "no AWS credentials found (environment, shared files, container or instance "
            "role): every build would fail; configure them, or set RVIB_S3_UNSIGNED=true "
            "for an anonymous S3 server",
        )
    return S3Access(str(credentials.method), None)
