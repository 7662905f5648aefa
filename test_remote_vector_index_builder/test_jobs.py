from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

import pytest

from remote_vector_index_builder.app.job_responses import JobSummary
from remote_vector_index_builder.app.jobs import JobState, Outcome, TaskStatus
from remote_vector_index_builder.app.local import LocalJobStore
from remote_vector_index_builder.core.errors import (
    JobConflictError,
    JobNotFoundError,
    StoreFullError,
)
from remote_vector_index_builder.core.params import BuildRequest
from test_remote_vector_index_builder.support import request_for


class FakeClock:
    """Injected time: tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(path: str = "idx/seg", **kw: Any) -> BuildRequest:
    return request_for("b", path, 8, 10, **kw)


def test_active_jobs_never_expire_and_ttl_counts_from_finish() -> None:
    clock = FakeClock()
    store = LocalJobStore(max_size=10, ttl_seconds=60, clock=clock)
    job, created = store.add_if_absent(request())
    assert created
    clock.now += 3600  # a build far longer than the TTL
    assert store.get(job.id).snapshot().task_status is TaskStatus.RUNNING
    store.record(job, Outcome(JobState.COMPLETED, file_name="seg.faiss"))
    clock.now += 59
    assert store.get(job.id).status_body() == {
        "task_status": "COMPLETED_INDEX_BUILD",
        "file_name": "seg.faiss",
        "error_message": None,
    }
    clock.now += 2
    with pytest.raises(JobNotFoundError, match="never accepted or finished more than"):
        store.get(job.id)


def test_duplicates_share_a_job_failed_ones_retry_and_conflicts_raise() -> None:
    store = LocalJobStore(max_size=10, ttl_seconds=60, clock=FakeClock())
    job, _ = store.add_if_absent(request())
    again, created = store.add_if_absent(request())
    assert again is job and not created
    with pytest.raises(JobConflictError, match="different build parameters"):
        store.add_if_absent(request(dimension=16))
    store.record(job, Outcome(JobState.COMPLETED, file_name="seg.faiss"))
    assert store.add_if_absent(request()) == (job, False)

    other, _ = store.add_if_absent(request("idx/other"))
    store.record(other, Outcome(JobState.FAILED, error="boom"))
    retry, created = store.add_if_absent(request("idx/other"))
    # Attempts count runs (claims); a new request keeps the count of the failed job's.
    assert created and retry is not other and retry.attempt == other.attempt
    assert store.claim(retry.id) is retry and retry.attempt == other.attempt + 1
    assert retry.id == other.id and store.get(retry.id) is retry


def test_outcome_is_recorded_once() -> None:
    store = LocalJobStore(max_size=10, ttl_seconds=60, clock=FakeClock())
    job, _ = store.add_if_absent(request())
    assert store.record(job, Outcome(JobState.FAILED, error="first"))
    assert not store.record(job, Outcome(JobState.COMPLETED, file_name="x.faiss"))
    assert store.get(job.id).status_body()["error_message"] == "first"


def test_full_store_evicts_finished_then_refuses() -> None:
    store = LocalJobStore(max_size=3, ttl_seconds=60, clock=FakeClock())
    jobs = [store.add_if_absent(request(f"idx/{i}"))[0] for i in range(3)]
    store.record(jobs[0], Outcome(JobState.COMPLETED, file_name="0.faiss"))
    store.add_if_absent(request("idx/3"))  # evicts the finished job
    assert len(store) == 3
    with pytest.raises(JobNotFoundError):
        store.get(jobs[0].id)
    with pytest.raises(StoreFullError, match="REQUEST_STORE_MAX_SIZE"):
        store.add_if_absent(request("idx/4"))


def test_concurrent_identical_requests_create_one_job() -> None:
    store = LocalJobStore(max_size=100, ttl_seconds=60, clock=FakeClock())
    barrier = threading.Barrier(16)
    created: list[bool] = []
    lock = threading.Lock()

    def submit() -> None:
        barrier.wait()
        _, made = store.add_if_absent(request())
        with lock:
            created.append(made)

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created.count(True) == 1 and len(store) == 1


def test_snapshot_is_frozen_and_taken_whole() -> None:
    store = LocalJobStore(max_size=10, ttl_seconds=60, clock=FakeClock())
    job, _ = store.add_if_absent(request())
    job.begin(1001.0, "cpu", 4096)
    snap = job.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.state = JobState.COMPLETED  # type: ignore[misc]
    store.record(job, Outcome(JobState.COMPLETED, file_name="seg.faiss", index_bytes=123))
    # The old snapshot is unchanged; a new one sees every field of the outcome.
    assert snap.state is JobState.QUEUED and snap.reserved_bytes == 4096
    done = job.snapshot()
    assert (done.state, done.file_name, done.index_bytes) == (
        JobState.COMPLETED,
        "seg.faiss",
        123,
    )
    summary = JobSummary.of(done)
    assert summary.device == "cpu" and summary.quality is None


def test_status_is_never_completed_without_its_file_name() -> None:
    """A reader racing the thread that records outcomes sees all of an outcome or none.

    Before snapshots, ``status_body`` read the state twice and the file name without
    the job's lock while ``end`` wrote them: a body could mix the state before the
    outcome with the file name after it (or, with the writes reordered, COMPLETED
    with ``file_name: null``).
    """
    whole = [
        {"task_status": "RUNNING_INDEX_BUILD", "file_name": None, "error_message": None},
        {"task_status": "COMPLETED_INDEX_BUILD", "file_name": "seg.faiss", "error_message": None},
    ]
    store = LocalJobStore(max_size=100_000, ttl_seconds=600, clock=FakeClock())
    current = [store.add_if_absent(request("idx/race"))[0]]
    torn: list[dict[str, Any]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            body = current[0].status_body()
            if body not in whole:
                torn.append(body)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    readers = [threading.Thread(target=read) for _ in range(2)]
    try:
        for reader in readers:
            reader.start()
        for i in range(5000):
            job = store.add_if_absent(request(f"idx/race{i}"))[0]
            current[0] = job
            store.record(job, Outcome(JobState.COMPLETED, file_name="seg.faiss"))
    finally:
        done.set()
        for reader in readers:
            reader.join()
        sys.setswitchinterval(interval)
    assert torn == []
