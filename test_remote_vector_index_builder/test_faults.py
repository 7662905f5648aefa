"""Faults between the service and S3, and builds that raise: one job fails, nothing else.

A ``FaultProxy`` on 127.0.0.1 sits between the service's object store and the
moto server. Each case injects one kind of fault, transient (the first few
matching requests) or persistent (every one), and checks the job's outcome,
the message, the bucket afterwards (no index object after a failure, never an
orphaned multipart upload) and the service's health: no build in flight, no
memory reserved, no transfer threads left, and a following job completes.

The store gets a 1 s read timeout and 3 attempts, and a ``sleep`` that records
the backoff instead of waiting it out, so every case takes about a second.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.logs import ContextFilter, job_context, set_stage
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.index_builder import FaissIndex
from remote_vector_index_builder.core.object_store import S3ObjectStore
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client
from test_remote_vector_index_builder.support import (
    FAST,
    build_body,
    upload,
    wait_idle,
    wait_terminal,
)
from testbed.data import clustered
from testbed.faultproxy import Fault, FaultProxy

ATTEMPTS = 3
READ_TIMEOUT_S = 1.0
# Small HNSW parameters: these tests are about transfers, not recall.
STEM = "idx/u1_vectors/r_my.field_0"
# Small: every transfer is one request. Large (2,700 x 512 floats, 5.3 MiB): the
# vectors download in two ranges and the 5.5 MiB index uploads in two parts.
SMALL = (300, 16)
LARGE = (2700, 512)
# 6,000 x 768 floats: an 18.4 MB storage section, above the 15 MiB from which the index
# goes up as an upload overlapped with the build (``OverlappedWrite.start``).
OVERLAPPED = (6000, 768)


class Sleeps:
    """The store's backoff sleep: records the delays and runs hooks instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.hooks: list[Callable[[], None]] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        for hook in self.hooks:
            hook()


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server) as running:
        yield running


def proxied_store(
    s3_config: S3Config, url: str, sleep: Sleeps, read_timeout_s: float = READ_TIMEOUT_S
) -> S3ObjectStore:
    config = s3_config.model_copy(
        update={
            "endpoint_url": url,
            "max_attempts": ATTEMPTS,
            "read_timeout_s": read_timeout_s,
            "connect_timeout_s": 1.0,
        }
    )
    return S3ObjectStore(make_s3_client(config), config, sleep=sleep)


def assert_healthy(client: TestClient, s3_client: Any, bucket: str, tmp_dir: Path) -> None:
    wait_idle(client)
    beat = client.get("/_heart_beat").json()
    assert beat["ready"] is True and beat["jobs_in_flight"] == 0
    assert beat["memory"]["host_reserved_bytes"] == 0
    transfers = [t.name for t in threading.enumerate() if t.name.startswith(("s3-get", "s3-put"))]
    assert transfers == []
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert list(tmp_dir.iterdir()) == []


def index_exists(s3_client: Any, bucket: str) -> bool:
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{STEM}.faiss")
    return bool(listing.get("Contents"))


@dataclass(frozen=True)
class Case:
    name: str
    faults: tuple[Fault, ...]
    completes: bool
    # Fragments of the error message; {bucket} is filled in. Every failure names
    # the operation, the bucket and the key, and the cause.
    message: tuple[str, ...] = ()
    large: bool = False
    # (rows, dimension) instead of SMALL or LARGE; OVERLAPPED checks that the upload overlapped.
    shape: tuple[int, int] | None = None
    # The proxy's port when the job starts: "refuse" (closed) or "blackhole" (connects hang).
    port: str = "open"
    reopen_on_retry: bool = False  # ... and it opens again at the first backoff
    mode: str = "memory"
    # Backoffs expected when not one per injected fault (answers that are not retried).
    backoffs: int | None = None
    # A case with no stall: a longer read timeout keeps a slow moto (5 MiB parts on a
    # loaded machine) from adding a retry of its own to the count.
    read_timeout_s: float = READ_TIMEOUT_S


VECTORS = f"s3://{{bucket}}/{STEM}.knnvec"
INDEX = f"s3://{{bucket}}/{STEM}.faiss"
PART = "partNumber="
COMPLETE = "uploadId="

