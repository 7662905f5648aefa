"""Fleet mode (``RVIB_REDIS_URL`` set): replicas share every job through Redis.

Imported only in that mode, so one process never imports ``redis``. Intake and
placement are separate: any replica accepts a POST (the ``submit`` script adds
the job if absent), and each replica *pulls* the oldest queued job its own
memory admission can hold now (first fit over the queue head, with a
starvation guard). The owner renews a lease on Redis's clock every heartbeat;
any replica re-queues a job whose lease expired, and the attempt number fences
an old owner that comes back (it stops at its next checkpoint and records
nothing). Every lifecycle change is one script in ``fleet_scripts``.

Redis unreachable: POST answers 503 with ``Retry-After``; ``/_status``
answers from a bounded cache of last-known bodies, else 503, never 404;
running builds go on and record their outcome once Redis is back; ``/_ready``
does not depend on Redis (an outage must not empty the load balancer).

What Redis must be in production: ``maxmemory-policy noeviction`` (an evicted
job hash is a 404, which makes the data node give up and build on its own
CPU), the append-only file on (without it a Redis restart forgets every queued
and running job: 404s again), and a replica with Sentinel or a managed
service (with asynchronous replication a failover can lose the last second of
submits). Redis 6.2 or newer; every key shares the hash tag ``{rvib}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.exceptions
import redis.retry
from cachetools import LRUCache
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.backoff import NoBackoff

from remote_vector_index_builder.app import fleet_scripts as scripts
from remote_vector_index_builder.app.jobs import Clock, Job, JobSnapshot, JobState, status_body
from remote_vector_index_builder.app.runner import CANCELLED_MESSAGE, Runner
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.errors import (
    CancelledError,
    InsufficientMemoryError,
    JobConflictError,
    JobNotFoundError,
    JobStoreUnavailableError,
    ServiceUnavailableError,
    StoreFullError,
)
from remote_vector_index_builder.core.memory import MemoryEstimate
from remote_vector_index_builder.core.params import BuildRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a script takes as an argument.
Arg = str | int | float

PREFIX = "{rvib}"
CHANNEL = f"{PREFIX}:events"
QUEUE = f"{PREFIX}:queue"
LEASES = f"{PREFIX}:leases"
JOBS = f"{PREFIX}:jobs"
REPLICAS = f"{PREFIX}:replicas"
AUDIT = f"{PREFIX}:audit"

INTERRUPTED_MESSAGE = (
    "the build was interrupted %d times (the replica running it was lost or killed); "
    "submit the build again"
)
FENCED_MESSAGE = "another replica took this job over after this replica's lease expired"
# Queue entries a replica considers per pass (first fit in FIFO order).
QUEUE_SCAN = 16
# How often a replica looks at the queue without a wake-up, and for expired leases.
CLAIM_POLL_S = 0.5
# A queued job older than this that could fit here holds this replica's memory for
# itself: smaller jobs behind it wait until it fits (no starvation of large jobs).
STARVATION_S = 30.0
# Last-known /_status bodies answered while Redis is unreachable.
STATUS_CACHE_SIZE = 10_000
# What "Redis is unavailable" looks like (refused, timed out, loading its append-only
# file after a restart, a replica promoted but read-only). Any other Redis error is a
# bug here and surfaces as one (a 500 with its traceback), not as an outage.
UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
)
# Client timeouts: a dead Redis answers 503 within these, never a hung request.
CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 3.0


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def replica_key(replica_id: str) -> str:
    return f"{PREFIX}:replica:{replica_id}"


@dataclass(frozen=True)
class FleetConfig:
    url: str
    replica_id: str
    lease_s: float
    heartbeat_s: float
    max_attempts: int
    retry_after_s: int
    ttl_s: float
    max_active: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FleetConfig:
        assert settings.redis_url is not None
        if settings.heartbeat_seconds >= settings.lease_seconds:
            raise ValueError(
                f"RVIB_HEARTBEAT_SECONDS ({settings.heartbeat_seconds}) must be well below "
                f"RVIB_LEASE_SECONDS ({settings.lease_seconds}), or leases expire between renewals"
            )
        return cls(
            url=settings.redis_url.get_secret_value(),
            replica_id=settings.replica_id,
            lease_s=settings.lease_seconds,
            heartbeat_s=settings.heartbeat_seconds,
            max_attempts=settings.max_attempts,
            retry_after_s=settings.redis_retry_after_seconds,
            ttl_s=settings.request_store_ttl_seconds,
            max_active=settings.request_store_max_size,
        )

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)


class FleetMetrics:
    """This replica's fleet counters, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reclaimed = Counter(
            "rvib_fleet_jobs_reclaimed",
            "Jobs whose lease expired that this replica re-queued (or ended, after the "
            "last attempt or a cancel)",
            registry=registry,
        )
        self.leases_lost = Counter(
            "rvib_fleet_leases_lost",
            "Builds on this replica stopped because another replica took the job over",
            registry=registry,
        )
        self.redis_errors = Counter(
            "rvib_redis_errors",
            "Redis commands that failed (unreachable, timeout)",
            registry=registry,
        )
        self.claimed = Counter(
            "rvib_fleet_jobs_claimed", "Jobs this replica took from the queue", registry=registry
        )


