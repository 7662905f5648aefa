"""Jobs and the job store: the service's only shared mutable state.

Active (queued or running) jobs live in a plain dict and never expire: the
client sees a 404 as "abandon the remote build". Finished jobs move to a
``cachetools.TTLCache`` when they finish, so their TTL counts from the end of
the build, not from submission. Both together stay within ``max_size``: a full
store drops the least recently used finished job, and a store full of active
jobs refuses new ones (``StoreFullError`` -> 429).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from cachetools import TTLCache

from remote_vector_index_builder.core.errors import (
    JobConflictError,
    JobNotFoundError,
    StoreFullError,
)
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.workflow import Stage, StageProgress, stage_unit

Clock = Callable[[], float]


class JobState(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    PARSING = "parsing"
    BUILDING = "building"
    SERIALIZING = "serializing"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


STAGE_STATES = {
    Stage.DOWNLOAD: JobState.DOWNLOADING,
    Stage.PARSE: JobState.PARSING,
    Stage.BUILD: JobState.BUILDING,
    Stage.SERIALIZE: JobState.SERIALIZING,
    Stage.UPLOAD: JobState.UPLOADING,
}
_STATE_STAGES = {state: stage for stage, state in STAGE_STATES.items()}


class TaskStatus(StrEnum):
    """The three values the k-NN client understands."""

    RUNNING = "RUNNING_INDEX_BUILD"
    COMPLETED = "COMPLETED_INDEX_BUILD"
    FAILED = "FAILED_INDEX_BUILD"


def status_body(state: JobState, file_name: str | None, error: str | None) -> dict[str, Any]:
    """Exactly the keys of the client's ``GET /_status`` body (docs/knn-contract.md, 2)."""
    task = task_status(state)
    return {
        "task_status": task.value,
        "file_name": file_name if state is JobState.COMPLETED else None,
        "error_message": error if task is TaskStatus.FAILED else None,
    }


def task_status(state: JobState) -> TaskStatus:
    if state is JobState.COMPLETED:
        return TaskStatus.COMPLETED
    if state in (JobState.FAILED, JobState.CANCELLED):
        return TaskStatus.FAILED
    return TaskStatus.RUNNING


@dataclass(frozen=True)
class JobSnapshot:
    """One consistent, immutable view of a job: every response is built from one.

    ``Job.snapshot`` takes it under the job's lock; the fleet's Redis store builds
    the same type from the job's hash, so the endpoints cannot tell the stores apart.
    """

    id: str
    # None: the fleet stored a request this version cannot parse (``raw_request`` holds
    # what could be read of it, for listings); such a job never builds here.
    request: BuildRequest | None
    state: JobState
    attempt: int
    submitted_at: float
    raw_request: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    file_name: str | None = None
    error: str | None = None
    device: str | None = None
    index_bytes: int | None = None
    reserved_bytes: int = 0
    stage_total: int = 0
    stage_done: int = 0
    stage_started_at: float | None = None
    # Stage name -> start time, in the order the stages ran; stage name -> seconds.
    stage_times: tuple[tuple[str, float], ...] = ()
    stage_seconds: tuple[tuple[str, float], ...] = ()
    cancel_requested: bool = False
    # Recall of the built index, when the build measured it (``BuildResult.quality``).
    quality: dict[str, Any] | None = None
    # Fleet mode: the replica that holds the job and when its lease runs out.
    owner: str | None = None
    lease_expires_at: float | None = None

    @property
    def task_status(self) -> TaskStatus:
        return task_status(self.state)

    def status_body(self) -> dict[str, Any]:
        return status_body(self.state, self.file_name, self.error)

    def _request_summary(self) -> dict[str, Any]:
        r = self.request
        if r is not None:
            return {
                "tenant_id": r.tenant_id,
                "bucket": r.container_name,
                "vector_path": r.vector_path,
                "data_type": r.data_type.value,
                "dimension": r.dimension,
                "doc_count": r.doc_count,
                "vector_bytes": r.vector_blob_bytes,
            }
        # What could be read of an unreadable request; its size is unknown (0).
        raw = self.raw_request or {}

        def text(key: str) -> str:
            value = raw.get(key)
            return value if isinstance(value, str) else ""

        def number(key: str) -> int:
            value = raw.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return {
            "tenant_id": text("tenant_id"),
            "bucket": text("container_name"),
            "vector_path": text("vector_path"),
            "data_type": text("data_type"),
            "dimension": number("dimension"),
            "doc_count": number("doc_count"),
            "vector_bytes": 0,
        }

    def summary(self) -> dict[str, Any]:
        """What operators see in ``GET /_jobs``."""
        return {
            "task_status": self.task_status.value,
            "state": self.state.value,
            "attempt": self.attempt,
            **self._request_summary(),
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "file_name": self.file_name,
            "error_message": self.error,
            "device": self.device,
            "index_bytes": self.index_bytes,
            "quality": self.quality,
            "owner": self.owner,
            "lease_expires_at": self.lease_expires_at,
        }

    def progress(self, now: float) -> dict[str, Any]:
        """The current stage's progress; a completed job is at 100 %."""
        state, done, total = self.state, self.stage_done, self.stage_total
        last = self.stage_times[-1][0] if self.stage_times else None
        stage = _STATE_STAGES.get(state) or (Stage(last) if last else None)
        if stage is None:  # queued
            return {
                "stage": None,
                "unit": None,
                "done": 0,
                "total": 0,
                "percent": 0.0,
                "eta_seconds": None,
            }
        if state is JobState.COMPLETED:
            return {
                "stage": stage.value,
                "unit": stage_unit(stage),
                "done": done,
                "total": total,
                "percent": 100.0,
                "eta_seconds": 0.0,
            }
        started = self.stage_started_at
        elapsed = now - started if started is not None else 0.0
        view = StageProgress(stage, done, total, elapsed)
        eta = view.eta_s if not state.terminal else None
        return {
            "stage": stage.value,
            "unit": view.unit,
            "done": done,
            "total": total,
            "percent": None if view.percent is None else round(view.percent, 2),
            "eta_seconds": None if eta is None else round(eta, 1),
        }

    def detail(self, now: float) -> dict[str, Any]:
        """What operators see in ``GET /_jobs/{job_id}``: the summary, progress and stages."""
        seconds = dict(self.stage_seconds)
        return {
            "job_id": self.id,
            **self.summary(),
            "cancel_requested": self.cancel_requested,
            "progress": self.progress(now),
            "stages": {
                name: {"started_at": started, "seconds": seconds.get(name)}
                for name, started in self.stage_times
            },
        }


