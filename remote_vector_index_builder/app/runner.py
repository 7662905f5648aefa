"""The thread pool, memory admission, and the one place that records outcomes.

A job that can never fit in the memory limits is refused at submit (507). A job
that fits but not right now waits in the queue (still ``RUNNING_INDEX_BUILD``
on the wire) until running builds release their reservations.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.to_thread

from remote_vector_index_builder.app.jobs import Clock, Job, JobSnapshot, JobState, JobStore
from remote_vector_index_builder.app.logs import job_context, set_stage
from remote_vector_index_builder.app.metrics import Metrics
from remote_vector_index_builder.core import errors, memory, workflow
from remote_vector_index_builder.core.errors import (
    InsufficientMemoryError,
    JobConflictError,
    RvibError,
    ServiceUnavailableError,
)
from remote_vector_index_builder.core.index_builder import IndexBuilder, set_build_threads
from remote_vector_index_builder.core.multipart import UploadPlan
from remote_vector_index_builder.core.object_store import ObjectStore
from remote_vector_index_builder.core.options import SerializationMode
from remote_vector_index_builder.core.params import BuildRequest

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "cancelled by operator"
SHUTDOWN_MESSAGE = "the build service shut down before this build finished; submit the build again"
SHUTTING_DOWN_MESSAGE = "the build service is shutting down; retry elsewhere"
TIME_LIMIT_UNREADY = (
    "a build exceeded RVIB_JOB_TIME_LIMIT_SECONDS and its thread cannot be stopped; this "
    "service takes no builds until that thread ends: restart it"
)
# A queued job that can only start once such a thread ends waits for nothing that comes.
STUCK_MESSAGE = (
    "a build that exceeded RVIB_JOB_TIME_LIMIT_SECONDS cannot be stopped and holds the memory "
    "or the build thread this job was waiting for; restart the service and submit the build "
    "again"
)


@dataclass(frozen=True)
class Outcome:
    """What an exception means for its job: the one classification of failures."""

    state: JobState
    message: str
    # The ``reason`` label of ``rvib_jobs_failed``: the error class an operator can look up.
    reason: str
    # Not raised on purpose: a bug or a foreign error, logged with its traceback.
    unexpected: bool


def classify(exc: BaseException) -> Outcome:
    if isinstance(exc, errors.CancelledError):
        return Outcome(JobState.CANCELLED, str(exc) or CANCELLED_MESSAGE, "cancelled", False)
    if isinstance(exc, RvibError):
        return Outcome(JobState.FAILED, str(exc), type(exc).__name__, False)
    if isinstance(exc, MemoryError):
        message = "the build ran out of host memory; lower MAX_WORKERS or CPU_MEMORY_LIMIT"
        return Outcome(JobState.FAILED, message, type(exc).__name__, False)
    message = f"unexpected error ({type(exc).__name__}): {exc}"
    return Outcome(JobState.FAILED, message, "unexpected", True)


@dataclass(frozen=True)
class RunnerState:
    """The runner at one moment: what /_heart_beat, /_ready and /metrics all report."""

    accepting: bool
    unhealthy: bool
    device: str
    workers: int
    busy: int
    queued: int
    running: int
    host_limit: int
    host_reserved: int
    gpu_limit: int
    gpu_reserved: int
    # Set at start-up when builds could never succeed (no S3 credentials): the reason.
    refusing: str | None = None

    @property
    def unready_reason(self) -> str | None:
        """Why builds cannot be accepted now; None when they can (the readiness rule)."""
        if not self.accepting:
            return "shutting down"
        if self.unhealthy:
            return TIME_LIMIT_UNREADY
        return self.refusing

    @property
    def ready(self) -> bool:
        return self.unready_reason is None


class RunnerJobs(Protocol):
    """Where the runner records outcomes: the in-memory store, or the fleet's Redis store."""

    def finish(
        self,
        job: Job,
        state: JobState,
        *,
        file_name: str | None = None,
        error: str | None = None,
        index_bytes: int | None = None,
        quality: dict[str, Any] | None = None,
    ) -> bool: ...

    def active(self) -> list[Job]: ...

    def checkpoint(self, job: Job) -> None:
        """Between batches and parts: raise ``errors.CancelledError`` if this build must stop."""
        ...

    def commit_check(self, job: Job) -> None:
        """Right before the index becomes visible: raise ``errors.CancelledError`` if not."""
        ...

    def hand_back(self, job: Job) -> bool:
        """Give a job this process cannot finish to another replica; False if there is none."""
        ...


