"""One process (no ``RVIB_REDIS_URL``): its jobs in memory, placed on its own runner.

The same shape as the fleet (``fleet.Fleet``): a job service for the endpoints
(``LocalJobService``), a ledger for the runner (``LocalJobStore``), and placement that
takes queued jobs in the admission's order (``admission.Placement``) whenever a build
thread is free, a job arrives, or a build gets stuck past its time limit.
"""

from __future__ import annotations

import itertools
import threading
import time
from enum import Enum
from typing import Any

import anyio.to_thread
from cachetools import TTLCache

from remote_vector_index_builder.app.admission import STUCK_MESSAGE, Admission, Placement
from remote_vector_index_builder.app.jobs import (
    CANCELLED_MESSAGE,
    Clock,
    Deleted,
    Job,
    JobQuery,
    JobSnapshot,
    JobState,
    Outcome,
    conflict,
    not_found,
    store_full,
)
from remote_vector_index_builder.app.metrics import Metrics
from remote_vector_index_builder.app.runner import Runner, classify
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.errors import CancelledError, ServiceUnavailableError
from remote_vector_index_builder.core.params import BuildRequest


class Removal(Enum):
    FORGOTTEN = "forgotten"  # it had ended: gone, its id free again
    DEQUEUED = "dequeued"  # it was queued: it never starts
    CANCELLING = "cancelling"  # it runs: it stops at its next batch, part or stage


class LocalJobStore:
    """This process's jobs: the service's only shared mutable state.

    Active (queued or running) jobs live in a plain dict and never expire: the client
    sees a 404 as "abandon the remote build". Finished jobs move to a
    ``cachetools.TTLCache`` when they finish, so their TTL counts from the end of the
    build, not from submission. Both together stay within ``max_size``: a full store
    drops the least recently used finished job, and a store full of active jobs refuses
    new ones (``StoreFullError`` -> 429). Queued jobs also wait in submission order until
    placement claims them.

    It is the runner's ``JobLedger`` in one process.
    """

    def __init__(self, max_size: int, ttl_seconds: float, clock: Clock = time.time) -> None:
        self.max_size = max_size
        self.clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}
        self._queued: dict[str, Job] = {}  # not claimed yet, oldest first
        self._finished: TTLCache[str, Job] = TTLCache(max_size, ttl_seconds, timer=clock)

    def add_if_absent(self, request: BuildRequest) -> tuple[Job, bool]:
        """Return ``(job, created)``; atomic, so concurrent duplicates share one job.

        A queued, running or completed job with the same id is returned as is; a failed
        or cancelled one is replaced by a job that keeps its attempt count. The same id
        with different build parameters is a conflict (the fleet's SUBMIT script decides
        the same way).
        """
        job_id = request.job_id
        with self._lock:
            existing = self._active.get(job_id) or self._finished.get(job_id)
            if existing is not None:
                state = existing.current_state()
                if state not in (JobState.FAILED, JobState.CANCELLED):
                    if existing.request.fingerprint != request.fingerprint:
                        raise conflict(request, state)
                    return existing, False
                self._finished.pop(job_id, None)
            self._make_room()
            job = Job(
                id=job_id,
                request=request,
                submitted_at=self.clock(),
                attempt=existing.attempt if existing is not None else 0,
            )
            self._active[job_id] = job
            self._queued[job_id] = job
            return job, True

    def _make_room(self) -> None:
        self._finished.expire()
        while len(self._active) + len(self._finished) >= self.max_size:
            if not self._finished:
                raise store_full(len(self._active))
            self._finished.popitem()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._active.get(job_id) or self._finished.get(job_id)
        if job is None:
            raise not_found(job_id)
        return job

    def remove(self, job_id: str) -> tuple[Job, Removal]:
        """``DELETE``: forget an ended job, or ask an active one to stop (and take it out of
        the queue if it waits there)."""
        with self._lock:
            job = self._active.get(job_id) or self._finished.get(job_id)
            if job is None:
                raise not_found(job_id)
            if job.current_state().terminal:
                self._finished.pop(job_id, None)
                return job, Removal.FORGOTTEN
            job.cancel_requested.set()
            if self._queued.get(job_id) is job:
                del self._queued[job_id]
                return job, Removal.DEQUEUED
            return job, Removal.CANCELLING

    def jobs(self) -> list[Job]:
        with self._lock:
            self._finished.expire()
            return [*self._active.values(), *self._finished.values()]

    def __len__(self) -> int:
        with self._lock:
            self._finished.expire()
            return len(self._active) + len(self._finished)

    # -- the queue placement takes from -----------------------------------------------------

    def queue_head(self, count: int) -> list[str]:
        with self._lock:
            return list(itertools.islice(self._queued, count))

    def queued_request(self, job_id: str) -> BuildRequest | None:
        with self._lock:
            job = self._queued.get(job_id)
        return None if job is None else job.request

    def claim(self, job_id: str) -> Job | None:
        """Take a queued job out of the queue (one more attempt); None if it left it."""
        with self._lock:
            job = self._queued.pop(job_id, None)
            if job is not None:
                job.claimed()
            return job

    def dequeue(self, job_id: str) -> Job | None:
        with self._lock:
            return self._queued.pop(job_id, None)

    def unclaim(self, job: Job) -> bool:
        """A claimed job the runner could not take goes back to the queue's head (its
        attempt stays counted, so the next claim cannot collide); False if it was
        cancelled meanwhile."""
        with self._lock:
            if self._active.get(job.id) is not job or job.cancel_requested.is_set():
                return False
            self._queued = {job.id: job, **self._queued}
            return True

    def drain_queue(self) -> list[Job]:
        with self._lock:
            queued, self._queued = list(self._queued.values()), {}
            return queued

    # -- the runner's ledger ------------------------------------------------------------------

    def record(self, job: Job, outcome: Outcome) -> bool:
        """Record the outcome once; False if the job had already ended."""
        with self._lock:
            if not job.end(outcome, self.clock()):
                return False
            if self._active.get(job.id) is job:
                del self._active[job.id]
                self._finished[job.id] = job
            if self._queued.get(job.id) is job:
                del self._queued[job.id]
            return True

    def active(self) -> list[Job]:
        with self._lock:
            return list(self._active.values())

    def checkpoint(self, job: Job) -> None:
        """Nothing but a cancel (which the runner checks itself) stops a build here."""

    def commit_check(self, job: Job) -> None:
        """One process holds no lease: nothing but a cancel stops the upload here."""

    def hand_back(self, job: Job) -> bool:
        """One process has no other replica to give a job to."""
        return False


