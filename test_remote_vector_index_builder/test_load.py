"""A bounded load test on loopback: the real app under uvicorn, real builds, real S3.

About 1,500 ``POST /_build`` submissions (distinct small jobs, duplicates of
them, and bursts of the same request) from a thread pool, and 12,000 ``GET
/_status`` polls while the builds run. The job store is
kept small, so it fills up (429s) and evicts finished jobs while the load runs.

Asserted: no 5xx; every job the store created is built exactly once and
reaches a terminal state exactly once (all of them completed); a request never
has two jobs or two builds at the same time; the store stays within its bound;
reserved memory returns to 0 and RSS to about where it was. Nothing is timed
here: throughput and latency under load are benchmarks/service_load.py's.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import psutil
import pytest
import uvicorn
from fastapi import FastAPI

from remote_vector_index_builder.app.jobs import Job, JobState, Outcome
from remote_vector_index_builder.app.local import LocalJobStore
from remote_vector_index_builder.app.main import Overrides, create_app
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.index_builder import FaissIndex
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.s3_calls import S3Config
from remote_vector_index_builder.local_s3 import free_port
from test_remote_vector_index_builder.support import build_body, make_settings, upload, wait_idle
from testbed.data import clustered

STEMS = 50  # segments in S3: doc_count 5..54, dimension 4..11
TENANTS = 6  # distinct jobs = STEMS x TENANTS (the job id hashes tenant + vector path)
DUPLICATES = 700  # extra submissions of distinct jobs, most soon after the first
WINDOW = 150  # submissions are shuffled within windows of this many
HOT_JOBS, HOT_REPEATS = 40, 12  # bursts of the very same request
POLLS = 12_000
STORE_SIZE = 160  # far fewer than the jobs: the store fills up and evicts
SUBMITTERS, POLLERS = 12, 4
DEADLINE_S = 240.0
FAST = {"space_type": "l2", "algorithm_parameters": {"m": 4, "ef_construction": 8}}


class CountingBuilder(CpuBuilder):
    """The real CPU builder, counting builds per job id and overlapping ones."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.builds: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight_per_job = 0

    def build(
        self, request: BuildRequest, dataset: Dataset, *args: Any, **kwargs: Any
    ) -> FaissIndex:
        job_id = request.job_id
        with self.lock:
            self.builds[job_id] += 1
            self.in_flight[job_id] += 1
            self.max_in_flight_per_job = max(self.max_in_flight_per_job, self.in_flight[job_id])
        try:
            return super().build(request, dataset, *args, **kwargs)
        finally:
            with self.lock:
                self.in_flight[job_id] -= 1