class Health:
    """When this replica last failed to reach Redis (shared by its threads)."""

    def __init__(self, metrics: FleetMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._last_error = float("-inf")
        self._down = False

    def error(self, what: str, exc: Exception) -> JobStoreUnavailableError:
        with self._lock:
            self._last_error = time.monotonic()
            first = not self._down
            self._down = True
        self.metrics.redis_errors.inc()
        if first:
            log.warning("the job store (Redis) is unreachable (%s): %s", what, exc)
        return JobStoreUnavailableError(
            f"the job store (Redis) is unreachable ({type(exc).__name__}); retry later"
        )

    def ok(self) -> None:
        with self._lock:
            if self._down:
                log.info("the job store (Redis) is reachable again")
            self._down = False

    def seconds_since_error(self) -> float:
        with self._lock:
            return time.monotonic() - self._last_error


def client_options(config: FleetConfig) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": COMMAND_TIMEOUT_S,
        "client_name": f"rvib:{config.replica_id}",
    }


class FleetStore:
    """The synchronous side (build, heartbeat and claim threads): every script, translated.

    redis-py types command results as ``Awaitable | Any``; the client is held as
    ``Any`` so each result is checked here instead.
    """

    def __init__(self, client: redis.Redis, config: FleetConfig, health: Health) -> None:
        self.config = config
        self.health = health
        self._r: Any = client
        self._claim = client.register_script(scripts.CLAIM)
        self._renew = client.register_script(scripts.RENEW)
        self._complete = client.register_script(scripts.COMPLETE)
        self._reclaim = client.register_script(scripts.RECLAIM)
        self._release = client.register_script(scripts.RELEASE)
        self._register = client.register_script(scripts.REGISTER)
        self._stats = client.register_script(scripts.STATS)
        self._expired = client.register_script(scripts.EXPIRED)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            result = fn()
        except UNAVAILABLE as exc:
            raise self.health.error(what, exc) from exc
        self.health.ok()
        return result

    @property
    def client(self) -> Any:
        return self._r

    def queue_head(self, count: int) -> list[str]:
        return list(self.call("queue", lambda: self._r.zrange(QUEUE, 0, count - 1)))

    def request_json(self, job_id: str) -> str | None:
        value = self.call("read job", lambda: self._r.hget(job_key(job_id), "req"))
        return None if value is None else str(value)

    def claim(self, job_id: str) -> int:
        keys = [job_key(job_id), QUEUE, LEASES, AUDIT]
        args: list[Arg] = [job_id, self.config.replica_id, self.config.lease_ms]
        return int(self.call("claim", lambda: self._claim(keys=keys, args=args)))

    def renew(self, renewals: list[tuple[str, int, str, str, str]]) -> list[tuple[bool, bool]]:
        """One pipeline for ``(id, attempt, state, progress, device)``: ``(kept, cancel)`` each."""

        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for job_id, attempt, state, progress, device in renewals:
                self._renew(
                    keys=[job_key(job_id), LEASES],
                    args=[
                        job_id,
                        self.config.replica_id,
                        attempt,
                        self.config.lease_ms,
                        state,
                        progress,
                        device,
                    ],
                    client=pipe,
                )
            return list(pipe.execute())

        answers = self.call("renew", run)
        return [(int(kept) == 1, str(cancel) == "1") for kept, cancel in answers]

    def complete(
        self,
        job_id: str,
        attempt: int,
        state: JobState,
        *,
        file_name: str | None,
        error: str | None,
        device: str | None,
        index_bytes: int | None,
        quality: dict[str, Any] | None,
        progress: str,
    ) -> bool:
        keys = [job_key(job_id), LEASES, AUDIT]
        args: list[Arg] = [
            job_id,
            self.config.replica_id,
            attempt,
            state.value,
            file_name or "",
            error or "",
            self.config.ttl_ms,
            device or "",
            "" if index_bytes is None else index_bytes,
            "" if quality is None else json.dumps(quality),
            progress,
        ]
        return int(self.call("complete", lambda: self._complete(keys=keys, args=args))) == 1

    def release(self, job_id: str, attempt: int) -> bool:
        keys = [job_key(job_id), QUEUE, LEASES, AUDIT]
        args: list[Arg] = [job_id, self.config.replica_id, attempt, CHANNEL]
        return int(self.call("release", lambda: self._release(keys=keys, args=args))) == 1

    def expired(self, count: int) -> list[str]:
        return list(self.call("leases", lambda: self._expired(keys=[LEASES], args=[count])))

    def reclaim(self, job_id: str) -> str:
        keys = [job_key(job_id), QUEUE, LEASES, AUDIT]
        args: list[Arg] = [
            job_id,
            self.config.max_attempts,
            self.config.ttl_ms,
            CHANNEL,
            CANCELLED_MESSAGE,
            INTERRUPTED_MESSAGE,
        ]
        return str(self.call("reclaim", lambda: self._reclaim(keys=keys, args=args)))

    def register(self, description: dict[str, Any]) -> None:
        ttl_ms = max(int(self.config.heartbeat_s * 3000), 1000)
        keys = [REPLICAS, replica_key(self.config.replica_id)]
        args: list[Arg] = [self.config.replica_id, ttl_ms, json.dumps(description)]
        self.call("register", lambda: self._register(keys=keys, args=args))

    def stats(self) -> tuple[int, int, int]:
        """``(queued, owned, live replicas)`` across the fleet."""
        queued, owned, replicas, _ = self.call(
            "stats", lambda: self._stats(keys=[QUEUE, LEASES, REPLICAS])
        )
        return int(queued), int(owned), int(replicas)