CASES = [
    # Transient: retried with backoff, the job completes.
    Case("503-slowdown-first-2-gets", (Fault("status", "GET", ".knn", 2),), True),
    Case(
        "500-internal-error-first-2-heads",
        (Fault("status", "HEAD", times=2, status=500, code="InternalError"),),
        True,
    ),
    Case("reset-mid-body-first-2-ranges", (Fault("reset", "GET", ".knnvec", 2),), True, large=True),
    Case("truncated-body-first-2-gets", (Fault("truncate", "GET", ".knn", 2),), True),
    Case("stall-once", (Fault("stall", "GET", ".knn", 1, stall_s=3),), True),
    Case(
        "reset-mid-request-body-first-part",
        (Fault("reset", "PUT", PART, 1, at="request"),),
        True,
        large=True,
    ),
    Case("503-on-complete-once", (Fault("status", "POST", COMPLETE, 1),), True, large=True),
    Case(
        "reset-after-complete-succeeded",
        (Fault("reset", "POST", COMPLETE, 1),),
        True,
        large=True,
    ),
    Case(
        # Real S3 answers the retry of a complete that succeeded with NoSuchUpload;
        # moto completes again, so the proxy plays S3's part on the second attempt.
        "complete-response-lost-then-no-such-upload",
        (
            Fault("reset", "POST", COMPLETE, 1),
            Fault("status", "POST", COMPLETE, 1, status=404, code="NoSuchUpload"),
        ),
        True,
        large=True,
        backoffs=1,  # after the reset; NoSuchUpload is checked, not retried
    ),
    Case(
        # The same on the overlapped upload: the index is in S3, the job completes.
        "overlapped-upload-complete-response-lost-then-no-such-upload",
        (
            Fault("reset", "POST", COMPLETE, 1),
            Fault("status", "POST", COMPLETE, 1, status=404, code="NoSuchUpload"),
        ),
        True,
        shape=OVERLAPPED,
        backoffs=1,
        read_timeout_s=30.0,
    ),
    Case("503-on-index-put-once", (Fault("status", "PUT", ".faiss", 1),), True),
    # A bit flipped in one ranged GET: the object's CRC32 (S3 stored it at upload)
    # no longer matches, the vectors are downloaded again, and the job completes.
    Case(
        "bit-flip-in-one-range", (Fault("flip", "GET", ".knnvec", 1),), True, large=True, backoffs=0
    ),
    Case("bit-flip-in-the-only-get", (Fault("flip", "GET", ".knnvec", 1),), True),
    Case(
        # The clean-up of an earlier attempt's uploads is not the build: it may fail.
        "listing-earlier-uploads-denied",
        (Fault("status", "GET", "?uploads", status=403, code="AccessDenied"),),
        True,
        backoffs=0,
    ),
    Case("refused-then-reopened", (), True, port="refuse", reopen_on_retry=True),
    Case("connect-timeout-then-reopened", (), True, port="blackhole", reopen_on_retry=True),
    # Persistent: FAILED_INDEX_BUILD naming operation, bucket, key and cause.
    Case(
        "503-slowdown-every-get",
        (Fault("status", "GET", ".knnvec"),),
        False,
        (f"download of {VECTORS}", "after 3 attempt(s)", "S3 answered 503 SlowDown", "retryable"),
    ),
    Case(
        "reset-every-range",
        (Fault("reset", "GET", ".knnvec"),),
        False,
        (f"download of {VECTORS} (bytes ", "after 3 attempt(s)", "Connection reset by peer"),
        large=True,
    ),
    Case(
        "truncated-every-get",
        (Fault("truncate", "GET", ".knnvec"),),
        False,
        (f"download of {VECTORS}", "after 3 attempt(s)", "IncompleteRead"),
    ),
    Case(
        "stall-every-get",
        (Fault("stall", "GET", ".knnvec", stall_s=3),),
        False,
        (f"download of {VECTORS}", "after 3 attempt(s)", "no data arrived within the read timeout"),
    ),
    Case(
        # Never a wrong index: a flip in every download ends the job FAILED.
        "bit-flip-in-every-range",
        (Fault("flip", "GET", ".knnvec"),),
        False,
        (f"download of {VECTORS} failed", "arrived corrupt 2 times", "CRC32"),
        large=True,
        backoffs=0,
    ),
    Case(
        "refused",
        (),
        False,
        (f"head of {VECTORS}", "after 3 attempt(s)", "Could not connect to the endpoint URL"),
        port="refuse",
    ),
    Case(
        "connect-timeout",
        (),
        False,
        (f"head of {VECTORS}", "after 3 attempt(s)", "ConnectTimeoutError: Connect timeout"),
        port="blackhole",
    ),
    Case(
        "reset-every-part",
        (Fault("reset", "PUT", PART, at="request"),),
        False,
        (f"upload of {INDEX} (part ", "after 3 attempt(s)", "Connection"),
        large=True,
    ),
    Case(
        "reset-every-part-disk-mode",
        (Fault("reset", "PUT", PART, at="request"),),
        False,
        (f"upload of {INDEX} (part ", "after 3 attempt(s)", "Connection"),
        large=True,
        mode="disk",
    ),
    Case(
        # NoSuchUpload at the first attempt: no object was made, nothing to accept.
        "no-such-upload-on-complete",
        (Fault("status", "POST", COMPLETE, status=404, code="NoSuchUpload"),),
        False,
        (f"upload of {INDEX} failed", "NoSuchUpload", "upload does not exist"),
        large=True,
        backoffs=0,
    ),
    Case(
        "500-every-complete",
        (Fault("status", "POST", COMPLETE, status=500, code="InternalError"),),
        False,
        (f"upload of {INDEX} failed after 3 attempt(s)", "S3 answered 500 InternalError"),
        large=True,
    ),
    Case(
        "503-every-index-put",
        (Fault("status", "PUT", ".faiss"),),
        False,
        (f"upload of {INDEX} failed after 3 attempt(s)", "SlowDown"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_object_store_fault(
    case: Case,
    service: Callable[..., TestClient],
    proxy: FaultProxy,
    s3_config: S3Config,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    n, dim = case.shape or (LARGE if case.large else SMALL)
    upload(s3_client, bucket, STEM, clustered(n, dim, seed=n))
    sleeps = Sleeps()
    store = proxied_store(s3_config, proxy.url, sleeps, case.read_timeout_s)
    client = service(store=store, index_serialization_mode=case.mode, tmp_dir=tmp_path)
    body = build_body(bucket, STEM, dim, n, index_parameters=FAST)
    faults = [proxy.add(dataclasses.replace(fault)) for fault in case.faults]
    if case.port == "refuse":
        proxy.refuse()
    elif case.port == "blackhole":
        proxy.blackhole()
    if case.reopen_on_retry:
        sleeps.hooks.append(proxy.accept)

    job_id = client.post("/_build", json=body).json()["job_id"]
    # Bounded by the poll budget: every stall ends at the read timeout, attempts are
    # capped and backoffs are recorded, not slept (counted below).
    status = wait_terminal(client, job_id)
    assert all(fault.hits > 0 for fault in faults), "a fault never fired"
    if case.shape == OVERLAPPED:  # the storage section went up under the highest part numbers
        assert any("partNumber=10000" in seen.target for seen in proxy.seen)
    assert all(0 <= delay <= 10 for delay in sleeps.delays)
    if case.backoffs is not None:
        assert len(sleeps.delays) == case.backoffs
    else:
        assert sleeps.delays
    if case.completes:
        assert status["task_status"] == "COMPLETED_INDEX_BUILD", status
        assert index_exists(s3_client, bucket)
        # One retry, after one backoff, per failed attempt.
        if case.backoffs is None:
            assert len(sleeps.delays) == (sum(f.hits for f in faults) if faults else 1)
    else:
        assert status["task_status"] == "FAILED_INDEX_BUILD" and status["file_name"] is None
        message = status["error_message"]
        for fragment in case.message:
            assert fragment.format(bucket=bucket) in message, message
        assert not index_exists(s3_client, bucket)
        # The failing request was tried ATTEMPTS times (two ranges or parts at most).
        for fault in faults:
            if case.backoffs is None:
                assert ATTEMPTS <= fault.hits <= 2 * ATTEMPTS, fault
    assert_healthy(client, s3_client, bucket, tmp_path)

    # Once the faults are gone, a failed job's new attempt and a new job complete.
    proxy.clear()
    proxy.accept()
    if not case.completes:
        assert client.post("/_build", json=body).json() == {"job_id": job_id}
        assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
        assert client.get("/_jobs").json()[job_id]["attempt"] == 2
        assert index_exists(s3_client, bucket)
    upload(s3_client, bucket, "idx/next", clustered(300, 16))
    next_job = client.post("/_build", json=build_body(bucket, "idx/next", 16, 300)).json()
    assert wait_terminal(client, next_job["job_id"])["task_status"] == "COMPLETED_INDEX_BUILD"
    assert_healthy(client, s3_client, bucket, tmp_path)


# --------------------------------------------------------------------------------------
# Builds that raise: only that job fails
# --------------------------------------------------------------------------------------


class FailingBuilder(CpuBuilder):
    """The real CPU builder, except for vector paths containing ``fail_on``.

    ``faiss``: a real Faiss error (``add`` without ids on an ID map raises in C++);
    ``memory``: ``MemoryError``, as a real allocation failure surfaces in Python.
    """

    def __init__(self, fail_on: str, how: str) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.how = how

    def build(
        self, request: BuildRequest, dataset: Dataset, *args: Any, **kwargs: Any
    ) -> FaissIndex:
        if self.fail_on not in request.vector_path:
            return super().build(request, dataset, *args, **kwargs)
        if self.how == "memory":
            raise MemoryError
        index = faiss.IndexIDMap(faiss.IndexHNSWFlat(request.dimension, request.m))
        index.add(np.ascontiguousarray(dataset.vectors, dtype=np.float32))
        raise AssertionError("Faiss accepted add() on an IndexIDMap")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("faiss", "unexpected error (RuntimeError): Error in "),
        ("memory", "the build ran out of host memory; lower MAX_WORKERS or CPU_MEMORY_LIMIT"),
    ],
)
def test_a_build_that_raises_fails_only_that_job(
    how: str,
    message: str,
    service: Callable[..., TestClient],
    s3_client: Any,
    bucket: str,
) -> None:
    builder = FailingBuilder("bad", how)
    client = service(builder=builder, max_workers=2)
    stems = ["idx/good0", "idx/bad", "idx/good1", "idx/good2"]
    for i, stem in enumerate(stems):
        upload(s3_client, bucket, stem, clustered(400, 16, seed=i))
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda stem: client.post("/_build", json=build_body(bucket, stem, 16, 400)),
                stems,
            )
        )
    ids = dict(zip(stems, (a.json()["job_id"] for a in answers), strict=True))
    outcomes = {stem: wait_terminal(client, job_id) for stem, job_id in ids.items()}

    bad = outcomes.pop("idx/bad")
    assert bad["task_status"] == "FAILED_INDEX_BUILD"
    assert message in bad["error_message"]
    if how == "faiss":
        assert "add_with_ids" in bad["error_message"]
    assert {o["task_status"] for o in outcomes.values()} == {"COMPLETED_INDEX_BUILD"}
    assert not index_exists_at(s3_client, bucket, "idx/bad.faiss")
    wait_idle(client)
    assert client.get("/_heart_beat").json()["memory"]["host_reserved_bytes"] == 0
    # The pool is intact: a later job on the same workers completes.
    upload(s3_client, bucket, "idx/after", clustered(400, 16, seed=9))
    later = client.post("/_build", json=build_body(bucket, "idx/after", 16, 400)).json()
    assert wait_terminal(client, later["job_id"])["task_status"] == "COMPLETED_INDEX_BUILD"


