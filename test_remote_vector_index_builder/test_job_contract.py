"""What both backends promise, through the real app: one process (``local.LocalBackend``)
and a fleet replica on a real redis-server (``fleet.Fleet``). A client or an operator must
not be able to tell them apart: the same ids, refusals, cancels, attempt numbers and
bodies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.jobs import Job
from remote_vector_index_builder.app.main import Overrides, create_app
from remote_vector_index_builder.core.s3_calls import S3Config
from test_remote_vector_index_builder.support import (
    FLEET_SETTINGS,
    GatedBuilder,
    GatedStore,
    both_modes,
    fast_body,
    make_settings,
    upload,
    wait_terminal,
)
from testbed.data import clustered
from testbed.fleet_harness import RedisServer

CANCELLED = {
    "task_status": "FAILED_INDEX_BUILD",
    "file_name": None,
    "error_message": "cancelled by operator",
}
TICK = threading.Event()  # never set: ``TICK.wait(s)`` paces a wait on a condition


def post(client: TestClient, body: dict[str, Any]) -> str:
    response = client.post("/_build", json=body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def detail(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/_jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def gated(
    service: Callable[..., TestClient], object_store: Any, **settings: Any
) -> tuple[TestClient, GatedStore]:
    """A service whose downloads wait at a gate the test opens."""
    store = GatedStore(object_store)
    return service(store=store, **settings), store


def building(client: TestClient, job_id: str) -> Job:
    """The job as the runner holds it, once it runs here."""
    ledger = client.app.state.backend.ledger  # type: ignore[attr-defined]
    for _ in range(3000):
        found = [job for job in ledger.active() if job.id == job_id]
        if found:
            job: Job = found[-1]
            return job
        TICK.wait(0.01)
    raise AssertionError(f"job {job_id} never ran here")


@both_modes
def test_the_same_request_is_one_job_and_a_different_one_a_409_that_fits_its_state(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    client, store = gated(service, object_store, max_workers=1)
    upload(s3_client, bucket, "idx/a", clustered(300, 16))
    body = fast_body(bucket, "idx/a", 16, 300)
    job_id = post(client, body)
    assert post(client, body) == job_id
    assert store.waiting.acquire(timeout=30)  # it runs, held at its download
    corrected = fast_body(bucket, "idx/a", 16, 300, index_parameters={"space_type": "l2"})
    refused = client.post("/_build", json=corrected)
    assert refused.status_code == 409
    assert refused.json()["detail"] == (
        f"job {job_id} for 'idx/a.knnvec' already exists with different build parameters and "
        f"is still running (downloading); wait for it to finish or cancel it "
        f"(DELETE /_jobs/{job_id}), or use a new vector_path"
    )
    store.gate.set()
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert post(client, body) == job_id  # completed: still the same job
    refused = client.post("/_build", json=corrected)
    # It said "wait for it to finish" of a job that had finished.
    assert refused.status_code == 409
    assert refused.json()["detail"] == (
        f"job {job_id} for 'idx/a.knnvec' already exists with different build parameters and "
        f"has completed; forget it (DELETE /_jobs/{job_id}) and submit again, or use a new "
        "vector_path"
    )
    # Forgotten, its id is free: the corrected request runs at once (it waited two hours).
    forgotten = client.delete(f"/_jobs/{job_id}")
    assert forgotten.status_code == 200
    assert forgotten.json()["state"] == "completed" and forgotten.json()["attempt"] == 1
    assert client.get(f"/_status/{job_id}").status_code == 404
    assert post(client, corrected) == job_id
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert detail(client, job_id)["attempt"] == 1
    assert list(client.get("/_jobs").json()) == [job_id]


@both_modes
def test_a_store_full_of_active_jobs_answers_429_and_unknown_jobs_404(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    client, store = gated(service, object_store, request_store_max_size=2, max_workers=1)
    try:
        for i in range(2):
            upload(s3_client, bucket, f"idx/full{i}", clustered(300, 16))
            post(client, fast_body(bucket, f"idx/full{i}", 16, 300))
        response = client.post("/_build", json=fast_body(bucket, "idx/full2", 16, 300))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "5"
        assert response.json() == {
            "detail": "the job store holds 2 queued or running jobs, its limit "
            "(REQUEST_STORE_MAX_SIZE); retry later"
        }
    finally:
        store.gate.set()
    unknown = {
        "detail": "no job 'never-seen': it was never accepted or finished more than "
        "REQUEST_STORE_TTL_SECONDS ago"
    }
    for method, path in (
        ("GET", "/_status/never-seen"),
        ("GET", "/_jobs/never-seen"),
        ("DELETE", "/_jobs/never-seen"),
    ):
        response = client.request(method, path)
        assert (response.status_code, response.json()) == (404, unknown), path


@both_modes
def test_cancel_of_queued_and_running_jobs_and_attempt_numbers(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    """Attempts count runs: 0 while a new job waits, 1 for its first run, one more for each
    run after a failure or cancel (one process said 1 for a queued job, the fleet 0)."""
    builder = GatedBuilder(add_batch_rows=500, pause_after=1)
    client = service(builder=builder, max_workers=1, add_batch_rows=500)
    upload(s3_client, bucket, "idx/run", clustered(2000, 16))
    upload(s3_client, bucket, "idx/wait", clustered(300, 16, seed=1))
    run_body, wait_body = (
        fast_body(bucket, s, 16, n) for s, n in (("idx/run", 2000), ("idx/wait", 300))
    )
    run_id = post(client, run_body)
    assert builder.paused.wait(timeout=30)
    wait_id = post(client, wait_body)
    queued = detail(client, wait_id)
    assert (queued["state"], queued["attempt"], queued["started_at"]) == ("queued", 0, None)
    assert detail(client, run_id)["attempt"] == 1

    response = client.delete(f"/_jobs/{wait_id}")
    assert response.status_code == 202
    cancelled = response.json()
    assert (cancelled["state"], cancelled["cancel_requested"]) == ("cancelled", True)
    assert client.get(f"/_status/{wait_id}").json() == CANCELLED

    job = building(client, run_id)
    response = client.delete(f"/_jobs/{run_id}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    assert response.json()["task_status"] == "RUNNING_INDEX_BUILD"
    try:
        assert job.cancel_requested.wait(timeout=30)  # the fleet's owner hears of it
    finally:
        builder.resume.set()
    assert wait_terminal(client, run_id) == CANCELLED
    assert [detail(client, i)["attempt"] for i in (run_id, wait_id)] == [1, 0]

    # Submitted again: a new run of each, under the same ids.
    builder.pause_after = 10**6
    assert [post(client, b) for b in (run_body, wait_body)] == [run_id, wait_id]
    for job_id in (run_id, wait_id):
        assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert [detail(client, i)["attempt"] for i in (run_id, wait_id)] == [2, 1]


@both_modes
def test_a_failed_job_submitted_again_waits_with_its_runs_counted(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    client, store = gated(service, object_store, max_workers=1)
    store.gate.set()
    body = fast_body(bucket, "idx/late", 16, 300)
    job_id = post(client, body)
    failed = wait_terminal(client, job_id)
    assert failed["task_status"] == "FAILED_INDEX_BUILD"
    assert detail(client, job_id)["attempt"] == 1
    # Held: another build takes the only thread, so the new request waits.
    store.gate.clear()
    store.waiting = threading.Semaphore(0)  # forget the failed job's download
    upload(s3_client, bucket, "idx/hold", clustered(300, 16, seed=2))
    hold_id = post(client, fast_body(bucket, "idx/hold", 16, 300))
    assert store.waiting.acquire(timeout=30)
    upload(s3_client, bucket, "idx/late", clustered(300, 16))
    assert post(client, body) == job_id
    waiting = detail(client, job_id)
    assert (waiting["state"], waiting["attempt"], waiting["error_message"]) == ("queued", 1, None)
    store.gate.set()
    for done in (hold_id, job_id):
        assert wait_terminal(client, done)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert detail(client, job_id)["attempt"] == 2


@both_modes
def test_jobs_are_listed_by_state_and_paged_by_id(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    client = service(max_workers=1)
    upload(s3_client, bucket, "idx/ok", clustered(300, 16))
    done = post(client, fast_body(bucket, "idx/ok", 16, 300))
    failed = post(client, fast_body(bucket, "idx/missing", 16, 300))
    for job_id in (done, failed):
        wait_terminal(client, job_id)

    def listed(**params: Any) -> list[str]:
        response = client.get("/_jobs", params=params)
        assert response.status_code == 200, response.text
        return list(response.json())

    first, second = sorted((done, failed))
    assert listed() == [first, second]  # in id order
    assert listed(state="completed") == [done]
    assert listed(state="COMPLETED_INDEX_BUILD") == [done]
    assert listed(state="FAILED_INDEX_BUILD") == listed(state="failed") == [failed]
    assert listed(state="queued") == []
    assert listed(limit=1) == [first]
    assert listed(limit=1, after=first) == [second]
    assert listed(after=second) == []
    assert listed(state="failed", after=first) == ([failed] if failed == second else [])
    for field, bad in (("state", "running"), ("limit", 0)):
        response = client.get("/_jobs", params={field: bad})
        assert response.status_code == 422, field
        assert {problem["field"] for problem in response.json()["detail"]} == {field}


# -- the same scenario on both backends, side by side ----------------------------------------

# Wall-clock readings differ between runs; their presence does not.
TIMES = {"submitted_at", "started_at", "finished_at", "lease_expires_at", "seconds"}


def comparable(value: Any) -> Any:
    """``value`` with its times replaced by whether they are set, and without the replica a
    fleet names as a job's ``owner`` (null in one process, by design)."""
    if isinstance(value, dict):
        return {
            key: (item is not None) if key in TIMES else comparable(item)
            for key, item in value.items()
            if key != "owner"
        }
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


