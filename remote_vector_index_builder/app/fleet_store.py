"""Fleet mode's Redis job store: keys, connection, every script call, and the status cache.

Imported only when ``RVIB_REDIS_URL`` is set, so one process never imports
``redis``. Every lifecycle change is one script in ``fleet_scripts``; this
module calls them, each through ``Health.guard`` (``fleet_health``), the one
place Redis being unable to serve becomes ``JobStoreUnavailableError``. It also
holds the bounded cache of last-known ``/_status`` bodies answered while Redis
is not reachable, and reads a job's hash back as a ``JobSnapshot``.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from cachetools import LRUCache
from pydantic import ValidationError

from remote_vector_index_builder.app import fleet_scripts as scripts
from remote_vector_index_builder.app.fleet_health import Health
from remote_vector_index_builder.app.jobs import CANCELLED_MESSAGE, JobSnapshot, JobState, Outcome
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.errors import UnreadableRequestError
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
# Last-known /_status bodies answered while Redis is unreachable.
STATUS_CACHE_SIZE = 10_000
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
    def from_settings(cls, settings: Settings, url: str) -> FleetConfig:
        """``url``: ``RVIB_REDIS_URL``'s secret (settings checked the heartbeat and lease)."""
        return cls(
            url=url,
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
        self._reject = client.register_script(scripts.REJECT)
        self._prune = client.register_script(scripts.PRUNE)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        with self.health.guard(what):
            return fn()

    @property
    def client(self) -> Any:
        return self._r

    def queue_head(self, count: int) -> list[str]:
        return list(self.call("queue", lambda: self._r.zrange(QUEUE, 0, count - 1)))

    def queued_request(self, job_id: str) -> BuildRequest | None:
        """The job's stored request (``read_request``); None if the job is gone."""
        value = self.call("read job", lambda: self._r.hget(job_key(job_id), "req"))
        return None if value is None else read_request(str(value))

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
        self, job_id: str, attempt: int, outcome: Outcome, *, device: str | None, progress: str
    ) -> bool:
        """Record ``outcome`` if this replica still owns ``attempt``; False if fenced."""
        keys = [job_key(job_id), LEASES, AUDIT]
        args: list[Arg] = [
            job_id,
            self.config.replica_id,
            attempt,
            outcome.state.value,
            outcome.file_name or "",
            outcome.error or "",
            self.config.ttl_ms,
            device or "",
            "" if outcome.index_bytes is None else outcome.index_bytes,
            "" if outcome.quality is None else json.dumps(outcome.quality),
            progress,
        ]
        return int(self.call("complete", lambda: self._complete(keys=keys, args=args))) == 1

    def reject(self, job_id: str, error: str) -> bool:
        """Fail a queued job that no replica can take; False if it was no longer queued."""
        keys = [job_key(job_id), QUEUE, AUDIT]
        args: list[Arg] = [job_id, error, self.config.ttl_ms]
        return int(self.call("reject", lambda: self._reject(keys=keys, args=args))) == 1

    def release(self, job_id: str, attempt: int) -> bool:
        keys = [job_key(job_id), QUEUE, LEASES, AUDIT]
        args: list[Arg] = [job_id, self.config.replica_id, attempt, CHANNEL]
        return int(self.call("release", lambda: self._release(keys=keys, args=args))) == 1

    def expired(self, count: int) -> list[str]:
        return list(self.call("leases", lambda: self._expired(keys=[LEASES], args=[count])))

    def prune(self, start: int, count: int) -> tuple[int, int]:
        """Drop expired ids among ``{rvib}:jobs``'s ``count`` from rank ``start``:
        ``(ids looked at, ids dropped)``."""
        ids = [
            str(i)
            for i in self.call("jobs", lambda: self._r.zrange(JOBS, start, start + count - 1))
        ]
        if not ids:
            return 0, 0
        keys = [JOBS, *(job_key(job_id) for job_id in ids)]
        args: list[Arg] = list(ids)
        return len(ids), int(self.call("prune", lambda: self._prune(keys=keys, args=args)))

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

    def register(self, description: dict[str, Any]) -> list[str]:
        """Renew this replica's registration; the ids of every replica registered now."""
        ttl_ms = max(int(self.config.heartbeat_s * 3000), 1000)
        keys = [REPLICAS, replica_key(self.config.replica_id)]
        args: list[Arg] = [self.config.replica_id, ttl_ms, json.dumps(description)]
        return [str(r) for r in self.call("register", lambda: self._register(keys=keys, args=args))]

    def deregister(self) -> None:
        """Leave the registry at shutdown (else it counts as alive for three more heartbeats)."""

        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=True)
            pipe.zrem(REPLICAS, self.config.replica_id)
            pipe.delete(replica_key(self.config.replica_id))
            return list(pipe.execute())

        self.call("deregister", run)

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

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._bodies.pop(job_id, None)


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


def read_request(text: str) -> BuildRequest:
    """A stored request; ``UnreadableRequestError`` says why this version cannot parse it
    (deeper than the JSON parser goes, an enum value of a newer version, ...)."""
    try:
        return BuildRequest.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        reason = f"{where}: {first['msg']}" if where else first["msg"]
        raise UnreadableRequestError(
            f"this replica cannot read the stored build request ({reason[:300]}); submit the "
            "build again (after an upgrade, once every replica runs the same version)"
        ) from exc


def _lenient_fields(text: str) -> dict[str, Any]:
    """What can be read of a request ``read_request`` refused, for listings."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def snapshot_from_hash(fields: dict[str, str]) -> JobSnapshot:
    """The same snapshot the in-memory store gives, from a job's hash.

    An unreadable stored request does not make the job unreadable: its snapshot has
    no ``request``, only the fields that could be read (``raw_request``).
    """
    state = JobState(fields["state"])
    try:
        request: BuildRequest | None = read_request(fields["req"])
        raw: dict[str, Any] | None = None
    except UnreadableRequestError:
        request, raw = None, _lenient_fields(fields["req"])
    progress = json.loads(fields["progress"]) if fields.get("progress") else {}
    quality = fields.get("quality")
    index_bytes = fields.get("index_bytes")
    return JobSnapshot(
        id=fields["id"],
        request=request,
        raw_request=raw,
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