def index_exists_at(s3_client: Any, bucket: str, key: str) -> bool:
    return bool(s3_client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents"))


# --------------------------------------------------------------------------------------
# Transfer threads log in the job's context
# --------------------------------------------------------------------------------------


def test_retries_in_transfer_threads_log_the_job_and_stage(
    proxy: FaultProxy,
    s3_config: S3Config,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retried part (s3-put thread) and a retried range (s3-get) carry job id and stage."""
    store = proxied_store(s3_config, proxy.url, Sleeps())
    data = np.random.default_rng(3).integers(0, 256, 11 * 2**20, dtype=np.uint8).tobytes()
    proxy.add(Fault("status", "PUT", PART, times=1))
    proxy.add(Fault("status", "GET", "blob.bin", times=1))
    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.INFO, logger="remote_vector_index_builder.core")

    def job() -> None:
        with job_context("job-7"):
            set_stage("upload")
            with store.open_upload(bucket, "blob.bin") as upload:
                upload.write(data)
            set_stage("download")
            assert store.download(bucket, "blob.bin").tobytes() == data

    contextvars.copy_context().run(job)

    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    seen = {
        (str(r.threadName).split("_")[0], getattr(r, "job_id", None), getattr(r, "stage", None))
        for r in retries
    }
    assert seen == {("s3-put", "job-7", "upload"), ("s3-get", "job-7", "download")}, seen