class MemoryBudget:
    """Reservations of host and GPU bytes against fixed limits, FIFO-fair enough."""

    def __init__(self, host_limit: int, gpu_limit: int) -> None:
        self.host_limit = host_limit
        self.gpu_limit = gpu_limit
        self.host_reserved = 0
        self.gpu_reserved = 0
        # Held by builds past their time limit, whose threads cannot be stopped.
        self.host_stuck = 0
        self.gpu_stuck = 0
        self._cond = threading.Condition()

    def check_fits(self, need: memory.MemoryEstimate) -> None:
        if need.host_bytes > self.host_limit:
            raise InsufficientMemoryError(
                f"this build needs about {need.host_bytes / 2**30:.2f} GiB of host memory but "
                f"CPU_MEMORY_LIMIT is {self.host_limit / 2**30:.2f} GiB; split the segment or "
                "use a larger worker"
            )
        if need.gpu_bytes > self.gpu_limit:
            raise InsufficientMemoryError(
                f"this build needs about {need.gpu_bytes / 2**30:.2f} GiB of GPU memory but "
                f"GPU_MEMORY_LIMIT is {self.gpu_limit / 2**30:.2f} GiB; split the segment or "
                "use a larger GPU"
            )

    def acquire(self, need: memory.MemoryEstimate, cancelled: threading.Event) -> bool:
        """Wait until ``need`` fits; False if cancelled while waiting.

        Raises ``ServiceUnavailableError`` once it cannot fit beside what stuck builds
        hold (``stick``): that memory is not coming back.
        """
        with self._cond:
            while not cancelled.is_set():
                if (
                    self.host_reserved + need.host_bytes <= self.host_limit
                    and self.gpu_reserved + need.gpu_bytes <= self.gpu_limit
                ):
                    self.host_reserved += need.host_bytes
                    self.gpu_reserved += need.gpu_bytes
                    return True
                if (
                    self.host_stuck + need.host_bytes > self.host_limit
                    or self.gpu_stuck + need.gpu_bytes > self.gpu_limit
                ):
                    raise ServiceUnavailableError(STUCK_MESSAGE)
                self._cond.wait(timeout=0.5)
            return False

    def stick(self, need: memory.MemoryEstimate) -> None:
        """``need``, reserved by a build past its time limit, stays held until its thread ends."""
        with self._cond:
            self.host_stuck += need.host_bytes
            self.gpu_stuck += need.gpu_bytes
            self._cond.notify_all()

    def unstick(self, need: memory.MemoryEstimate) -> None:
        with self._cond:
            self.host_stuck -= need.host_bytes
            self.gpu_stuck -= need.gpu_bytes

    def try_acquire(self, need: memory.MemoryEstimate) -> bool:
        """Reserve ``need`` if it fits now, without waiting (the fleet's claimer)."""
        with self._cond:
            if (
                self.host_reserved + need.host_bytes <= self.host_limit
                and self.gpu_reserved + need.gpu_bytes <= self.gpu_limit
            ):
                self.host_reserved += need.host_bytes
                self.gpu_reserved += need.gpu_bytes
                return True
            return False

    def usage(self) -> tuple[int, int, int, int]:
        """``(host_limit, host_reserved, gpu_limit, gpu_reserved)`` read together."""
        with self._cond:
            return self.host_limit, self.host_reserved, self.gpu_limit, self.gpu_reserved

    def release(self, need: memory.MemoryEstimate) -> None:
        with self._cond:
            self.host_reserved -= need.host_bytes
            self.gpu_reserved -= need.gpu_bytes
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _JobTracker(workflow.Tracker):
    def __init__(
        self,
        job: Job,
        clock: Clock,
        metrics: Metrics | None = None,
        jobs: RunnerJobs | None = None,
    ) -> None:
        self.job = job
        self.clock = clock
        self.metrics = metrics
        self.jobs = jobs
        self._stage: workflow.Stage | None = None

    def stage(self, stage: workflow.Stage, total: int) -> None:
        self._check()
        if not self.job.start_stage(stage, total, self.clock()):
            # Failed meanwhile (time limit, shutdown).
            raise errors.CancelledError(CANCELLED_MESSAGE)
        self._stage = stage
        set_stage(stage.value)
        log.info("job %s: %s", self.job.id, stage.value)

    def advance(self, amount: int) -> None:
        self._check()
        self.job.advance(amount)
        metrics = self.metrics
        if metrics is None or amount <= 0:
            return
        if self._stage is workflow.Stage.DOWNLOAD:
            metrics.downloaded_bytes.inc(amount)
        elif self._stage is workflow.Stage.UPLOAD:
            metrics.uploaded_bytes.inc(amount)
        elif self._stage is workflow.Stage.BUILD:
            metrics.vectors_indexed.labels(self.job.request.data_type.value).inc(amount)

    def stage_finished(self, stage: workflow.Stage, timing: workflow.StageTiming) -> None:
        self.job.finish_stage(stage, timing.seconds, timing.nbytes)
        if self.metrics is not None:
            self.metrics.stage_seconds.labels(stage.value).observe(timing.seconds)

    def commit_check(self) -> None:
        if self.jobs is not None:
            self.jobs.commit_check(self.job)
        if self.job.cancel_requested.is_set():
            raise errors.CancelledError(CANCELLED_MESSAGE)

    def _check(self) -> None:
        if self.jobs is not None:
            self.jobs.checkpoint(self.job)
        if self.job.cancel_requested.is_set():
            raise errors.CancelledError(CANCELLED_MESSAGE)


