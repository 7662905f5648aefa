"""The service through the real app (TestClient runs the lifespan) and a local S3 server."""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.main import Overrides, create_app
from remote_vector_index_builder.core import index_io
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.gpu_builder import GpuBuilder
from remote_vector_index_builder.core.index_builder import gpu_available
from remote_vector_index_builder.core.object_store import ObjectStore, S3ObjectStore
from remote_vector_index_builder.core.s3_calls import S3Config
from test_remote_vector_index_builder.support import (
    Clock,
    GatedStore,
    both_modes,
    build_body,
    fast_body,
    make_settings,
    upload,
    wait_idle,
    wait_terminal,
)
from testbed.data import (
    clustered,
    normalized,
    recall_at_k,
    to_binary,
    to_int8,
)

CASES = [("float", "l2"), ("half_float", "innerproduct"), ("byte", "l2"), ("binary", "hamming")]


@both_modes
@pytest.mark.parametrize(("data_type", "space"), CASES)
def test_knn_client_flow_for_each_data_type(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, data_type: str, space: str
) -> None:
    vectors = clustered(1500, 64, seed=11)
    if space == "innerproduct":
        vectors = normalized(vectors)
    dim = 64
    blob_vectors: np.ndarray = vectors
    if data_type == "byte":
        blob_vectors = to_int8(vectors)
    elif data_type == "binary":
        blob_vectors, dim = to_binary(vectors), 64
    stem = f"idx/u1_vectors/r_my.field_{data_type}"
    upload(s3_client, bucket, stem, blob_vectors)
    client = service()
    body = build_body(
        bucket,
        stem,
        dim,
        len(vectors),
        data_type=data_type,
        index_parameters={"space_type": space, "algorithm_parameters": {"m": 16}},
    )
    response = client.post("/_build", json=body)
    assert response.status_code == 200
    assert set(response.json()) == {"job_id"}
    status = wait_terminal(client, response.json()["job_id"])
    assert status == {
        "task_status": "COMPLETED_INDEX_BUILD",
        "file_name": f"r_my.field_{data_type}.faiss",
        "error_message": None,
    }
    raw = s3_client.get_object(Bucket=bucket, Key=f"{stem}.faiss")["Body"].read()
    index = index_io.read(raw)
    ids = np.arange(len(vectors), dtype=np.int64) * 2 + 1
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), ids)
    base = blob_vectors if data_type == "binary" else blob_vectors.astype(np.float32)
    minimum = 0.9 if data_type == "binary" else 0.95
    assert recall_at_k(index, base, ids, base[:100], space) >= minimum


@both_modes
def test_idempotent_concurrent_duplicates_conflicts_and_jobs_listing(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    store = GatedStore(object_store)
    client = service(store=store)
    upload(s3_client, bucket, "idx/dup", clustered(300, 16))
    body = build_body(bucket, "idx/dup", 16, 300)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: client.post("/_build", json=body), range(32)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["job_id"] for a in answers}) == 1
    job_id = answers[0].json()["job_id"]
    assert store.waiting.acquire(timeout=30)  # its build runs, held at its download

    conflict = client.post("/_build", json={**body, "dimension": 32})
    assert conflict.status_code == 409
    assert "different build parameters" in conflict.json()["detail"]

    listing = client.get("/_jobs")
    assert listing.headers["content-type"] == "application/json"
    jobs = listing.json()
    assert isinstance(jobs, dict) and list(jobs) == [job_id]
    assert jobs[job_id]["data_type"] == "float" and jobs[job_id]["attempt"] == 1
    assert jobs[job_id]["vector_bytes"] == 300 * 16 * 4

    store.gate.set()
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert client.post("/_build", json=body).json() == {"job_id": job_id}
    assert len(client.get("/_jobs").json()) == 1