@dataclass
class Job:
    """A job of this process. Its fields change under ``_lock`` only; read ``snapshot()``."""

    id: str
    request: BuildRequest
    submitted_at: float
    attempt: int = 1
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    file_name: str | None = None
    error: str | None = None
    device: str | None = None
    index_bytes: int | None = None
    quality: dict[str, Any] | None = None
    # Progress of the current stage, in its own units (bytes or vectors).
    stage_total: int = 0
    stage_done: int = 0
    stage_started_at: float | None = None
    stage_times: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reserved_bytes: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return JobSnapshot(
                id=self.id,
                request=self.request,
                state=self.state,
                attempt=self.attempt,
                submitted_at=self.submitted_at,
                started_at=self.started_at,
                finished_at=self.finished_at,
                file_name=self.file_name,
                error=self.error,
                device=self.device,
                index_bytes=self.index_bytes,
                reserved_bytes=self.reserved_bytes,
                stage_total=self.stage_total,
                stage_done=self.stage_done,
                stage_started_at=self.stage_started_at,
                stage_times=tuple(self.stage_times.items()),
                stage_seconds=tuple(self.stage_seconds.items()),
                cancel_requested=self.cancel_requested.is_set(),
                quality=None if self.quality is None else dict(self.quality),
            )

    def begin(self, now: float, device: str, reserved_bytes: int) -> None:
        """The build got its memory and a thread: it starts now on ``device``."""
        with self._lock:
            self.started_at = now
            self.device = device
            self.reserved_bytes = reserved_bytes

    def released(self) -> None:
        """The build's memory reservation is back in the budget."""
        with self._lock:
            self.reserved_bytes = 0

    def start_stage(self, stage: Stage, total: int, now: float) -> bool:
        """Enter ``stage``; False if the job already ended (a stopped build must not revive it)."""
        with self._lock:
            if self.state.terminal:
                return False
            self.state = STAGE_STATES[stage]
            self.stage_total = total
            self.stage_done = 0
            self.stage_started_at = now
            self.stage_times[stage.value] = now
            return True

    def advance(self, amount: int) -> None:
        with self._lock:
            self.stage_done += amount

    def finish_stage(self, stage: Stage, seconds: float, nbytes: int) -> None:
        """The stage is complete: its estimated total becomes what was actually done."""
        with self._lock:
            self.stage_seconds[stage.value] = seconds
            if stage_unit(stage) == "bytes" and nbytes > 0:
                self.stage_done = max(self.stage_done, nbytes)
            if self.stage_done > 0:
                self.stage_total = self.stage_done
            else:  # a builder that reports nothing (CAGRA builds in one call)
                self.stage_done = self.stage_total

    def end(
        self,
        state: JobState,
        file_name: str | None,
        error: str | None,
        now: float,
        *,
        index_bytes: int | None = None,
        quality: dict[str, Any] | None = None,
    ) -> bool:
        """Record the outcome, all fields in one step; False if the job had already ended."""
        with self._lock:
            if self.state.terminal:
                return False
            self.state = state
            self.file_name = file_name
            self.error = error
            self.finished_at = now
            if index_bytes is not None:
                self.index_bytes = index_bytes
            if quality is not None:
                self.quality = dict(quality)
            return True

    def current_state(self) -> JobState:
        with self._lock:
            return self.state

    def status_body(self) -> dict[str, Any]:
        return self.snapshot().status_body()


