"""Admission: whether this replica takes a build, the memory each build reserves, and the
order queued jobs start in. Built once per replica (the app's lifespan) and shared by the
job service (intake: 503, 507), the placement (which queued job starts next) and the
runner (releases, builds stuck past their time limit).

One ordering rule in both modes (``Placement``): first fit over the queue head, oldest
first, with a starvation guard. The queue is the in-memory store in one process
(``local.LocalBackend``) and Redis in a fleet (``fleet_store.FleetStore``); a job that can
never fit here waits for a replica it fits (fleet) or was refused at intake (507).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

from cachetools import LRUCache

from remote_vector_index_builder.core.errors import (
    InsufficientMemoryError,
    ServiceUnavailableError,
    UnreadableRequestError,
)
from remote_vector_index_builder.core.memory import MemoryEstimate
from remote_vector_index_builder.core.params import BuildRequest

log = logging.getLogger(__name__)

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

# Queue entries a replica considers per pass (first fit, oldest first).
QUEUE_SCAN = 16
# A queued job older than this that could fit here holds this replica's memory for
# itself: smaller jobs behind it wait until it fits (no starvation of large jobs).
STARVATION_S = 30.0
# Estimates kept (by job id and request): each job is estimated once per replica, at
# intake or when placement first meets it, whichever comes first.
ESTIMATES = 4096


class Admission:
    """The memory budget (host and GPU bytes against fixed limits), the estimate of each
    job, and the reasons no build is admitted now (shutting down, a build stuck past its
    time limit, no S3 credentials). Every field changes under one lock."""

    def __init__(
        self,
        host_limit: int,
        gpu_limit: int,
        estimate: Callable[[BuildRequest], MemoryEstimate],
    ) -> None:
        self.host_limit = host_limit
        self.gpu_limit = gpu_limit
        self._estimate = estimate
        self._estimates: LRUCache[tuple[str, str], MemoryEstimate] = LRUCache(ESTIMATES)
        self.host_reserved = 0
        self.gpu_reserved = 0
        # Held by builds past their time limit, whose threads cannot be stopped.
        self.host_stuck = 0
        self.gpu_stuck = 0
        self._stuck_builds = 0
        self._closed = False
        self._refusing: str | None = None
        self._lock = threading.Lock()

    def estimate(self, request: BuildRequest) -> MemoryEstimate:
        key = (request.job_id, request.fingerprint)
        with self._lock:
            need = self._estimates.get(key)
        if need is None:
            need = self._estimate(request)
            with self._lock:
                self._estimates[key] = need
        return need

    # -- whether builds are admitted -------------------------------------------------------

    def close(self) -> None:
        """Shutting down: nothing is admitted or placed any more."""
        with self._lock:
            self._closed = True

    def refuse(self, reason: str) -> None:
        """Refuse every build with ``reason`` (503): they cannot succeed (no S3 credentials)."""
        log.error("refusing builds: %s", reason)
        with self._lock:
            self._refusing = reason

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    @property
    def unhealthy(self) -> bool:
        """A build past its time limit still runs: its thread cannot be stopped."""
        with self._lock:
            return self._stuck_builds > 0

    @property
    def refusing(self) -> str | None:
        with self._lock:
            return self._refusing

    def refusal(self) -> str | None:
        """Why no build is admitted now (the 503's message); None when builds are."""
        with self._lock:
            if self._closed:
                return SHUTTING_DOWN_MESSAGE
            if self._stuck_builds:
                # Also keeps a job failed by the time limit from running twice at once.
                return TIME_LIMIT_UNREADY
            return self._refusing

    def admit(self, request: BuildRequest) -> MemoryEstimate:
        """Refuse what can never run (507), or not here now (503); called before a job is
        created. The estimate is kept for placement."""
        reason = self.refusal()
        if reason is not None:
            raise ServiceUnavailableError(reason)
        need = self.estimate(request)
        self.check_fits(need)
        return need

    def check_fits(self, need: MemoryEstimate) -> None:
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

    # -- reservations ----------------------------------------------------------------------

    def reserve(self, need: MemoryEstimate) -> bool:
        """Reserve ``need`` if it fits now beside what is reserved; never waits."""
        with self._lock:
            if (
                self.host_reserved + need.host_bytes <= self.host_limit
                and self.gpu_reserved + need.gpu_bytes <= self.gpu_limit
            ):
                self.host_reserved += need.host_bytes
                self.gpu_reserved += need.gpu_bytes
                return True
            return False

    def release(self, need: MemoryEstimate) -> None:
        with self._lock:
            self.host_reserved -= need.host_bytes
            self.gpu_reserved -= need.gpu_bytes

    def fits_beside_stuck(self, need: MemoryEstimate) -> bool:
        """Whether ``need`` can ever fit while the stuck builds hold their memory."""
        with self._lock:
            return (
                self.host_stuck + need.host_bytes <= self.host_limit
                and self.gpu_stuck + need.gpu_bytes <= self.gpu_limit
            )

    def stick(self, need: MemoryEstimate) -> None:
        """``need``, reserved by a build past its time limit, stays held until its thread ends."""
        with self._lock:
            self.host_stuck += need.host_bytes
            self.gpu_stuck += need.gpu_bytes
            self._stuck_builds += 1

    def unstick(self, need: MemoryEstimate) -> None:
        with self._lock:
            self.host_stuck -= need.host_bytes
            self.gpu_stuck -= need.gpu_bytes
            self._stuck_builds -= 1

    def usage(self) -> tuple[int, int, int, int]:
        """``(host_limit, host_reserved, gpu_limit, gpu_reserved)`` read together."""
        with self._lock:
            return self.host_limit, self.host_reserved, self.gpu_limit, self.gpu_reserved


class Queue(Protocol):
    """Where queued jobs wait, oldest first: the in-memory store or the fleet's Redis."""

    def queue_head(self, count: int) -> list[str]: ...

    def queued_request(self, job_id: str) -> BuildRequest | None:
        """The request of a queued job; None if it left the queue. Raises
        ``UnreadableRequestError`` for a stored request this version cannot parse."""
        ...

    def claim(self, job_id: str) -> int:
        """Take the job for this replica: its new attempt, or 0 if it is no longer queued."""
        ...

    def reject(self, job_id: str, error: str) -> bool:
        """Fail a queued job no replica may take; False if it was no longer queued."""
        ...


@dataclass(frozen=True)
class Claimed:
    """A job this replica has just claimed, with its memory already reserved."""

    job_id: str
    attempt: int
    request: BuildRequest
    need: MemoryEstimate


@dataclass
class Placement:
    """Which queued job this replica takes next, and the claim of it.

    First fit over the queue head, oldest first: the oldest job this replica's memory
    holds *now* (in a fleet, jobs that never fit here are left to larger replicas).
    Starvation guard: once a job that could fit here has waited ``starvation_s`` (since
    this replica first saw it), nothing behind it is taken until it fits, so running
    builds drain and free its memory instead of a stream of small jobs keeping it out
    for ever.

    A queued job no replica may take fails instead of stalling the queue: a stored
    request this version cannot read, a bucket that left ``allowed_buckets``
    (``RVIB_ALLOWED_BUCKETS``, checked at intake too) since it was accepted, or one
    that cannot fit beside what builds stuck past their time limit hold.
    """

    queue: Queue
    admission: Admission
    _: KW_ONLY
    starvation_s: float = STARVATION_S
    monotonic: Callable[[], float] = time.monotonic
    allowed_buckets: frozenset[str] = frozenset()
    # Per queued id: when this replica first saw it, and its parsed request.
    _first_seen: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _requests: dict[str, BuildRequest] = field(default_factory=dict, init=False, repr=False)

    def take(self) -> Claimed | None:
        """Reserve and claim the next job, or None (nothing fits now, or the guard holds)."""
        ids = self.queue.queue_head(QUEUE_SCAN)
        self._forget_except(ids)
        now = self.monotonic()
        admission = self.admission
        for job_id in ids:
            seen = self._first_seen.setdefault(job_id, now)
            request = self._request(job_id)
            if request is None:
                continue
            bucket = request.container_name
            if self.allowed_buckets and bucket not in self.allowed_buckets:
                self._reject(
                    job_id,
                    f"bucket {bucket!r} is no longer in this service's allow-list "
                    "(RVIB_ALLOWED_BUCKETS); add it back, or build this segment elsewhere",
                )
                continue
            need = admission.estimate(request)
            try:
                admission.check_fits(need)
            except InsufficientMemoryError:
                continue  # never fits here; a larger replica may take it
            if not admission.fits_beside_stuck(need):
                self._reject(job_id, STUCK_MESSAGE)
                continue
            if not admission.reserve(need):
                if now - seen >= self.starvation_s:
                    return None  # hold this replica's memory for the job that waited
                continue
            attempt = 0
            try:
                attempt = self.queue.claim(job_id)
            finally:
                # Not claimed (another replica was faster, Redis cannot serve, a bug):
                # the reservation goes back, or this replica never claims again.
                if attempt == 0:
                    admission.release(need)
            self._first_seen.pop(job_id, None)
            self._requests.pop(job_id, None)
            if attempt == 0:
                continue
            return Claimed(job_id, attempt, request, need)
        return None

    def _request(self, job_id: str) -> BuildRequest | None:
        """The queued job's request; None (skip it) if it is gone or cannot be read."""
        request = self._requests.get(job_id)
        if request is None:
            try:
                request = self.queue.queued_request(job_id)
            except UnreadableRequestError as exc:
                # Skipped for ever, it would stall every replica's queue: it fails instead.
                self._reject(job_id, str(exc))
                return None
            if request is None:
                return None
            self._requests[job_id] = request
        return request

    def _reject(self, job_id: str, error: str) -> None:
        if self.queue.reject(job_id, error):
            log.warning("job %s failed before it was claimed: %s", job_id, error)

    def _forget_except(self, ids: Iterable[str]) -> None:
        keep = set(ids)
        for cache in (self._first_seen, self._requests):
            for job_id in [k for k in cache if k not in keep]:
                del cache[job_id]
