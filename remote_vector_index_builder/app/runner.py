"""The build threads, and the one place that records outcomes.

The runner builds the jobs placement gives it (``admission.Placement``: their memory is
reserved already, and a thread is free), checks time limits, and turns every exception
into a job outcome (``record``). It never waits for memory: a job that fits but not right
now waits in its backend's queue (still ``RUNNING_INDEX_BUILD`` on the wire).
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

from remote_vector_index_builder.app.admission import (
    SHUTTING_DOWN_MESSAGE,
    TIME_LIMIT_UNREADY,
    Admission,
)
from remote_vector_index_builder.app.jobs import (
    CANCELLED_MESSAGE,
    Clock,
    Job,
    JobLedger,
    JobState,
    Outcome,
)
from remote_vector_index_builder.app.logs import job_context, set_stage
from remote_vector_index_builder.app.metrics import Metrics
from remote_vector_index_builder.core import errors, memory, workflow
from remote_vector_index_builder.core.errors import RvibError, ServiceUnavailableError
from remote_vector_index_builder.core.index_builder import IndexBuilder, set_build_threads
from remote_vector_index_builder.core.object_store import ObjectStore
from remote_vector_index_builder.core.options import SerializationMode

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the build service shut down before this build finished; submit the build again"


@dataclass(frozen=True)
class Failure:
    """What an exception means for its job: the one classification of failures."""

    outcome: Outcome
    # The ``reason`` label of ``rvib_jobs_failed``: the error class an operator can look up.
    reason: str
    # Not raised on purpose: a bug or a foreign error, logged with its traceback.
    unexpected: bool


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, errors.CancelledError):
        cancelled = Outcome(JobState.CANCELLED, str(exc) or CANCELLED_MESSAGE)
        return Failure(cancelled, "cancelled", False)
    if isinstance(exc, RvibError):
        return Failure(Outcome(JobState.FAILED, str(exc)), type(exc).__name__, False)
    if isinstance(exc, MemoryError):
        message = "the build ran out of host memory; lower MAX_WORKERS or CPU_MEMORY_LIMIT"
        return Failure(Outcome(JobState.FAILED, message), type(exc).__name__, False)
    message = f"unexpected error ({type(exc).__name__}): {exc}"
    return Failure(Outcome(JobState.FAILED, message), "unexpected", True)


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


class _JobTracker(workflow.Tracker):
    def __init__(
        self,
        job: Job,
        clock: Clock,
        metrics: Metrics | None = None,
        ledger: JobLedger | None = None,
    ) -> None:
        self.job = job
        self.clock = clock
        self.metrics = metrics
        self.ledger = ledger
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
        if self.ledger is not None:
            self.ledger.commit_check(self.job)
        if self.job.cancel_requested.is_set():
            raise errors.CancelledError(CANCELLED_MESSAGE)

    def _check(self) -> None:
        if self.ledger is not None:
            self.ledger.checkpoint(self.job)
        if self.job.cancel_requested.is_set():
            raise errors.CancelledError(CANCELLED_MESSAGE)


@dataclass(frozen=True)
class RunnerConfig:
    max_workers: int
    mode: SerializationMode
    tmp_dir: str | None
    # What admission estimates builds with; /_heart_beat's largest segment reads it too.
    estimate: memory.EstimateOptions
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
        ledger: JobLedger,
        store: ObjectStore,
        builder: IndexBuilder,
        admission: Admission,
        clock: Clock = time.time,
        metrics: Metrics | None = None,
        on_slot_free: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # Called when a build thread is free again, or a build got stuck past its time
        # limit: the backend's placement looks at its queue again.
        self.on_slot_free = on_slot_free
        self.ledger = ledger
        self.store = store
        self.builder = builder
        self.admission = admission
        self.clock = clock
        self.metrics = metrics
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
        # Every build's reservation, by (id, attempt); ``_stuck``: those of builds that
        # overran their time limit. Their threads cannot be killed, so the service takes no
        # builds (admission) and reports itself unready for an orchestrator to restart it.
        self._reserved: dict[tuple[str, int], memory.MemoryEstimate] = {}
        self._stuck: dict[tuple[str, int], memory.MemoryEstimate] = {}
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        if config.time_limit_s is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name="build-watchdog", daemon=True
            )
            self._watchdog.start()

    def free_threads(self) -> int:
        """Build threads free for another build now (none while shutting down)."""
        if self.admission.closed:
            return 0
        with self._lock:
            return self.config.max_workers - len(self._futures)

    def threads_stuck(self) -> bool:
        """Every build thread holds a build past its time limit: nothing queued will start."""
        with self._lock:
            return len(self._stuck) >= self.config.max_workers

    def submit(self, job: Job, need: memory.MemoryEstimate) -> None:
        """Build ``job`` on a build thread; its memory (``need``) is reserved already."""
        key = (job.id, job.attempt)
        with self._lock:
            if self.admission.closed:
                raise ServiceUnavailableError(SHUTTING_DOWN_MESSAGE)
            if key in self._futures:  # one process, the same attempt number after eviction
                raise ServiceUnavailableError(
                    f"an earlier build of job {job.id} is still stopping; retry shortly"
                )
            self._futures[key] = (job, self._pool.submit(self._run, job, need))
            self._reserved[key] = need

    def _run(self, job: Job, need: memory.MemoryEstimate) -> None:
        with job_context(job.id):
            # Each build thread's span with the attempt that fences it: the chaos run
            # (benchmarks/chaos_checks.py) finds overlapping builds of one job from these.
            log.info("job %s attempt %d: build thread started", job.id, job.attempt)
            try:
                self._build(job, need)
            finally:
                with self._lock:
                    entry = self._futures.get((job.id, job.attempt))
                    if entry is not None and entry[0] is job:
                        del self._futures[(job.id, job.attempt)]
                log.info("job %s attempt %d: build thread ended", job.id, job.attempt)
                set_stage(None)
                if self.on_slot_free is not None:
                    self.on_slot_free()

    def _build(self, job: Job, need: memory.MemoryEstimate) -> None:
        key = (job.id, job.attempt)
        job.begin(self.clock(), self.builder.name, need.host_bytes)
        result: workflow.BuildResult | BaseException
        try:
            result = workflow.run(
                job.request,
                self.store,
                self.builder,
                mode=self.config.mode,
                tmp_dir=self.config.tmp_dir,
                tracker=_JobTracker(job, self.clock, self.metrics, self.ledger),
            )
        except BaseException as exc:
            # The failed build's frames hold its buffers and index: free them with
            # the reservation, not after (the traceback keeps its lines).
            traceback.clear_frames(exc.__traceback__)
            result = exc
        finally:
            # Released before the outcome is recorded: whoever sees the job
            # finished also sees its memory free for the next one.
            job.released()
            self._release(key)
        if isinstance(result, BaseException):
            self.record(job, result)
            if not isinstance(result, Exception):
                raise result
            return
        quality = None if result.quality is None else result.quality.as_dict()
        completed = Outcome(
            JobState.COMPLETED,
            file_name=result.file_name,
            index_bytes=result.index_bytes,
            quality=quality,
            device=result.builder,
        )
        if not self._finish(job, completed):
            return
        if result.quality is not None and self.metrics is not None:
            data_type = job.request.data_type.value
            self.metrics.index_recall.labels(data_type).observe(result.quality.recall)
        log.info(
            "job %s completed: %s (%d bytes in %.2fs on %s)",
            job.id,
            result.file_name,
            result.index_bytes,
            result.seconds,
            result.builder,
            extra={"duration_s": round(result.seconds, 6)},
        )

    def _finish(self, job: Job, outcome: Outcome, reason: str = "") -> bool:
        """``JobLedger.record`` plus the outcome counters; ``reason`` labels failures."""
        if not self.ledger.record(job, outcome):
            return False
        if self.metrics is not None:
            data_type = job.request.data_type.value
            if outcome.state is JobState.COMPLETED:
                self.metrics.jobs_completed.labels(data_type).inc()
            else:
                self.metrics.jobs_failed.labels(data_type, reason).inc()
        return True

    def record(self, job: Job, exc: BaseException) -> None:
        """The one place an exception becomes a job outcome."""
        failure = classify(exc)
        outcome = failure.outcome
        if self._finish(job, outcome, failure.reason):
            # Called after the ``except`` block has ended, so the traceback must be
            # handed over explicitly: ``log.exception`` here would log "NoneType: None".
            log.log(
                logging.ERROR if failure.unexpected else logging.WARNING,
                "job %s %s: %s",
                job.id,
                outcome.state.value,
                outcome.error,
                exc_info=exc if failure.unexpected else None,
            )

    def check_time_limits(self) -> list[Job]:
        """Fail running builds older than the time limit; returns the jobs it failed."""
        limit = self.config.time_limit_s
        if limit is None:
            return []
        now = self.clock()
        overdue = []
        for job in self.ledger.active():
            started = job.snapshot().started_at
            if started is not None and now - started > limit:
                overdue.append(job)
        for job in overdue:
            job.cancel_requested.set()
            message = (
                f"the build exceeded the time limit of {limit:.0f} s "
                "(RVIB_JOB_TIME_LIMIT_SECONDS) and was stopped"
            )
            if self._finish(job, Outcome(JobState.FAILED, message), reason="time_limit"):
                log.error("job %s: %s", job.id, message)
                self._stick((job.id, job.attempt))
        if overdue and self.on_slot_free is not None:
            self.on_slot_free()  # some queued jobs can never start now: placement fails them
        return overdue

    def _stick(self, key: tuple[str, int]) -> None:
        with self._lock:
            need = self._reserved.get(key)
            if need is None or key in self._stuck:
                return
            self._stuck[key] = need
        self.admission.stick(need)

    def _release(self, key: tuple[str, int]) -> None:
        """A build's thread is done with its memory: back to the budget (and unstuck)."""
        with self._lock:
            need = self._reserved.pop(key, None)
            stuck = self._stuck.pop(key, None)
        if stuck is not None:
            self.admission.unstick(stuck)
            log.warning("job %s: the build past its time limit has stopped", key[0])
        if need is not None:
            self.admission.release(need)

    def _watch(self) -> None:
        while not self._stopping.wait(self.config.watchdog_interval_s):
            self.check_time_limits()

    def busy(self) -> int:
        with self._lock:
            return len(self._futures)

    def state(self) -> RunnerState:
        admission = self.admission
        host_limit, host_reserved, gpu_limit, gpu_reserved = admission.usage()
        states = [job.current_state() for job in self.ledger.active()]
        queued = sum(1 for state in states if state is JobState.QUEUED)
        running = sum(1 for state in states if state is not JobState.QUEUED and not state.terminal)
        return RunnerState(
            accepting=not admission.closed,
            unhealthy=admission.unhealthy,
            device=self.builder.name,
            workers=self.config.max_workers,
            busy=self.busy(),
            queued=queued,
            running=running,
            host_limit=host_limit,
            host_reserved=host_reserved,
            gpu_limit=gpu_limit,
            gpu_reserved=gpu_reserved,
            refusing=admission.refusing,
        )

    def shutdown(self, grace_seconds: float) -> None:
        """Stop taking builds, let running ones finish within the grace period.

        What is still active then is handed back to the fleet where there is one
        (another replica takes it), and failed otherwise.
        """
        self._stopping.set()
        self.admission.close()
        with self._lock:
            futures = list(self._futures.items())
        for key, (job, future) in futures:
            if future.cancel():  # never started: its thread was still winding down
                self._release(key)
                if not self.ledger.hand_back(job):
                    shutdown = Outcome(JobState.FAILED, SHUTDOWN_MESSAGE)
                    self._finish(job, shutdown, reason="shutdown")
        deadline = time.monotonic() + grace_seconds
        for _, (_, future) in futures:
            if future.cancelled():
                continue
            remaining = deadline - time.monotonic()
            try:
                future.result(timeout=max(remaining, 0.0))
            except Exception:
                continue
        for job in self.ledger.active():
            # Still queued or running after the grace period: stop at the next batch, and
            # tell the client now rather than leave it polling a dead service.
            job.cancel_requested.set()
            if self.ledger.hand_back(job):
                log.info("job %s handed back to the fleet at shutdown", job.id)
                continue
            self._finish(job, Outcome(JobState.FAILED, SHUTDOWN_MESSAGE), reason="shutdown")
        self._pool.shutdown(wait=False, cancel_futures=True)
