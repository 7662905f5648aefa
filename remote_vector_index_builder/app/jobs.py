"""Jobs: their states, one job of this process, the frozen snapshot every answer is built
from, the one value of a job's outcome, and what the endpoints and the runner need of the
jobs (``JobService``, ``JobLedger``), whichever backend holds them (``app/local.py`` in one
process, ``app/fleet*.py`` in a fleet).

The three refusals of add-if-absent (404, 409, 429) are worded here once: the in-memory
store (Python) and the fleet's SUBMIT script (Lua) decide, these functions say it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from remote_vector_index_builder.core.errors import (
    JobConflictError,
    JobNotFoundError,
    StoreFullError,
)
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.workflow import Stage, stage_unit

Clock = Callable[[], float]

CANCELLED_MESSAGE = "cancelled by operator"


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

    @property
    def stage(self) -> Stage | None:
        """The stage the job is in, or the last one it reached; None while it never ran."""
        if self.state in _STATE_STAGES:
            return _STATE_STAGES[self.state]
        return Stage(self.stage_times[-1][0]) if self.stage_times else None


@dataclass(frozen=True)
class Outcome:
    """How a job ended, recorded whole by either store (``JobLedger.record``).

    ``error`` is what ``/_status`` reports for a failed or cancelled job; ``file_name``,
    ``index_bytes``, ``quality`` and ``device`` belong to a completed one (``device``:
    where it was built, ``cpu`` for a GPU build that fell back to the CPU).
    """

    state: JobState
    error: str | None = None
    file_name: str | None = None
    index_bytes: int | None = None
    quality: dict[str, Any] | None = None
    device: str | None = None


@dataclass
class Job:
    """A job of this process. Its fields change under ``_lock`` only; read ``snapshot()``."""

    id: str
    request: BuildRequest
    submitted_at: float
    # Runs started: 0 while a new job waits, one more at each claim (the fleet's fencing
    # token); a job submitted again after it failed keeps its count.
    attempt: int = 0
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

    def end(self, outcome: Outcome, now: float) -> bool:
        """Record the outcome, all fields in one step; False if the job had already ended."""
        with self._lock:
            if self.state.terminal:
                return False
            self.state = outcome.state
            self.file_name = outcome.file_name
            self.error = outcome.error
            self.finished_at = now
            if outcome.index_bytes is not None:
                self.index_bytes = outcome.index_bytes
            if outcome.quality is not None:
                self.quality = dict(outcome.quality)
            if outcome.device is not None:
                self.device = outcome.device
            return True

    def claimed(self) -> int:
        """A run of the job starts: its attempt number (one more than the last)."""
        with self._lock:
            self.attempt += 1
            return self.attempt

    def current_state(self) -> JobState:
        with self._lock:
            return self.state

    def status_body(self) -> dict[str, Any]:
        return self.snapshot().status_body()


def state_named(value: object) -> object:
    """A ``JobState`` or ``TaskStatus`` by its value (``GET /_jobs?state=``); one error
    naming every value for anything else."""
    if not isinstance(value, str):
        return value
    for kind in (JobState, TaskStatus):
        if value in kind.__members__.values():
            return kind(value)
    names = ", ".join([*JobState, *TaskStatus])
    raise ValueError(f"unknown state {value!r}; use one of {names}")


@dataclass(frozen=True)
class JobQuery:
    """Which jobs ``GET /_jobs`` lists: by state (a ``JobState`` or the client's
    ``TaskStatus``), in job id order, ``limit`` of them after the id ``after``."""

    state: JobState | TaskStatus | None = None
    limit: int | None = None
    after: str | None = None

    def wants(self, snap: JobSnapshot) -> bool:
        state = self.state
        return state is None or snap.state is state or snap.task_status is state

    def page(self, snaps: Iterable[JobSnapshot]) -> list[JobSnapshot]:
        after = self.after
        chosen = sorted(
            (s for s in snaps if (after is None or s.id > after) and self.wants(s)),
            key=lambda s: s.id,
        )
        return chosen if self.limit is None else chosen[: self.limit]


@dataclass(frozen=True)
class Deleted:
    """What ``DELETE /_jobs/{id}`` did: cancelled an active job, or forgot an ended one."""

    snapshot: JobSnapshot
    forgotten: bool


class JobService(Protocol):
    """What the endpoints need of jobs (``local.LocalJobService``,
    ``fleet_service.FleetJobService``).

    Every read returns a ``JobSnapshot`` (or the status body built from one). ``submit``
    admits the request first (``admission.Admission.admit``: 503, 507).
    """

    def now(self) -> float: ...

    async def submit(self, request: BuildRequest) -> str:
        """The job id; an identical request returns the existing job's id."""
        ...

    async def status(self, job_id: str) -> dict[str, Any]: ...

    async def snapshot(self, job_id: str) -> JobSnapshot: ...

    async def snapshots(self, query: JobQuery) -> list[JobSnapshot]: ...

    async def delete(self, job_id: str) -> Deleted:
        """Cancel a queued or running job; forget an ended one (its id is free again)."""
        ...


class JobLedger(Protocol):
    """Where the runner records outcomes and asks whether a build may go on: the in-memory
    store (``local.LocalJobStore``) or the leases this fleet replica holds
    (``fleet_leases.Leases``)."""

    def record(self, job: Job, outcome: Outcome) -> bool:
        """Record ``outcome`` once; False if the job had ended or is no longer this process's."""
        ...

    def active(self) -> list[Job]: ...

    def checkpoint(self, job: Job) -> None:
        """Between batches and parts: raise ``CancelledError`` if this build must stop."""
        ...

    def commit_check(self, job: Job) -> None:
        """Right before the index becomes visible: raise ``CancelledError`` if it must not."""
        ...

    def hand_back(self, job: Job) -> bool:
        """Give a job this process cannot finish to another replica; False if there is none."""
        ...


def conflict(request: BuildRequest, state: JobState) -> JobConflictError:
    """409: the job of this id was submitted with other build parameters and is ``state``."""
    job_id, path = request.job_id, request.vector_path
    if state is JobState.COMPLETED:
        return JobConflictError(
            f"job {job_id} for {path!r} already exists with different build parameters and "
            f"has completed; forget it (DELETE /_jobs/{job_id}) and submit again, or use a "
            "new vector_path"
        )
    return JobConflictError(
        f"job {job_id} for {path!r} already exists with different build parameters and is "
        f"still running ({state.value}); wait for it to finish or cancel it "
        f"(DELETE /_jobs/{job_id}), or use a new vector_path"
    )


def store_full(active: int) -> StoreFullError:
    return StoreFullError(
        f"the job store holds {active} queued or running jobs, its limit "
        "(REQUEST_STORE_MAX_SIZE); retry later"
    )


def not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError(
        f"no job {job_id!r}: it was never accepted or finished more than "
        "REQUEST_STORE_TTL_SECONDS ago"
    )
