"""The thread pool, memory admission, and the one place that records outcomes.

A job that can never fit in the memory limits is refused at submit (507). A job
that fits but not right now waits in the queue (still ``RUNNING_INDEX_BUILD``
on the wire) until running builds release their reservations.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from remote_vector_index_builder.app.jobs import Clock, Job, JobState, JobStore
from remote_vector_index_builder.app.logs import job_context, set_stage
from remote_vector_index_builder.core import memory, workflow
from remote_vector_index_builder.core.builder import IndexBuilder
from remote_vector_index_builder.core.errors import (
    CancelledError,
    InsufficientMemoryError,
    RvibError,
    ServiceUnavailableError,
)
from remote_vector_index_builder.core.index_io import SerializationMode
from remote_vector_index_builder.core.object_store import ObjectStore
from remote_vector_index_builder.core.params import BuildRequest

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "cancelled by operator"
SHUTDOWN_MESSAGE = "the build service shut down before this build finished; submit the build again"
_STAGE_STATES = {
    workflow.Stage.DOWNLOAD: JobState.DOWNLOADING,
    workflow.Stage.PARSE: JobState.PARSING,
    workflow.Stage.BUILD: JobState.BUILDING,
    workflow.Stage.SERIALIZE: JobState.SERIALIZING,
    workflow.Stage.UPLOAD: JobState.UPLOADING,
}


class MemoryBudget:
    """Reservations of host and GPU bytes against fixed limits, FIFO-fair enough."""

    def __init__(self, host_limit: int, gpu_limit: int) -> None:
        self.host_limit = host_limit
        self.gpu_limit = gpu_limit
        self.host_reserved = 0
        self.gpu_reserved = 0
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
        """Wait until ``need`` fits; False if cancelled while waiting."""
        with self._cond:
            while not cancelled.is_set():
                if (
                    self.host_reserved + need.host_bytes <= self.host_limit
                    and self.gpu_reserved + need.gpu_bytes <= self.gpu_limit
                ):
                    self.host_reserved += need.host_bytes
                    self.gpu_reserved += need.gpu_bytes
                    return True
                self._cond.wait(timeout=0.5)
            return False

    def release(self, need: memory.MemoryEstimate) -> None:
        with self._cond:
            self.host_reserved -= need.host_bytes
            self.gpu_reserved -= need.gpu_bytes
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _JobTracker(workflow.Tracker):
    def __init__(self, job: Job, clock: Clock) -> None:
        self.job = job
        self.clock = clock
        self._lock = threading.Lock()

    def stage(self, stage: workflow.Stage, total: int) -> None:
        self._check()
        now = self.clock()
        with self._lock:
            self.job.state = _STAGE_STATES[stage]
            self.job.stage_total = total
            self.job.stage_done = 0
            self.job.stage_started_at = now
            self.job.stage_times[stage.value] = now
        set_stage(stage.value)
        log.info("job %s: %s", self.job.id, stage.value)

    def advance(self, amount: int) -> None:
        self._check()
        with self._lock:
            self.job.stage_done += amount

    def _check(self) -> None:
        if self.job.cancel_requested.is_set():
            raise CancelledError(CANCELLED_MESSAGE)


@dataclass(frozen=True)
class RunnerConfig:
    max_workers: int
    mode: SerializationMode
    tmp_dir: str | None
    upload_buffer_bytes: int
    add_batch_rows: int
    on_gpu: bool
    time_limit_s: float | None = None
    # How often the watchdog looks for builds over the time limit (wall time).
    watchdog_interval_s: float = 1.0


class Runner:
    def __init__(
        self,
        config: RunnerConfig,
        jobs: JobStore,
        store: ObjectStore,
        builder: IndexBuilder,
        budget: MemoryBudget,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self.jobs = jobs
        self.store = store
        self.builder = builder
        self.budget = budget
        self.clock = clock
        self.accepting = True
        self._pool = ThreadPoolExecutor(config.max_workers, thread_name_prefix="build")
        self._futures: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        # Set when a build overran its time limit: its thread cannot be killed,
        # so the service reports itself unready for an orchestrator to restart it.
        self.unhealthy = threading.Event()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        if config.time_limit_s is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name="build-watchdog", daemon=True
            )
            self._watchdog.start()

    def estimate(self, request: BuildRequest) -> memory.MemoryEstimate:
        return memory.estimate(
            request,
            upload_buffer_bytes=self.config.upload_buffer_bytes,
            add_batch_rows=self.config.add_batch_rows,
            gpu=self.config.on_gpu,
        )

    def admit(self, request: BuildRequest) -> memory.MemoryEstimate:
        """Refuse what can never run; called before a job is created."""
        if not self.accepting:
            raise ServiceUnavailableError("the build service is shutting down; retry elsewhere")
        need = self.estimate(request)
        self.budget.check_fits(need)
        return need

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self.accepting:
                raise ServiceUnavailableError("the build service is shutting down; retry elsewhere")
            self._futures[job.id] = self._pool.submit(self._run, job)

    def _run(self, job: Job) -> None:
        with job_context(job.id):
            try:
                self._run_admitted(job)
            finally:
                with self._lock:
                    self._futures.pop(job.id, None)
                set_stage(None)

    def _run_admitted(self, job: Job) -> None:
        need = self.estimate(job.request)
        if not self.budget.acquire(need, job.cancel_requested):
            self.record(job, CancelledError(CANCELLED_MESSAGE))
            return
        job.reserved_bytes = need.host_bytes
        job.started_at = self.clock()
        job.device = self.builder.name
        try:
            result = workflow.run(
                job.request,
                self.store,
                self.builder,
                mode=self.config.mode,
                tmp_dir=self.config.tmp_dir,
                tracker=_JobTracker(job, self.clock),
            )
        except BaseException as exc:
            self.record(job, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if self.jobs.finish(job, JobState.COMPLETED, file_name=result.file_name):
                log.info(
                    "job %s completed: %s (%d bytes in %.2fs on %s)",
                    job.id,
                    result.file_name,
                    result.index_bytes,
                    result.seconds,
                    result.builder,
                )
        finally:
            job.reserved_bytes = 0
            self.budget.release(need)

    def record(self, job: Job, exc: BaseException) -> None:
        """The one place an exception becomes a job outcome."""
        if isinstance(exc, CancelledError):
            state, message = JobState.CANCELLED, str(exc) or CANCELLED_MESSAGE
        elif isinstance(exc, RvibError):
            state, message = JobState.FAILED, str(exc)
        elif isinstance(exc, MemoryError):
            state, message = JobState.FAILED, (
                "the build ran out of host memory; lower MAX_WORKERS or CPU_MEMORY_LIMIT"
            )
        else:
            state, message = JobState.FAILED, f"unexpected error ({type(exc).__name__}): {exc}"
        if self.jobs.finish(job, state, error=message):
            log_method = (
                log.exception
                if state is JobState.FAILED and not isinstance(exc, RvibError)
                else log.warning
            )
            log_method("job %s %s: %s", job.id, state.value, message)

    def cancel(self, job: Job) -> None:
        job.cancel_requested.set()
        self.budget.wake()
        with self._lock:
            future = self._futures.get(job.id)
        if future is not None and future.cancel():
            self.record(job, CancelledError(CANCELLED_MESSAGE))

    def check_time_limits(self) -> list[Job]:
        """Fail running builds older than the time limit; returns the jobs it failed."""
        limit = self.config.time_limit_s
        if limit is None:
            return []
        now = self.clock()
        overdue = [
            job
            for job in self.jobs.active()
            if job.started_at is not None and now - job.started_at > limit
        ]
        for job in overdue:
            job.cancel_requested.set()
            message = (
                f"the build exceeded the time limit of {limit:.0f} s "
                "(RVIB_JOB_TIME_LIMIT_SECONDS) and was stopped"
            )
            if self.jobs.finish(job, JobState.FAILED, error=message):
                log.error("job %s: %s", job.id, message)
                self.unhealthy.set()
        return overdue

    def _watch(self) -> None:
        while not self._stopping.wait(self.config.watchdog_interval_s):
            self.check_time_limits()

    def busy(self) -> int:
        with self._lock:
            return len(self._futures)

    def shutdown(self, grace_seconds: float) -> None:
        """Stop accepting, let running builds finish within the grace period, fail the rest."""
        self._stopping.set()
        with self._lock:
            self.accepting = False
            futures = dict(self._futures)
        waiting = [jid for jid, f in futures.items() if f.cancel()]
        for job_id in waiting:
            self._fail_for_shutdown(job_id)
        deadline = time.monotonic() + grace_seconds
        for future in futures.values():
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
            self.jobs.finish(job, JobState.FAILED, error=SHUTDOWN_MESSAGE)
        self.budget.wake()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fail_for_shutdown(self, job_id: str) -> None:
        for job in self.jobs.active():
            if job.id == job_id:
                self.jobs.finish(job, JobState.FAILED, error=SHUTDOWN_MESSAGE)