@both_modes
def test_failed_job_reports_cause_and_a_new_request_retries(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    client = service()
    body = build_body(bucket, "idx/missing", 16, 300)
    job_id = client.post("/_build", json=body).json()["job_id"]
    status = wait_terminal(client, job_id)
    assert status["task_status"] == "FAILED_INDEX_BUILD" and status["file_name"] is None
    assert bucket in status["error_message"] and "idx/missing.knnvec" in status["error_message"]
    assert not s3_client.list_objects_v2(Bucket=bucket, Prefix="idx/missing").get("Contents")

    upload(s3_client, bucket, "idx/missing", clustered(300, 16))
    assert client.post("/_build", json=body).json() == {"job_id": job_id}
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert client.get("/_jobs").json()[job_id]["attempt"] == 2


def test_validation_errors_name_the_field(service: Callable[..., TestClient], bucket: str) -> None:
    client = service()
    body = build_body(bucket, "idx/x", 16, 300)
    response = client.post("/_build", json={**body, "doc_count": 3})
    assert response.status_code == 422
    assert [p["field"] for p in response.json()["detail"]] == ["doc_count"]
    del body["vector_path"]
    response = client.post("/_build", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "vector_path"
    assert client.get("/_status/never-seen").status_code == 404


@both_modes
def test_job_that_can_never_fit_gets_507_with_numbers(
    service: Callable[..., TestClient], bucket: str
) -> None:
    client = service(cpu_memory_limit=256 * 1024**2)
    response = client.post("/_build", json=build_body(bucket, "idx/big", 768, 1_000_000))
    assert response.status_code == 507
    detail = response.json()["detail"]
    assert "GiB of host memory" in detail and "CPU_MEMORY_LIMIT is 0.25 GiB" in detail
    assert client.get("/_jobs").json() == {}


@both_modes
def test_jobs_that_do_not_fit_together_run_one_after_the_other(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    from remote_vector_index_builder.core import memory
    from remote_vector_index_builder.core.params import BuildRequest

    store = GatedStore(object_store)
    bodies = [build_body(bucket, f"idx/q{i}", 32, 20000) for i in range(2)]
    for i in range(2):
        upload(s3_client, bucket, f"idx/q{i}", clustered(20000, 32, seed=i))
    client = service(store=store, max_workers=2)
    admission = client.app.state.admission  # type: ignore[attr-defined]
    one = admission.estimate(BuildRequest.model_validate(bodies[0])).host_bytes
    admission.host_limit = int(one * 1.5)  # fits one job, never two
    assert one > memory.FIXED_OVERHEAD
    first = client.post("/_build", json=bodies[0]).json()["job_id"]
    assert store.waiting.acquire(timeout=30)  # it holds its memory, at its download
    second = client.post("/_build", json=bodies[1]).json()["job_id"]
    # A build thread is free, but not the memory: the second job waits in the queue.
    # (Comparing its started_at with the first's finished_at could fail: a build's memory
    # is released before its outcome is recorded, so the next may start in between.)
    waiting = client.get(f"/_jobs/{second}").json()
    assert (waiting["state"], waiting["started_at"]) == ("queued", None)
    assert client.get("/_heart_beat").json()["memory"]["host_reserved_bytes"] == one
    store.gate.set()
    for job_id in (first, second):
        assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"


def test_running_job_outlives_the_ttl_then_expires(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    clock = Clock()
    store = GatedStore(object_store)
    client = service(store=store, clock=clock, request_store_ttl_seconds=60)
    upload(s3_client, bucket, "idx/slow", clustered(300, 16))
    job_id = client.post("/_build", json=build_body(bucket, "idx/slow", 16, 300)).json()["job_id"]
    assert store.waiting.acquire(timeout=10)
    clock.now += 3600  # an hour-long build against a one-minute TTL
    assert client.get(f"/_status/{job_id}").json()["task_status"] == "RUNNING_INDEX_BUILD"
    store.gate.set()
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    clock.now += 59
    assert client.get(f"/_status/{job_id}").status_code == 200
    clock.now += 2
    assert client.get(f"/_status/{job_id}").status_code == 404


def test_basic_auth_when_configured(service: Callable[..., TestClient], bucket: str) -> None:
    open_client = service()
    wrong = {"Authorization": "Basic " + base64.b64encode(b"x:y").decode()}
    assert open_client.get("/_jobs", headers=wrong).status_code == 200

    client = service(auth_username="admin", auth_password="s3cret")
    good = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}
    assert client.get("/_heart_beat").status_code == 200
    for method, path in (("GET", "/_jobs"), ("GET", "/_status/x"), ("POST", "/_build")):
        response = client.request(method, path, json={})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Basic")
        assert client.request(method, path, json={}, headers=wrong).status_code == 401
    assert client.get("/_jobs", headers=good).status_code == 200
    assert client.get("/_status/x", headers=good).status_code == 404


@both_modes
def test_bucket_allow_list(service: Callable[..., TestClient], bucket: str) -> None:
    client = service(allowed_buckets="some-other-bucket")
    response = client.post("/_build", json=build_body(bucket, "idx/a", 16, 300))
    assert response.status_code == 403 and "allow-list" in response.json()["detail"]


@contextmanager
def started_service(s3_config: S3Config, store: ObjectStore, **kw: Any) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(s3_config, **kw), Overrides(object_store=store))) as c:
        yield c


def test_shutdown_fails_queued_and_overdue_jobs_with_a_clear_message(
    s3_config: S3Config, s3_client: Any, bucket: str, object_store: Any
) -> None:
    store = GatedStore(object_store)
    for i in range(3):
        upload(s3_client, bucket, f"idx/s{i}", clustered(300, 16))
    with started_service(s3_config, store, max_workers=1, shutdown_grace_seconds=0.2) as client:
        ids = [
            client.post("/_build", json=build_body(bucket, f"idx/s{i}", 16, 300)).json()["job_id"]
            for i in range(3)
        ]
        assert store.waiting.acquire(timeout=10)  # the first job holds the only worker
        jobs = client.app.state.backend.store  # type: ignore[attr-defined]
    # The lifespan has ended: nothing is left running or silently dropped.
    try:
        states = [jobs.get(i).status_body() for i in ids]
        assert all(s["task_status"] == "FAILED_INDEX_BUILD" for s in states)
        assert all("shut down before this build finished" in s["error_message"] for s in states)
        assert jobs.active() == []
    finally:
        store.gate.set()


@both_modes
def test_heart_beat_reports_readiness(service: Callable[..., TestClient]) -> None:
    client = service(cpu_memory_limit=8 * 1024**3)
    beat = client.get("/_heart_beat").json()
    assert beat["status"] == "alive" and beat["ready"] is True and beat["device"] == "cpu"
    assert beat["memory"]["host_limit_bytes"] == 8 * 1024**3
    assert client.get("/_ready").json() == {"ready": True}


def test_admission_and_the_heart_beat_count_the_configured_cpu_build(
    service: Callable[..., TestClient],
) -> None:
    """The fast build's 8-bit codes are in the estimate: fewer rows fit in the same memory."""
    limit = 8 * 1024**3
    standard = service(cpu_memory_limit=limit).get("/_heart_beat").json()
    fast = service(cpu_memory_limit=limit, cpu_build="fast").get("/_heart_beat").json()
    rows = [beat["largest_segment"]["float"]["768"]["doc_count"] for beat in (standard, fast)]
    assert 0 < rows[1] < rows[0]


@both_modes
@pytest.mark.skipif(gpu_available(), reason="this host's GPU build would not fall back")
def test_a_gpu_build_that_fell_back_shows_the_cpu_as_its_device(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    """Faiss here has no GPU: the GPU builder's attempt really fails and the CPU builds."""
    client = service(builder=GpuBuilder(fallback=CpuBuilder()), gpu_memory_limit=16 * 1024**3)
    upload(s3_client, bucket, "idx/fb", clustered(300, 16))
    job_id = client.post("/_build", json=build_body(bucket, "idx/fb", 16, 300)).json()["job_id"]
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    job = client.get(f"/_jobs/{job_id}").json()
    assert job["device"] == "cpu" and job["quality"]["fallback"] is True


def test_build_over_the_time_limit_fails_and_service_takes_no_builds_until_its_thread_ends(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    clock = Clock()
    store = GatedStore(object_store)
    client = service(store=store, clock=clock, job_time_limit_seconds=600)
    upload(s3_client, bucket, "idx/stuck", clustered(300, 16))
    upload(s3_client, bucket, "idx/next", clustered(300, 16))
    job_id = client.post("/_build", json=build_body(bucket, "idx/stuck", 16, 300)).json()["job_id"]
    assert store.waiting.acquire(timeout=10)
    runner = client.app.state.runner  # type: ignore[attr-defined]
    assert runner.check_time_limits() == []
    clock.now += 601
    assert [j.id for j in runner.check_time_limits()] == [job_id]
    status = client.get(f"/_status/{job_id}").json()
    assert status["task_status"] == "FAILED_INDEX_BUILD"
    assert "exceeded the time limit of 600 s" in status["error_message"]
    assert client.get("/_ready").status_code == 503
    assert client.get("/_heart_beat").json()["ready"] is False
    # While its thread runs, no build is accepted: not the same request again (two builds
    # of one key at once), not another one; the answer says why.
    for stem in ("idx/stuck", "idx/next"):
        refused = client.post("/_build", json=build_body(bucket, stem, 16, 300))
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "RVIB_JOB_TIME_LIMIT_SECONDS" in refused.json()["detail"]
    # The stuck thread notices the cancellation once it moves on: then builds are taken again.
    store.gate.set()
    wait_idle(client)
    assert client.get("/_ready").status_code == 200
    next_id = client.post("/_build", json=build_body(bucket, "idx/next", 16, 300)).json()["job_id"]
    assert wait_terminal(client, next_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert not s3_client.list_objects_v2(Bucket=bucket, Prefix="idx/stuck.faiss").get("Contents")


@pytest.mark.parametrize("held", ["memory", "thread"])
def test_jobs_queued_behind_a_build_past_its_time_limit_fail_instead_of_waiting(
    service: Callable[..., TestClient],
    s3_client: Any,
    bucket: str,
    object_store: Any,
    held: str,
) -> None:
    """They waited for ever: for the stuck build's memory, or for its thread."""
    from remote_vector_index_builder.core.params import BuildRequest

    clock = Clock()
    store = GatedStore(object_store)
    workers = 2 if held == "memory" else 1
    client = service(store=store, clock=clock, job_time_limit_seconds=600, max_workers=workers)
    runner = client.app.state.runner  # type: ignore[attr-defined]
    bodies = [build_body(bucket, f"idx/{stem}", 16, 300) for stem in ("stuck", "behind")]
    for stem in ("stuck", "behind"):
        upload(s3_client, bucket, f"idx/{stem}", clustered(300, 16))
    if held == "memory":
        admission = client.app.state.admission  # type: ignore[attr-defined]
        one = admission.estimate(BuildRequest.model_validate(bodies[0])).host_bytes
        admission.host_limit = int(one * 1.5)  # fits one build, never two
    stuck_id = client.post("/_build", json=bodies[0]).json()["job_id"]
    assert store.waiting.acquire(timeout=10)
    behind_id = client.post("/_build", json=bodies[1]).json()["job_id"]
    assert client.get(f"/_jobs/{behind_id}").json()["state"] == "queued"
    clock.now += 601
    assert [j.id for j in runner.check_time_limits()] == [stuck_id]
    failed = wait_terminal(client, behind_id)
    assert failed["task_status"] == "FAILED_INDEX_BUILD"
    assert "cannot be stopped and holds the memory or the build thread" in failed["error_message"]
    store.gate.set()
    wait_idle(client)


def test_credentials_from_a_file(service: Callable[..., TestClient], tmp_path: Any) -> None:
    secret = tmp_path / "auth"
    secret.write_text("builder:pa:ss\n")
    client = service(auth_file=str(secret))
    good = {"Authorization": "Basic " + base64.b64encode(b"builder:pa:ss").decode()}
    assert client.get("/_jobs").status_code == 401
    assert client.get("/_jobs", headers=good).status_code == 200


class PriorityRecordingStore(GatedStore):
    """The real store; records the niceness of the thread each download runs on."""

    def __init__(self, inner: S3ObjectStore) -> None:
        super().__init__(inner)
        self.gate.set()
        self.nice: list[int] = []

    def download(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().download(*args, **kwargs)


@pytest.mark.parametrize("build_nice", [0, 7])
def test_builds_run_nicer_than_the_event_loop(
    service: Callable[..., TestClient],
    s3_client: Any,
    bucket: str,
    object_store: Any,
    build_nice: int,
) -> None:
    store = PriorityRecordingStore(object_store)
    client = service(store=store, build_nice=build_nice)
    upload(s3_client, bucket, "idx/nice", clustered(300, 16))
    job_id = client.post("/_build", json=build_body(bucket, "idx/nice", 16, 300)).json()["job_id"]
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    service_nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert store.nice == [min(19, service_nice + build_nice)] * 2  # vectors, then doc ids


class ExplodingBuilder:
    """The real CPU builder's set-up, then a bug in ``build`` (an unexpected error)."""

    name = "cpu"

    def prepare(self, request: Any) -> None:
        return None

    def build(self, request: Any, dataset: Any, progress: Any = None, prepared: Any = None) -> Any:
        raise_a_bug()


def raise_a_bug() -> None:
    raise ZeroDivisionError("a bug deep in the build")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@both_modes
def test_unexpected_failure_is_logged_with_its_traceback(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    client = service(builder=ExplodingBuilder())
    upload(s3_client, bucket, "idx/bug", clustered(300, 16))
    # On the runner's own logger: other tests may have configured the package's
    # loggers (levels, propagation) for their own capture.
    logger = logging.getLogger("remote_vector_index_builder.app.runner")
    handler = Records()
    logger.addHandler(handler)
    try:
        job_id = client.post("/_build", json=build_body(bucket, "idx/bug", 16, 300)).json()
        status = wait_terminal(client, job_id["job_id"])
    finally:
        logger.removeHandler(handler)
    expected = "unexpected error (ZeroDivisionError): a bug deep in the build"
    assert status["error_message"] == expected
    [record] = [r for r in handler.records if job_id["job_id"] in r.getMessage()]
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError
    # The formatted traceback names the frame that raised, not "NoneType: None".
    text = logging.Formatter().format(record)
    assert "raise_a_bug" in text and "NoneType: None" not in text


class _ThreadCountingBuilder:
    """The real CPU builder, noting the OpenMP thread count Faiss builds with."""

    name = "cpu"

    def __init__(self) -> None:
        self.inner = CpuBuilder()
        self.threads: list[int] = []

    def prepare(self, request: Any) -> Any:
        return self.inner.prepare(request)

    def build(self, request: Any, dataset: Any, progress: Any = None, prepared: Any = None) -> Any:
        self.threads.append(faiss.omp_get_max_threads())
        return self.inner.build(request, dataset, progress, prepared)


def test_builds_use_the_configured_openmp_threads(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    # OpenMP's thread count is per thread: set only where the service starts, the build
    # threads used every CPU (two one-thread replicas then ran four threads on 2 cores).
    # A count other than the CPUs this process may use, so the default cannot pass.
    wanted = len(os.sched_getaffinity(0)) + 1
    builder = _ThreadCountingBuilder()
    client = service(builder=builder, omp_threads=wanted)
    upload(s3_client, bucket, "idx/omp", clustered(500, 8))
    job_id = client.post("/_build", json=fast_body(bucket, "idx/omp", 8, 500)).json()["job_id"]
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert builder.threads == [wanted]