class StoreWatch:
    """Records, around the real ``LocalJobStore``, what it created and how each job ended."""

    def __init__(self, jobs: LocalJobStore) -> None:
        self.jobs = jobs
        self.lock = threading.Lock()
        self.created: dict[str, list[Job]] = defaultdict(list)
        self.endings: Counter[int] = Counter()  # id(job) -> record() calls that returned True
        self.late_endings = 0  # record() calls that returned False
        self.overlaps: list[str] = []  # a job created while one for the same id was active
        self.max_size = 0
        real_add, real_record = jobs.add_if_absent, jobs.record

        def add_if_absent(request: BuildRequest) -> tuple[Job, bool]:
            job, created = real_add(request)
            if created:
                with self.lock:
                    if any(not old.state.terminal for old in self.created[job.id]):
                        self.overlaps.append(job.id)
                    self.created[job.id].append(job)
            self.sample()
            return job, created

        def record(job: Job, outcome: Outcome) -> bool:
            ended = real_record(job, outcome)
            with self.lock:
                if ended:
                    self.endings[id(job)] += 1
                else:
                    self.late_endings += 1
            return ended

        # Instance attributes shadow the methods for every caller (service and runner).
        setattr(jobs, "add_if_absent", add_if_absent)  # noqa: B010
        setattr(jobs, "record", record)  # noqa: B010

    def sample(self) -> None:
        size = len(self.jobs)
        with self.lock:
            self.max_size = max(self.max_size, size)

    def all_jobs(self) -> list[Job]:
        with self.lock:
            return [job for jobs in self.created.values() for job in jobs]


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """uvicorn on a free loopback port, lifespan included."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    tick = threading.Event()
    for _ in range(3000):
        if server.started or not thread.is_alive():
            break
        tick.wait(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive()


@pytest.mark.slow
# Traced, its 20,000 requests take several times longer on 2 cores and outrun the
# deadline; the code it drives is covered by the other tests.
@pytest.mark.no_cover
def test_load(s3_config: S3Config, s3_client: Any, bucket: str) -> None:
    rng = random.Random(7)
    for i in range(STEMS):
        upload(s3_client, bucket, f"load/s{i}", clustered(5 + i, 4 + i % 8, seed=i))
    bodies = [
        build_body(bucket, f"load/s{i}", 4 + i % 8, 5 + i, tenant_id=f"t{t}", index_parameters=FAST)
        for t in range(TENANTS)
        for i in range(STEMS)
    ]
    # Each distinct request, its duplicates and the hot bursts, shuffled within windows:
    # most duplicates find their job queued, running or completed; the rest arrive after
    # the full store evicted it, and start a new job, as a forgotten request must.
    extra = Counter(rng.choices(range(len(bodies)), k=DUPLICATES))
    extra.update({i: HOT_REPEATS for i in range(HOT_JOBS)})
    submissions = [body for i, body in enumerate(bodies) for _ in range(1 + extra[i])]
    for start in range(0, len(submissions), WINDOW):
        window = submissions[start : start + WINDOW]
        rng.shuffle(window)
        submissions[start : start + WINDOW] = window

    builder = CountingBuilder()
    settings = make_settings(s3_config, request_store_max_size=STORE_SIZE, max_workers=4)
    app = create_app(settings, Overrides(builder=builder))
    process = psutil.Process()
    build_codes: Counter[int] = Counter()
    status_codes: Counter[int] = Counter()
    statuses: Counter[str] = Counter()
    accepted: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    with serving(app) as url:
        watch = StoreWatch(app.state.backend.store)
        limits = httpx.Limits(max_connections=SUBMITTERS + POLLERS)
        with httpx.Client(base_url=url, limits=limits, timeout=30) as http:
            # Warm up (imports, first builds), then take the memory baseline.
            warm = http.post("/_build", json=build_body(bucket, "load/s0", 4, 5, tenant_id="w"))
            assert warm.status_code == 200
            _wait_all_terminal(watch, polls=1500)
            rss_before = process.memory_info().rss

            def submit(body: dict[str, Any]) -> None:
                pause = threading.Event()
                for _ in range(5000):
                    response = http.post("/_build", json=body)
                    with lock:
                        build_codes[response.status_code] += 1
                    if response.status_code != 429:
                        assert response.status_code == 200, response.text
                        with lock:
                            accepted.append(response.json()["job_id"])
                        return
                    assert response.headers["retry-after"] == "5"
                    pause.wait(0.02)  # a real client waits Retry-After; this is a load test
                raise AssertionError("never accepted")

            def poll(count: int) -> None:
                poll_rng = random.Random(count)
                for _ in range(count):
                    with lock:
                        known = accepted[-200:] if accepted else []
                    if not known:
                        if done.is_set():
                            return
                        threading.Event().wait(0.001)
                        continue
                    response = http.get(f"/_status/{poll_rng.choice(known)}")
                    with lock:
                        status_codes[response.status_code] += 1
                        if response.status_code == 200:
                            statuses[response.json()["task_status"]] += 1
                    assert response.status_code in (200, 404), response.text
                    watch.sample()

            with ThreadPoolExecutor(SUBMITTERS + POLLERS) as pool:
                polls = [pool.submit(poll, POLLS // POLLERS) for _ in range(POLLERS)]
                submits = [pool.submit(submit, body) for body in submissions]
                for future in submits:
                    future.result(timeout=DEADLINE_S)
                done.set()
                for future in polls:
                    future.result(timeout=DEADLINE_S)
            _wait_all_terminal(watch, polls=int(DEADLINE_S * 50))
            wait_idle(app)
            beat = http.get("/_heart_beat").json()
            stored = len(watch.jobs)
            rss_after = process.memory_info().rss

    jobs = watch.all_jobs()
    builds = sum(builder.builds.values())
    # No 5xx; every submission was accepted, some after 429s from a full store.
    assert set(build_codes) == {200, 429} and build_codes[200] == len(submissions)
    # 404: the poll asked for a finished job the full store had already evicted.
    assert set(status_codes) <= {200, 404} and status_codes[200] > 0
    assert statuses["FAILED_INDEX_BUILD"] == 0
    # Every created job ended exactly once, completed, and was built exactly once.
    assert all(job.state is JobState.COMPLETED for job in jobs)
    assert all(watch.endings[id(job)] == 1 for job in jobs) and watch.late_endings == 0
    assert builds == len(jobs)
    assert all(builder.builds[i] == len(created) for i, created in watch.created.items())
    # Never two jobs or two builds for the same request at once; every accepted id was created.
    assert watch.overlaps == [] and builder.max_in_flight_per_job == 1
    assert set(accepted) <= set(watch.created)
    # The store stayed within its bound, evicting finished jobs to make room.
    assert watch.max_size <= STORE_SIZE and len(jobs) - stored > 0
    # Memory: nothing reserved, and RSS about where it was (allocators keep some).
    assert beat["memory"]["host_reserved_bytes"] == 0 and beat["jobs_in_flight"] == 0
    assert rss_after - rss_before < 256 * 2**20


def _wait_all_terminal(watch: StoreWatch, polls: int) -> None:
    tick = threading.Event()
    for _ in range(polls):
        if all(job.state.terminal for job in watch.all_jobs()):
            return
        tick.wait(0.02)
    pending = [job.id for job in watch.all_jobs() if not job.state.terminal]
    raise AssertionError(f"{len(pending)} jobs never finished: {pending[:5]}")
