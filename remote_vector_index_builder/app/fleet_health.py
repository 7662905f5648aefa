"""Whether Redis can serve this replica now, and the one translation of "it cannot".

Redis unreachable and Redis refusing a step (full, read-only, a failed save,
...) both mean "not now", never a bug: ``Health.guard`` turns either into
``JobStoreUnavailableError`` (503 with ``Retry-After`` at the endpoints,
retried by the loops) and lets every other error through as the bug it is.
Imported only in fleet mode, like ``redis``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator

import redis.exceptions
from prometheus_client import CollectorRegistry, Counter

from remote_vector_index_builder.core.errors import JobStoreUnavailableError

log = logging.getLogger(__name__)

# Redis answers that mean "not now", not "a bug here": it refuses writes while full
# (maxmemory with noeviction: OOM), after a failed save (MISCONF), without enough
# replicas (NOREPLICAS), as a read-only replica (READONLY), to a user without the rights
# (NOPERM), while it loads its data (LOADING), while a script runs too long (BUSY), and
# as a replica that lost its primary (MASTERDOWN). A script relays the refusal of one of
# its commands inside its own error ("Error running script ...: -OOM ..."), a pipeline
# after "caused error: ", so the code is looked for there too; Redis 6.2 words an ACL
# refusal inside a script without its code ("The user executing the script can't ...").
REFUSALS = ("OOM", "MISCONF", "NOREPLICAS", "NOPERM", "READONLY", "LOADING", "BUSY", "MASTERDOWN")
_REFUSAL = re.compile(rf"(?:^|-|: )({'|'.join(REFUSALS)})\b")
_SCRIPT_ACL = "The user executing the script can't"
_REFUSAL_CLASSES: tuple[tuple[type[redis.exceptions.RedisError], str], ...] = (
    # redis-py strips these codes from the message it keeps.
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
)


def outage(exc: BaseException) -> str | None:
    """Why ``exc`` means Redis cannot serve now: "unreachable" or its refusal code.

    None for anything else: a bug here, which surfaces as one (a 500 with its
    traceback, a logged traceback in a loop), never as an outage.
    """
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return "unreachable"
    for cls, code in _REFUSAL_CLASSES:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, redis.exceptions.ResponseError):
        found = _REFUSAL.search(str(exc))
        if found is not None:
            return found.group(1)
        return "NOPERM" if _SCRIPT_ACL in str(exc) else None
    return None


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
            "Redis commands that failed for want of Redis (unreachable, timed out, or refused: "
            "full, read-only, a failed save)",
            registry=registry,
        )
        self.claimed = Counter(
            "rvib_fleet_jobs_claimed", "Jobs this replica took from the queue", registry=registry
        )


class Health:
    """When this replica last found Redis unable to serve (shared by its threads).

    The one place a Redis outage becomes ``JobStoreUnavailableError`` (``guard``);
    ``retry_after_s`` is the ``Retry-After`` the endpoints answer it with.
    """

    def __init__(self, metrics: FleetMetrics, retry_after_s: int | None = None) -> None:
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._last_error = float("-inf")
        self._down = False

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Translate an outage raised in the block (``outage``); other errors pass through."""
        try:
            yield
        except redis.exceptions.RedisError as exc:
            if outage(exc) is None:
                raise
            raise self.error(what, exc) from exc
        self.ok()

    def error(self, what: str, exc: Exception) -> JobStoreUnavailableError:
        reason = outage(exc) or "unreachable"
        with self._lock:
            self._last_error = time.monotonic()
            first = not self._down
            self._down = True
        self.metrics.redis_errors.inc()
        if first:
            log.warning("the job store (Redis) cannot serve (%s, %s): %s", what, reason, exc)
        if reason == "unreachable":
            message = f"the job store (Redis) is unreachable ({type(exc).__name__}); retry later"
        else:
            # Redis's own words say what to fix ("used memory > 'maxmemory'", a failed save).
            detail = str(exc).rpartition(reason)[2].strip(" .:")[:200]
            message = f"the job store (Redis) refuses writes now ({reason} {detail}); retry later"
        return JobStoreUnavailableError(message, self.retry_after_s)

    def ok(self) -> None:
        with self._lock:
            if self._down:
                log.info("the job store (Redis) is reachable again")
            self._down = False

    def reachable(self) -> bool:
        """False from a failed command until the next one that succeeds."""
        with self._lock:
            return not self._down

    def seconds_since_error(self) -> float:
        with self._lock:
            return time.monotonic() - self._last_error