class LocalJobService:
    """The endpoints' job service in one process: admission, then the in-memory store."""

    def __init__(self, backend: LocalBackend, metrics: Metrics | None) -> None:
        self.backend = backend
        self.store = backend.store
        self.admission = backend.admission
        self.metrics = metrics

    def now(self) -> float:
        return self.store.clock()

    async def submit(self, request: BuildRequest) -> str:
        self.admission.admit(request)
        job, created = self.store.add_if_absent(request)
        if created:
            if self.metrics is not None:
                self.metrics.jobs_submitted.labels(request.data_type.value).inc()
            self.backend.place()
        return job.id

    async def status(self, job_id: str) -> dict[str, Any]:
        return self.store.get(job_id).status_body()

    async def snapshot(self, job_id: str) -> JobSnapshot:
        return self.store.get(job_id).snapshot()

    async def snapshots(self, query: JobQuery) -> list[JobSnapshot]:
        # Grows with the store: off the event loop.
        return await anyio.to_thread.run_sync(
            lambda: query.page(job.snapshot() for job in self.store.jobs())
        )

    async def delete(self, job_id: str) -> Deleted:
        job, removal = self.store.remove(job_id)
        if removal is Removal.DEQUEUED:
            self.backend.end_unplaced(job, CancelledError(CANCELLED_MESSAGE))
        return Deleted(job.snapshot(), forgotten=removal is Removal.FORGOTTEN)


class LocalBackend:
    """Everything one process needs around its runner; built and closed by the lifespan."""

    def __init__(
        self,
        settings: Settings,
        admission: Admission,
        metrics: Metrics | None,
        clock: Clock,
    ) -> None:
        self.admission = admission
        self.store = LocalJobStore(
            settings.request_store_max_size, settings.request_store_ttl_seconds, clock
        )
        self.ledger = self.store
        self.placement = Placement(self, admission, allowed_buckets=settings.allowed_buckets)
        self.service = LocalJobService(self, metrics)
        self._runner: Runner | None = None
        self._placing = threading.Lock()

    def start(self, runner: Runner) -> None:
        self._runner = runner
        self.place()

    def slot_free(self) -> None:
        self.place()

    def stop(self) -> None:
        """Nothing to stop before the runner: its shutdown ends placement (admission)."""

    async def close(self) -> None:
        """Nothing outlives the runner in one process."""

    def summary(self) -> dict[str, Any]:
        """What one process adds to ``/_heart_beat``: nothing."""
        return {}

    # -- placement ------------------------------------------------------------------------

    def place(self) -> None:
        """Start queued jobs on free build threads, in the admission's order."""
        runner = self._runner
        if runner is None:
            return
        with self._placing:
            if runner.threads_stuck():
                for job in self.store.drain_queue():
                    runner.record(job, ServiceUnavailableError(STUCK_MESSAGE))
                return
            while runner.free_threads() > 0:
                claimed = self.placement.take()
                if claimed is None:
                    return
                job = self.store.get(claimed.job_id)
                try:
                    runner.submit(job, claimed.need)
                except ServiceUnavailableError:
                    # Shutting down, or an earlier build of this id still stops: its end
                    # places again.
                    self.admission.release(claimed.need)
                    if not self.store.unclaim(job):
                        runner.record(job, CancelledError(CANCELLED_MESSAGE))
                    return

    def end_unplaced(self, job: Job, exc: BaseException) -> None:
        """A job that left the queue before it ran ends here (the runner's one record)."""
        runner = self._runner
        if runner is not None:
            runner.record(job, exc)
        else:  # before start-up ends: nothing to count or log yet
            self.store.record(job, classify(exc).outcome)

    # The queue placement takes from (``admission.Queue``).

    def queue_head(self, count: int) -> list[str]:
        return self.store.queue_head(count)

    def queued_request(self, job_id: str) -> BuildRequest | None:
        return self.store.queued_request(job_id)

    def claim(self, job_id: str) -> int:
        job = self.store.claim(job_id)
        return 0 if job is None else job.snapshot().attempt

    def reject(self, job_id: str, error: str) -> bool:
        job = self.store.dequeue(job_id)
        if job is None:
            return False
        self.end_unplaced(job, ServiceUnavailableError(error))
        return True