def scenario(client: TestClient, s3_client: Any, bucket: str) -> dict[str, Any]:
    """A completed, a failed, a cancelled and a forgotten job: every body an operator reads."""
    upload(s3_client, bucket, "idx/done", clustered(500, 16))
    ids = {
        "done": post(client, fast_body(bucket, "idx/done", 16, 500)),
        "failed": post(client, fast_body(bucket, "idx/nothing", 16, 500)),
    }
    for job_id in ids.values():
        wait_terminal(client, job_id)
    seen: dict[str, Any] = {
        "status": {name: client.get(f"/_status/{i}").json() for name, i in ids.items()},
        "detail": {name: detail(client, i) for name, i in ids.items()},
        "listing": client.get("/_jobs").json(),
    }
    seen["forget"] = client.delete(f"/_jobs/{ids['failed']}").json()
    seen["after"] = client.get("/_jobs").json()
    same: dict[str, Any] = comparable(seen)
    return same


@pytest.fixture
def fleet_redis(tmp_path: Any) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_both_backends_answer_with_the_same_bodies(
    s3_config: S3Config, s3_client: Any, bucket: str, fleet_redis: RedisServer
) -> None:
    answers = []
    for extra in ({}, {**FLEET_SETTINGS, "redis_url": fleet_redis.url}):
        # One OpenMP thread: the same graph, so the same recall, in both runs.
        settings = make_settings(s3_config, max_workers=1, omp_threads=1, **extra)
        with TestClient(create_app(settings, Overrides())) as client:
            answers.append(scenario(client, s3_client, bucket))
    local, fleet = answers
    assert local == fleet