class JobService(Protocol):
    """What the endpoints need of jobs: ``LocalJobService`` (runner) or ``FleetJobService``.

    Every read returns a ``JobSnapshot`` (or the status body built from one).
    """

    def now(self) -> float: ...

    async def submit(self, request: BuildRequest) -> str:
        """The job id; an identical request returns the existing job's id."""
        ...

    async def status(self, job_id: str) -> dict[str, Any]: ...

    async def snapshot(self, job_id: str) -> JobSnapshot: ...

    async def snapshots(self) -> list[JobSnapshot]: ...

    async def cancel(self, job_id: str) -> JobSnapshot: ...


class JobStore:
    def __init__(self, max_size: int, ttl_seconds: float, clock: Clock = time.time) -> None:
        self.max_size = max_size
        self.clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}
        self._finished: TTLCache[str, Job] = TTLCache(max_size, ttl_seconds, timer=clock)

    def add_if_absent(self, request: BuildRequest) -> tuple[Job, bool]:
        """Return ``(job, created)``; atomic, so concurrent duplicates share one job.

        A queued, running or completed job with the same id is returned as is;
        a failed one is replaced by a new attempt. The same id with different
        build parameters is a conflict.
        """
        job_id = request.job_id
        with self._lock:
            existing = self._active.get(job_id) or self._finished.get(job_id)
            if existing is not None and existing.state is not JobState.FAILED:
                if existing.state is JobState.CANCELLED:
                    pass  # a cancelled job may be submitted again
                elif existing.request.fingerprint != request.fingerprint:
                    raise JobConflictError(
                        f"job {job_id} for {request.vector_path!r} already exists with "
                        "different build parameters; wait for it to finish or use a new "
                        "vector_path"
                    )
                else:
                    return existing, False
            if existing is not None:
                self._finished.pop(job_id, None)
            self._make_room()
            job = Job(
                id=job_id,
                request=request,
                submitted_at=self.clock(),
                attempt=existing.attempt + 1 if existing else 1,
            )
            self._active[job_id] = job
            return job, True

    def _make_room(self) -> None:
        self._finished.expire()
        while len(self._active) + len(self._finished) >= self.max_size:
            if not self._finished:
                raise StoreFullError(
                    f"the job store holds {len(self._active)} queued or running jobs, its "
                    "limit (REQUEST_STORE_MAX_SIZE); retry later"
                )
            self._finished.popitem()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._active.get(job_id) or self._finished.get(job_id)
        if job is None:
            raise JobNotFoundError(
                f"no job {job_id!r}: it was never accepted or finished more than "
                "REQUEST_STORE_TTL_SECONDS ago"
            )
        return job

    def finish(
        self,
        job: Job,
        state: JobState,
        *,
        file_name: str | None = None,
        error: str | None = None,
        index_bytes: int | None = None,
        quality: dict[str, Any] | None = None,
    ) -> bool:
        """Record the outcome once; False if the job had already finished."""
        with self._lock:
            ended = job.end(
                state, file_name, error, self.clock(), index_bytes=index_bytes, quality=quality
            )
            if not ended:
                return False
            if self._active.get(job.id) is job:
                del self._active[job.id]
                self._finished[job.id] = job
            return True

    def hand_back(self, job: Job) -> bool:
        """One process has no other replica to give a job to."""
        return False

    def checkpoint(self, job: Job) -> None:
        """Nothing but a cancel (which the runner checks itself) stops a build here."""

    def commit_check(self, job: Job) -> None:
        """One process holds no lease: nothing but a cancel stops the upload here."""

    def remove(self, job: Job) -> None:
        with self._lock:
            if self._active.get(job.id) is job:
                del self._active[job.id]

    def jobs(self) -> list[Job]:
        with self._lock:
            self._finished.expire()
            return [*self._active.values(), *self._finished.values()]

    def active(self) -> list[Job]:
        with self._lock:
            return list(self._active.values())

    def __len__(self) -> int:
        with self._lock:
            self._finished.expire()
            return len(self._active) + len(self._finished)