class StatusCache:
    """Last-known ``/_status`` bodies by job id, bounded (LRU); read when Redis is not."""

    def __init__(self, size: int = STATUS_CACHE_SIZE) -> None:
        self._bodies: LRUCache[str, dict[str, Any]] = LRUCache(size)
        self._lock = threading.Lock()

    def put(self, job_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._bodies[job_id] = body

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._bodies.get(job_id)


def progress_json(snap: JobSnapshot) -> str:
    """What operators see of a running job on every replica (refreshed each heartbeat)."""
    return json.dumps(
        {
            "total": snap.stage_total,
            "done": snap.stage_done,
            "started_at": snap.stage_started_at,
            "times": snap.stage_times,
            "seconds": snap.stage_seconds,
            "reserved": snap.reserved_bytes,
        }
    )


def _ms(value: str | None) -> float | None:
    return int(value) / 1000 if value else None


def snapshot_from_hash(fields: dict[str, str]) -> JobSnapshot:
    """The same snapshot the in-memory store gives, from a job's hash."""
    state = JobState(fields["state"])
    progress = json.loads(fields["progress"]) if fields.get("progress") else {}
    quality = fields.get("quality")
    index_bytes = fields.get("index_bytes")
    return JobSnapshot(
        id=fields["id"],
        request=BuildRequest.model_validate_json(fields["req"]),
        state=state,
        attempt=int(fields.get("attempt") or 0),
        submitted_at=_ms(fields.get("submitted_at")) or 0.0,
        started_at=_ms(fields.get("started_at")),
        finished_at=_ms(fields.get("finished_at")),
        file_name=fields.get("file_name") or None,
        error=fields.get("error") or None,
        device=fields.get("device") or None,
        index_bytes=int(index_bytes) if index_bytes else None,
        reserved_bytes=0 if state.terminal else int(progress.get("reserved", 0)),
        stage_total=int(progress.get("total", 0)),
        stage_done=int(progress.get("done", 0)),
        stage_started_at=progress.get("started_at"),
        stage_times=tuple((str(n), float(t)) for n, t in progress.get("times", [])),
        stage_seconds=tuple((str(n), float(s)) for n, s in progress.get("seconds", [])),
        cancel_requested=fields.get("cancel") == "1",
        quality=json.loads(quality) if quality else None,
        owner=fields.get("owner") or None,
        lease_expires_at=_ms(fields.get("lease_until")),
    )


class FleetJobService:
    """The endpoints' job service in fleet mode: one async round trip per read."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        config: FleetConfig,
        cache: StatusCache,
        health: Health,
        clock: Clock,
    ) -> None:
        self.config = config
        self.cache = cache
        self.health = health
        self.clock = clock
        self._r: Any = client
        self._submit = client.register_script(scripts.SUBMIT)
        self._cancel = client.register_script(scripts.CANCEL)

    def now(self) -> float:
        return self.clock()

    def _unavailable(self, what: str, exc: Exception) -> JobStoreUnavailableError:
        error = self.health.error(what, exc)
        error.retry_after_s = self.config.retry_after_s
        return error

    async def submit(self, request: BuildRequest) -> str:
        job_id = request.job_id
        keys = [job_key(job_id), QUEUE, JOBS, LEASES]
        args: list[Arg] = [
            job_id,
            request.fingerprint,
            request.model_dump_json(),
            self.config.max_active,
            CHANNEL,
        ]
        try:
            outcome, detail = await self._submit(keys=keys, args=args)
        except UNAVAILABLE as exc:
            raise self._unavailable("submit", exc) from exc
        self.health.ok()
        if outcome == "conflict":
            raise JobConflictError(
                f"job {job_id} for {request.vector_path!r} already exists with "
                "different build parameters; wait for it to finish or use a new vector_path"
            )
        if outcome == "full":
            raise StoreFullError(
                f"the job store holds {detail} queued or running jobs, its limit "
                "(REQUEST_STORE_MAX_SIZE); retry later"
            )
        if outcome == "created":
            self.cache.put(job_id, status_body(JobState.QUEUED, None, None))
        return job_id

    async def status(self, job_id: str) -> dict[str, Any]:
        try:
            state, file_name, error = await self._r.hmget(
                job_key(job_id), ["state", "file_name", "error"]
            )
        except UNAVAILABLE as exc:
            cached = self.cache.get(job_id)
            if cached is not None:
                self.health.error("status", exc)
                return cached
            raise self._unavailable("status", exc) from exc
        self.health.ok()
        if state is None:
            raise _not_found(job_id)
        body = status_body(JobState(state), file_name or None, error or None)
        self.cache.put(job_id, body)
        return body

    async def snapshot(self, job_id: str) -> JobSnapshot:
        try:
            fields = await self._r.hgetall(job_key(job_id))
        except UNAVAILABLE as exc:
            raise self._unavailable("read job", exc) from exc
        if not fields:
            raise _not_found(job_id)
        return snapshot_from_hash(fields)

    async def snapshots(self) -> list[JobSnapshot]:
        try:
            ids = await self._r.zrange(JOBS, 0, -1)
            pipe = self._r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(job_key(job_id))
            hashes = await pipe.execute() if ids else []
            gone = [job_id for job_id, fields in zip(ids, hashes, strict=True) if not fields]
            if gone:  # expired finished jobs leave the listing too
                await self._r.zrem(JOBS, *gone)
        except UNAVAILABLE as exc:
            raise self._unavailable("list jobs", exc) from exc
        return [snapshot_from_hash(fields) for fields in hashes if fields]

    async def cancel(self, job_id: str) -> JobSnapshot:
        keys = [job_key(job_id), QUEUE]
        args: list[Arg] = [job_id, self.config.ttl_ms, CANCELLED_MESSAGE, CHANNEL]
        try:
            outcome, state = await self._cancel(keys=keys, args=args)
        except UNAVAILABLE as exc:
            raise self._unavailable("cancel", exc) from exc
        if outcome == "missing":
            raise _not_found(job_id)
        if outcome == "terminal":
            raise JobConflictError(
                f"job {job_id} already ended ({state}); there is nothing to cancel"
            )
        return await self.snapshot(job_id)

    async def close(self) -> None:
        await self._r.aclose()


def _not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError(
        f"no job {job_id!r}: it was never accepted or finished more than "
        "REQUEST_STORE_TTL_SECONDS ago"
    )


@dataclass
class Owned:
    """A job this replica holds the lease of, with the attempt that fences it."""

    job: Job
    attempt: int
    renewed_at: float  # monotonic, of the last renewal Redis accepted
    lost: bool = False


class FleetJobs:
    """The runner's record of outcomes in fleet mode: the jobs this replica owns.

    ``finish`` records through the fenced ``complete`` script and, while Redis is
    unreachable, keeps retrying (the lease is still renewed meanwhile, so no
    other replica takes the job): the index is in S3 already and the client
    keeps seeing RUNNING until the outcome is recorded.
    """

    def __init__(
        self,
        store: FleetStore,
        cache: StatusCache,
        metrics: FleetMetrics,
        clock: Clock,
        on_release: Callable[[], None],
    ) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.on_release = on_release
        self.closing = threading.Event()
        self._owned: dict[str, Owned] = {}
        self._lock = threading.Lock()

    def own(self, job: Job, attempt: int) -> None:
        with self._lock:
            self._owned[job.id] = Owned(job, attempt, time.monotonic())

    def owned(self) -> list[Owned]:
        with self._lock:
            return list(self._owned.values())

    def active(self) -> list[Job]:
        with self._lock:
            return [entry.job for entry in self._owned.values() if not entry.lost]

    def _take(self, job: Job) -> Owned | None:
        with self._lock:
            entry = self._owned.get(job.id)
            if entry is None or entry.job is not job:
                return None
            del self._owned[job.id]
            return entry

    def lose(self, entry: Owned, *, recorded_elsewhere: bool = False) -> None:
        """Another replica owns the job now: stop at the next checkpoint, record nothing.

        A renewal refused because this replica has just recorded the outcome itself
        (a heartbeat racing ``finish``) is no loss: the entry is gone by then.
        """
        with self._lock:
            if not recorded_elsewhere and self._owned.get(entry.job.id) is not entry:
                return
            first = not entry.lost
            entry.lost = True
        entry.job.cancel_requested.set()
        if first:
            self.metrics.leases_lost.inc()
            log.warning(
                "job %s attempt %d fenced: %s; this replica stops it and records nothing",
                entry.job.id,
                entry.attempt,
                FENCED_MESSAGE,
            )

    def renewed(self, entry: Owned, cancel: bool) -> None:
        with self._lock:
            entry.renewed_at = time.monotonic()
        if cancel:
            entry.job.cancel_requested.set()

    def cancel_local(self, job_id: str) -> None:
        with self._lock:
            entry = self._owned.get(job_id)
        if entry is not None:
            entry.job.cancel_requested.set()

    def checkpoint(self, job: Job) -> None:
        """Between batches and parts: a build whose lease may have lapsed asks Redis first.

        A process paused past its lease (SIGSTOP, a VM stall) resumes here before
        its heartbeat thread has noticed; it must not do another batch unfenced.
        """
        with self._lock:
            entry = self._owned.get(job.id)
            stale = entry is not None and (
                time.monotonic() - entry.renewed_at > self.store.config.lease_s / 2
            )
        if entry is not None and stale and not entry.lost:
            snap = job.snapshot()
            try:
                [(kept, cancel)] = self.store.renew(
                    [(job.id, entry.attempt, "", progress_json(snap), snap.device or "")]
                )
            except JobStoreUnavailableError:
                kept, cancel = True, False  # unreachable is not lost: build on
            if kept:
                self.renewed(entry, cancel)
            else:
                self.lose(entry)
        if entry is not None and entry.lost:
            raise CancelledError(FENCED_MESSAGE)

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
        with self._lock:
            entry = self._owned.get(job.id)
            if entry is None or entry.job is not job or entry.lost:
                return False
        if not job.end(
            state, file_name, error, self.clock(), index_bytes=index_bytes, quality=quality
        ):
            return False
        snap = job.snapshot()
        recorded = False
        delay = 0.1
        while True:
            try:
                recorded = self.store.complete(
                    job.id,
                    entry.attempt,
                    state,
                    file_name=file_name,
                    error=error,
                    device=snap.device,
                    index_bytes=snap.index_bytes,
                    quality=snap.quality,
                    progress=progress_json(snap),
                )
                break
            except JobStoreUnavailableError:
                if self.closing.wait(delay):
                    log.error(
                        "job %s: shutting down with Redis unreachable; the outcome (%s) is not "
                        "recorded and the job will run again elsewhere once its lease expires",
                        job.id,
                        state.value,
                    )
                    break
                delay = min(delay * 2, 2.0)
        self._take(job)
        self.on_release()
        if recorded:
            self.cache.put(job.id, snap.status_body())
            return True
        if not self.closing.is_set():
            self.lose(entry, recorded_elsewhere=True)
        return False

    def hand_back(self, job: Job) -> bool:
        """Shutdown: re-queue the job for another replica (not counted as an interruption)."""
        entry = self._take(job)
        if entry is None:
            return True  # nothing left to record here
        entry.lost = True
        try:
            self.store.release(job.id, entry.attempt)
        except JobStoreUnavailableError:
            log.warning("job %s: Redis unreachable; its lease will expire instead", job.id)
        return True


class Fleet:
    """Everything fleet mode adds to one replica; built and closed by the app's lifespan."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, clock: Clock) -> None:
        self.config = FleetConfig.from_settings(settings)
        options = client_options(self.config)
        sync_client = redis.Redis.from_url(
            self.config.url, retry=redis.retry.Retry(NoBackoff(), 0), **options
        )
        async_client = redis.asyncio.Redis.from_url(
            self.config.url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **options
        )
        self.metrics = FleetMetrics(registry)
        self.health = Health(self.metrics)
        self.store = FleetStore(sync_client, self.config, self.health)
        self.cache = StatusCache()
        self.wake = threading.Event()
        self.jobs = FleetJobs(self.store, self.cache, self.metrics, clock, self.wake.set)
        self.service = FleetJobService(async_client, self.config, self.cache, self.health, clock)
        self.clock = clock
        registry.register(_FleetCollector(self.store))
        self._claiming = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._runner: Runner | None = None
        # Per queued id: when this replica first saw it, and its parsed request.
        self._first_seen: dict[str, float] = {}
        self._requests: dict[str, BuildRequest] = {}

    def start(self, runner: Runner) -> None:
        self._runner = runner
        self._claiming.set()
        for name, target in (
            ("fleet-claim", self._claim_loop),
            ("fleet-heartbeat", self._heartbeat_loop),
            ("fleet-events", self._listen_loop),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "fleet mode: replica %s, lease %.1f s, heartbeat %.1f s, max attempts %d",
            self.config.replica_id,
            self.config.lease_s,
            self.config.heartbeat_s,
            self.config.max_attempts,
        )

    def stop_claiming(self) -> None:
        self._claiming.clear()
        self.wake.set()

    async def close(self) -> None:
        self.jobs.closing.set()
        self._closed.set()
        self.stop_claiming()
        for thread in self._threads:
            thread.join(timeout=5)
        await self.service.close()
        self.store.client.close()

    # -- placement: pull the oldest queued job that fits -----------------------------------

    def _claim_loop(self) -> None:
        next_reap = 0.0
        while not self._closed.is_set():
            self.wake.wait(CLAIM_POLL_S)
            self.wake.clear()
            if not self._claiming.is_set():
                continue
            try:
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + CLAIM_POLL_S
                    self._reap()
                while self._claiming.is_set() and self._claim_one():
                    pass
            except JobStoreUnavailableError:
                continue  # logged once per outage by Health
            except Exception:
                log.exception("fleet claim loop failed; retrying")

    def _reap(self) -> None:
        # Just reconnected: give owners one lease to renew before judging their leases.
        if self.health.seconds_since_error() < self.config.lease_s:
            return
        for job_id in self.store.expired(32):
            outcome = self.store.reclaim(job_id)
            if outcome in ("queued", "failed", "cancelled"):
                self.metrics.reclaimed.inc()
                log.warning("job %s: lease expired; reclaimed as %s", job_id, outcome)

    def _claim_one(self) -> bool:
        runner = self._runner
        assert runner is not None
        state = runner.state()
        if not state.accepting or state.busy >= state.workers:
            return False
        ids = self.store.queue_head(QUEUE_SCAN)
        self._forget_except(ids)
        now = time.monotonic()
        for job_id in ids:
            seen = self._first_seen.setdefault(job_id, now)
            request = self._request(job_id)
            if request is None:
                continue
            need = runner.estimate(request)
            try:
                runner.budget.check_fits(need)
            except InsufficientMemoryError:
                continue  # never fits here; a larger replica may take it
            if not runner.budget.try_acquire(need):
                if now - seen >= STARVATION_S:
                    return False  # hold this replica's memory for the oldest job
                continue
            if self._start(runner, job_id, request, need):
                return True
        return False

    def _start(
        self, runner: Runner, job_id: str, request: BuildRequest, need: MemoryEstimate
    ) -> bool:
        try:
            attempt = self.store.claim(job_id)
        except JobStoreUnavailableError:
            runner.budget.release(need)
            raise
        self._first_seen.pop(job_id, None)
        self._requests.pop(job_id, None)
        if attempt == 0:  # another replica was faster
            runner.budget.release(need)
            return False
        job = Job(id=job_id, request=request, submitted_at=self.clock(), attempt=attempt)
        self.jobs.own(job, attempt)
        try:
            runner.submit(job, reserved=need)
        except ServiceUnavailableError:
            runner.budget.release(need)
            self.jobs.hand_back(job)
            return False
        self.metrics.claimed.inc()
        log.info("job %s attempt %d claimed by %s", job_id, attempt, self.config.replica_id)
        return True

    def _request(self, job_id: str) -> BuildRequest | None:
        request = self._requests.get(job_id)
        if request is None:
            text = self.store.request_json(job_id)
            if text is None:
                return None
            request = BuildRequest.model_validate_json(text)
            self._requests[job_id] = request
        return request

    def _forget_except(self, ids: Iterable[str]) -> None:
        keep = set(ids)
        for cache in (self._first_seen, self._requests):
            for job_id in [k for k in cache if k not in keep]:
                del cache[job_id]

    # -- leases: renew what this replica owns ----------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self.config.heartbeat_s):
            try:
                self.heartbeat()
            except JobStoreUnavailableError:
                continue
            except Exception:
                log.exception("fleet heartbeat failed; retrying")

    def heartbeat(self) -> None:
        owned = [entry for entry in self.jobs.owned() if not entry.lost]
        if owned:
            renewals = []
            for entry in owned:
                snap = entry.job.snapshot()
                # Only the build's own stages move the shared state; claim and end are scripts.
                stage = snap.state.value
                if snap.state is JobState.QUEUED or snap.state.terminal:
                    stage = ""
                renewals.append(
                    (
                        entry.job.id,
                        entry.attempt,
                        stage,
                        progress_json(snap),
                        snap.device or "",
                    )
                )
            for entry, (kept, cancel) in zip(owned, self.store.renew(renewals), strict=True):
                if kept:
                    self.jobs.renewed(entry, cancel)
                else:
                    self.jobs.lose(entry)
        runner = self._runner
        if runner is not None:
            now = runner.state()
            self.store.register(
                {
                    "device": now.device,
                    "workers": now.workers,
                    "busy": now.busy,
                    "host_limit_bytes": now.host_limit,
                    "host_reserved_bytes": now.host_reserved,
                    "gpu_limit_bytes": now.gpu_limit,
                    "gpu_reserved_bytes": now.gpu_reserved,
                    "jobs": [entry.job.id for entry in owned],
                }
            )

    # -- wake-ups: cancel and submitted events ---------------------------------------------

    def _listen_loop(self) -> None:
        while not self._closed.is_set():
            try:
                for kind, job_id in self._events():
                    if kind == "cancel":
                        self.jobs.cancel_local(job_id)
                    elif kind == "submitted":
                        self.wake.set()
            except UNAVAILABLE as exc:
                self.health.error("events", exc)
                self._closed.wait(1.0)

    def _events(self) -> Iterator[tuple[str, str]]:
        pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL)
            while not self._closed.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind, _, job_id = str(message["data"]).partition(" ")
                yield kind, job_id
        finally:
            pubsub.close()


class _FleetCollector:
    """Fleet gauges read from Redis at scrape time (absent while it is unreachable)."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        try:
            queued, owned, replicas = self.store.stats()
        except JobStoreUnavailableError:
            return
        yield GaugeMetricFamily("rvib_fleet_jobs_queued", "Jobs queued in the fleet", value=queued)
        yield GaugeMetricFamily(
            "rvib_fleet_jobs_running", "Jobs owned by a replica (leased)", value=owned
        )
        yield GaugeMetricFamily(
            "rvib_fleet_replicas", "Replicas whose registration is live", value=replicas
        )