@dataclass(frozen=True)
class RunnerConfig:
    max_workers: int
    mode: SerializationMode
    tmp_dir: str | None
    upload_plan: UploadPlan
    add_batch_rows: int
    on_gpu: bool
    time_limit_s: float | None = None
    # Added to the niceness of the build threads (Linux: per thread, inherited by
    # the threads they start).
    build_nice: int = 0
    # Faiss's OpenMP threads per build (RVIB_OMP_THREADS; set on each build thread).
    omp_threads: int | None = None
    # How often the watchdog looks for builds over the time limit (wall time).
    watchdog_interval_s: float = 1.0


def _lower_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps nicer (Linux's niceness is per thread).

    A build keeps every core busy with OpenMP threads; the event loop has to win
    the CPU as soon as a request arrives. Threads this one starts (transfers,
    Faiss's OpenMP team) inherit its niceness.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))
    except OSError as exc:
        log.warning("could not lower the priority of build thread %d: %s", thread, exc)


def _start_build_thread(nice: int, omp_threads: int | None) -> None:
    """The build threads' initializer: their priority and their OpenMP thread count."""
    _lower_priority(nice)
    if omp_threads is not None:
        set_build_threads(omp_threads)


class Runner:
    def __init__(
        self,
        config: RunnerConfig,
        jobs: RunnerJobs,
        store: ObjectStore,
        builder: IndexBuilder,
        budget: MemoryBudget,
        clock: Clock = time.time,
        metrics: Metrics | None = None,
        on_slot_free: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # Called when a build thread is free again (the fleet's claimer takes the next job).
        self.on_slot_free = on_slot_free
        self.jobs = jobs
        self.store = store
        self.builder = builder
        self.budget = budget
        self.clock = clock
        self.metrics = metrics
        self.accepting = True
        self._pool = ThreadPoolExecutor(
            config.max_workers,
            thread_name_prefix="build",
            initializer=_start_build_thread,
            initargs=(config.build_nice, config.omp_threads),
        )
        # By job id and attempt: a cancelled job's id can be resubmitted while its old
        # thread is still winding down, and a fleet replica can claim a job again while
        # its fenced attempt stops. Both count as busy until their threads end.
        self._futures: dict[tuple[str, int], tuple[Job, Future[None]]] = {}
        self._lock = threading.Lock()
        # Set while a build that overran its time limit still runs: its thread cannot be
        # killed, so the service takes no builds and reports itself unready for an
        # orchestrator to restart it. Those builds' reservations, by (id, attempt);
        # ``_reserved`` holds every running build's.
        self.unhealthy = threading.Event()
        self._stuck: dict[tuple[str, int], memory.MemoryEstimate] = {}
        self._reserved: dict[tuple[str, int], memory.MemoryEstimate] = {}
        self._stopping = threading.Event()
        self._refusing: str | None = None
        self._watchdog: threading.Thread | None = None
        if config.time_limit_s is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name="build-watchdog", daemon=True
            )
            self._watchdog.start()

    def estimate(self, request: BuildRequest) -> memory.MemoryEstimate:
        return memory.estimate(
            request,
            upload=self.config.upload_plan,
            add_batch_rows=self.config.add_batch_rows,
            gpu=self.config.on_gpu,
        )

    def refuse_builds(self, reason: str) -> None:
        """Refuse every build with ``reason`` (503) and report unready: they cannot succeed."""
        log.error("refusing builds: %s", reason)
        self._refusing = reason

    def admit(self, request: BuildRequest) -> memory.MemoryEstimate:
        """Refuse what can never run, or not here now; called before a job is created."""
        if not self.accepting:
            raise ServiceUnavailableError(SHUTTING_DOWN_MESSAGE)
        if self.unhealthy.is_set():
            # Also keeps a job failed by the time limit from running twice at once.
            raise ServiceUnavailableError(TIME_LIMIT_UNREADY)
        if self._refusing is not None:
            raise ServiceUnavailableError(self._refusing)
        need = self.estimate(request)
        self.budget.check_fits(need)
        return need

    def submit(self, job: Job, reserved: memory.MemoryEstimate | None = None) -> None:
        """Queue ``job`` for a build thread; ``reserved``: its memory is already held."""
        key = (job.id, job.attempt)
        with self._lock:
            if not self.accepting:
                raise ServiceUnavailableError(SHUTTING_DOWN_MESSAGE)
            if key in self._futures:  # one process, the same attempt number after eviction
                raise ServiceUnavailableError(
                    f"an earlier build of job {job.id} is still stopping; retry shortly"
                )
            self._futures[key] = (job, self._pool.submit(self._run, job, reserved))
        if self.metrics is not None:
            self.metrics.jobs_submitted.labels(job.request.data_type.value).inc()

    def _run(self, job: Job, reserved: memory.MemoryEstimate | None) -> None:
        with job_context(job.id):
            try:
                self._run_admitted(job, reserved)
            finally:
                with self._lock:
                    entry = self._futures.get((job.id, job.attempt))
                    if entry is not None and entry[0] is job:
                        del self._futures[(job.id, job.attempt)]
                set_stage(None)
                if self.on_slot_free is not None:
                    self.on_slot_free()

    def _run_admitted(self, job: Job, reserved: memory.MemoryEstimate | None) -> None:
        need = reserved or self.estimate(job.request)
        if reserved is None:
            try:
                acquired = self.budget.acquire(need, job.cancel_requested)
            except ServiceUnavailableError as exc:
                self.record(job, exc)
                return
            if not acquired:
                self.record(job, errors.CancelledError(CANCELLED_MESSAGE))
                return
        key = (job.id, job.attempt)
        with self._lock:
            self._reserved[key] = need
        job.begin(self.clock(), self.builder.name, need.host_bytes)
        outcome: workflow.BuildResult | BaseException
        try:
            outcome = workflow.run(
                job.request,
                self.store,
                self.builder,
                mode=self.config.mode,
                tmp_dir=self.config.tmp_dir,
                tracker=_JobTracker(job, self.clock, self.metrics, self.jobs),
            )
        except BaseException as exc:
            # The failed build's frames hold its buffers and index: free them with
            # the reservation, not after (the traceback keeps its lines).
            traceback.clear_frames(exc.__traceback__)
            outcome = exc
        finally:
            # Released before the outcome is recorded: whoever sees the job
            # finished also sees its memory free for the next one.
            job.released()
            self._unstick(key)
            self.budget.release(need)
        if isinstance(outcome, BaseException):
            self.record(job, outcome)
            if not isinstance(outcome, Exception):
                raise outcome
            return
        finished = self._finish(
            job,
            JobState.COMPLETED,
            file_name=outcome.file_name,
            index_bytes=outcome.index_bytes,
            quality=None if outcome.quality is None else outcome.quality.as_dict(),
        )
        if finished and outcome.quality is not None and self.metrics is not None:
            data_type = job.request.data_type.value
            self.metrics.index_recall.labels(data_type).observe(outcome.quality.recall)
        if finished:
            log.info(
                "job %s completed: %s (%d bytes in %.2fs on %s)",
                job.id,
                outcome.file_name,
                outcome.index_bytes,
                outcome.seconds,
                outcome.builder,
                extra={"duration_s": round(outcome.seconds, 6)},
            )

    def _finish(
        self,
        job: Job,
        state: JobState,
        *,
        file_name: str | None = None,
        error: str | None = None,
        index_bytes: int | None = None,
        quality: dict[str, Any] | None = None,
        reason: str = "",
    ) -> bool:
        """``JobStore.finish`` plus the outcome counters; ``reason`` labels failures."""
        recorded = self.jobs.finish(
            job, state, file_name=file_name, error=error, index_bytes=index_bytes, quality=quality
        )
        if not recorded:
            return False
        if self.metrics is not None:
            data_type = job.request.data_type.value
            if state is JobState.COMPLETED:
                self.metrics.jobs_completed.labels(data_type).inc()
            else:
                self.metrics.jobs_failed.labels(data_type, reason).inc()
        return True

    def record(self, job: Job, exc: BaseException) -> None:
        """The one place an exception becomes a job outcome."""
        outcome = classify(exc)
        if self._finish(job, outcome.state, error=outcome.message, reason=outcome.reason):
            # Called after the ``except`` block has ended, so the traceback must be
            # handed over explicitly: ``log.exception`` here would log "NoneType: None".
            log.log(
                logging.ERROR if outcome.unexpected else logging.WARNING,
                "job %s %s: %s",
                job.id,
                outcome.state.value,
                outcome.message,
                exc_info=exc if outcome.unexpected else None,
            )

    def cancel(self, job: Job) -> None:
        """Remove a queued job now; a running one stops at its next batch or stage boundary."""
        job.cancel_requested.set()
        self.budget.wake()
        key = (job.id, job.attempt)
        with self._lock:
            entry = self._futures.get(key)
            never_ran = entry is not None and entry[0] is job and entry[1].cancel()
            if never_ran:
                # It never ran, so ``_run`` will not forget it: do it here.
                del self._futures[key]
        if never_ran:
            self.record(job, errors.CancelledError(CANCELLED_MESSAGE))

    def check_time_limits(self) -> list[Job]:
        """Fail running builds older than the time limit; returns the jobs it failed."""
        limit = self.config.time_limit_s
        if limit is None:
            return []
        now = self.clock()
        overdue = []
        for job in self.jobs.active():
            started = job.snapshot().started_at
            if started is not None and now - started > limit:
                overdue.append(job)
        for job in overdue:
            job.cancel_requested.set()
            message = (
                f"the build exceeded the time limit of {limit:.0f} s "
                "(RVIB_JOB_TIME_LIMIT_SECONDS) and was stopped"
            )
            if self._finish(job, JobState.FAILED, error=message, reason="time_limit"):
                log.error("job %s: %s", job.id, message)
                self._stick((job.id, job.attempt))
        if overdue:
            self._fail_queued_behind_stuck_threads()
        return overdue

    def _stick(self, key: tuple[str, int]) -> None:
        with self._lock:
            need = self._reserved.get(key)
            if need is None or key in self._stuck:
                return
            self._stuck[key] = need
            self.unhealthy.set()
        self.budget.stick(need)  # wakes the jobs waiting for memory: some never fit now

    def _unstick(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._reserved.pop(key, None)
            need = self._stuck.pop(key, None)
            if need is None:
                return
            if not self._stuck:
                self.unhealthy.clear()
        self.budget.unstick(need)
        log.warning("job %s: the build past its time limit has stopped", key[0])

    def _fail_queued_behind_stuck_threads(self) -> None:
        """Jobs queued for a build thread when every thread is stuck: none will start."""
        with self._lock:
            if len(self._stuck) < self.config.max_workers:
                return
            waiting = [(key, job, future) for key, (job, future) in self._futures.items()]
        for key, job, future in waiting:
            if not future.cancel():
                continue  # running (a stuck one) or done
            with self._lock:
                if self._futures.get(key, (None,))[0] is job:
                    del self._futures[key]
            if not self.jobs.hand_back(job):  # a fleet's other replicas can take it
                self.record(job, ServiceUnavailableError(STUCK_MESSAGE))

    def _watch(self) -> None:
        while not self._stopping.wait(self.config.watchdog_interval_s):
            self.check_time_limits()

    def busy(self) -> int:
        with self._lock:
            return len(self._futures)

    def state(self) -> RunnerState:
        host_limit, host_reserved, gpu_limit, gpu_reserved = self.budget.usage()
        states = [job.current_state() for job in self.jobs.active()]
        queued = sum(1 for state in states if state is JobState.QUEUED)
        running = sum(1 for state in states if state is not JobState.QUEUED and not state.terminal)
        with self._lock:
            accepting, busy = self.accepting, len(self._futures)
        return RunnerState(
            accepting=accepting,
            unhealthy=self.unhealthy.is_set(),
            device=self.builder.name,
            workers=self.config.max_workers,
            busy=busy,
            queued=queued,
            running=running,
            host_limit=host_limit,
            host_reserved=host_reserved,
            gpu_limit=gpu_limit,
            gpu_reserved=gpu_reserved,
            refusing=self._refusing,
        )

    def shutdown(self, grace_seconds: float) -> None:
        """Stop accepting, let running builds finish within the grace period.

        What is still running then is handed back to the fleet where there is one
        (another replica takes it), and failed otherwise.
        """
        self._stopping.set()
        with self._lock:
            self.accepting = False
            futures = list(self._futures.values())
        for job, future in futures:
            if future.cancel() and not self.jobs.hand_back(job):  # queued, never started
                self._finish(job, JobState.FAILED, error=SHUTDOWN_MESSAGE, reason="shutdown")
        deadline = time.monotonic() + grace_seconds
        for _, future in futures:
            if future.cancelled():
                continue
            remaining = deadline - time.monotonic()
            try:
                future.result(timeout=max(remaining, 0.0))
            except Exception:
                continue
        for job in self.jobs.active():
            # Still running after the grace period: stop at the next batch, and
            # tell the client now rather than leave it polling a dead service.
            job.cancel_requested.set()
            if self.jobs.hand_back(job):
                log.info("job %s handed back to the fleet at shutdown", job.id)
                continue
            self._finish(job, JobState.FAILED, error=SHUTDOWN_MESSAGE, reason="shutdown")
        self.budget.wake()
        self._pool.shutdown(wait=False, cancel_futures=True)


class LocalJobService:
    """The endpoints' job service in one process: the in-memory store and this runner."""

    def __init__(self, jobs: JobStore, runner: Runner) -> None:
        self.jobs = jobs
        self.runner = runner

    def now(self) -> float:
        return self.jobs.clock()

    async def submit(self, request: BuildRequest) -> str:
        job, created = self.jobs.add_if_absent(request)
        if created:
            try:
                self.runner.submit(job)
            except RvibError:
                self.jobs.remove(job)
                raise
        return job.id

    async def status(self, job_id: str) -> dict[str, Any]:
        return self.jobs.get(job_id).status_body()

    async def snapshot(self, job_id: str) -> JobSnapshot:
        return self.jobs.get(job_id).snapshot()

    async def snapshots(self) -> list[JobSnapshot]:
        # Grows with the store: off the event loop.
        return await anyio.to_thread.run_sync(lambda: [job.snapshot() for job in self.jobs.jobs()])

    async def cancel(self, job_id: str) -> JobSnapshot:
        job = self.jobs.get(job_id)
        state = job.current_state()
        if state.terminal:
            raise JobConflictError(
                f"job {job_id} already ended ({state.value}); there is nothing to cancel"
            )
        self.runner.cancel(job)
        return job.snapshot()
