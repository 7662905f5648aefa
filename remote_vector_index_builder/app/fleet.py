"""Fleet mode (``RVIB_REDIS_URL`` set): one replica's loops that share jobs through Redis.

Imported only in that mode, so one process never imports ``redis``. Intake and
placement are separate: any replica accepts a POST (``fleet_service``), and
each replica *pulls* the oldest queued job its own memory admission can hold
now (``admission.Placement``: first fit over the queue head, with a starvation guard,
the same rule one process follows).
The owner renews its leases on Redis's clock every heartbeat
(``fleet_leases``); any replica re-queues a job whose lease expired (the
reaper), and the attempt number fences an old owner that comes back.

Redis unreachable: POST answers 503 with ``Retry-After``; ``/_status``
answers from a bounded cache of last-known bodies, else 503, never 404;
running builds go on and record their outcome once Redis is back; ``/_ready``
does not depend on Redis (an outage must not empty the load balancer).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.backoff import NoBackoff

from remote_vector_index_builder.app.admission import Admission, Placement
from remote_vector_index_builder.app.fleet_health import FleetMetrics, Health
from remote_vector_index_builder.app.fleet_leases import Leases
from remote_vector_index_builder.app.fleet_service import FleetJobService
from remote_vector_index_builder.app.fleet_store import (
    CHANNEL,
    FleetConfig,
    FleetStore,
    StatusCache,
    client_options,
    progress_json,
)
from remote_vector_index_builder.app.jobs import Clock, Job, JobState
from remote_vector_index_builder.app.metrics import Metrics
from remote_vector_index_builder.app.runner import Runner
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.errors import (
    JobStoreUnavailableError,
    ServiceUnavailableError,
)

log = logging.getLogger(__name__)

# How often a replica looks at the queue without a wake-up, and for expired leases.
CLAIM_POLL_S = 0.5
# Ids of {rvib}:jobs the reaper looks at per pass (every CLAIM_POLL_S) for expired hashes:
# each replica sweeps about 500 ids a second, so the set holds the live jobs and at most
# a few seconds' worth of expired ones.
PRUNE_SCAN = 256


class Fleet:
    """Everything fleet mode adds to one replica; built and closed by the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        admission: Admission,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.config = FleetConfig.from_settings(settings, redis_url)
        options = client_options(self.config)
        sync_client = redis.Redis.from_url(
            self.config.url, retry=redis.retry.Retry(NoBackoff(), 0), **options
        )
        async_client = redis.asyncio.Redis.from_url(
            self.config.url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **options
        )
        self.metrics = FleetMetrics(metrics.registry)
        self.health = Health(self.metrics, self.config.retry_after_s)
        self.store = FleetStore(sync_client, self.config, self.health)
        self.cache = StatusCache()
        self.wake = threading.Event()
        self.admission = admission
        self.leases = Leases(self.store, self.cache, self.metrics, clock, self.wake.set)
        self.ledger = self.leases
        self.service = FleetJobService(
            async_client, self.config, self.cache, self.health, clock, admission, metrics
        )
        self.placement = Placement(self.store, admission, allowed_buckets=settings.allowed_buckets)
        self.clock = clock
        metrics.registry.register(_FleetCollector(self.store))
        self._claiming = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._runner: Runner | None = None
        self._lock = threading.Lock()
        self._alive: list[str] = []  # the replica registry at the last heartbeat
        self._prune_at = 0  # where the reaper's sweep of {rvib}:jobs goes on (a rank)

    def start(self, runner: Runner) -> None:
        self._runner = runner
        self._claiming.set()
        # The first heartbeat before the app serves: the replica is in the registry (and
        # /_heart_beat lists it) before its first claim, not one heartbeat later.
        self._beat()
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

    def slot_free(self) -> None:
        """A build thread is free (or a build got stuck): the claim loop looks again."""
        self.wake.set()

    def stop(self) -> None:
        """Claim nothing more: the runner's shutdown follows."""
        self._claiming.clear()
        self.wake.set()

    async def close(self) -> None:
        self.leases.closing.set()
        self._closed.set()
        self.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        with contextlib.suppress(JobStoreUnavailableError):  # else it expires on its own
            self.store.deregister()
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
        # Finished jobs' hashes expire on their own; their ids in {rvib}:jobs do not.
        scanned, removed = self.store.prune(self._prune_at, PRUNE_SCAN)
        self._prune_at = 0 if scanned < PRUNE_SCAN else self._prune_at + scanned - removed
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
        # Not ready (shutting down, a build past its time limit still runs, no S3
        # credentials): no new work; other replicas take it.
        if self.admission.refusal() is not None or runner.free_threads() <= 0:
            return False
        claimed = self.placement.take()
        if claimed is None:
            return False
        job = Job(
            id=claimed.job_id,
            request=claimed.request,
            submitted_at=self.clock(),
            attempt=claimed.attempt,
        )
        self.leases.own(job)
        try:
            runner.submit(job, claimed.need)
        except BaseException as exc:
            # Never queued here: its memory goes back, the job to the fleet.
            self.admission.release(claimed.need)
            self.leases.hand_back(job)
            if isinstance(exc, ServiceUnavailableError):
                return False  # shutting down
            raise
        self.metrics.claimed.inc()
        log.info("job %s attempt %d claimed by %s", job.id, claimed.attempt, self.config.replica_id)
        return True

    # -- leases: renew what this replica owns ----------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self.config.heartbeat_s):
            self._beat()

    def _beat(self) -> None:
        try:
            self.heartbeat()
        except JobStoreUnavailableError:
            pass  # logged once per outage by Health
        except Exception:
            log.exception("fleet heartbeat failed; retrying")

    def heartbeat(self) -> None:
        owned = [entry for entry in self.leases.owned() if not entry.lost]
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
                    self.leases.renewed(entry, cancel)
                else:
                    self.leases.lose(entry)
        runner = self._runner
        if runner is not None:
            now = runner.state()
            alive = self.store.register(
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
            with self._lock:
                self._alive = sorted(alive)

    def summary(self) -> dict[str, Any]:
        """What fleet mode adds to ``/_heart_beat``: its ``fleet`` block, read from memory,
        so it answers with Redis down.

        ``replicas_alive`` is the registry as this replica's last successful
        heartbeat read it (empty before the first one).
        """
        with self._lock:
            alive = list(self._alive)
        return {
            "fleet": {
                "replica_id": self.config.replica_id,
                "replicas_alive": alive,
                "redis_reachable": self.health.reachable(),
            }
        }

    # -- wake-ups: cancel and submitted events ---------------------------------------------

    def _listen_loop(self) -> None:
        while not self._closed.is_set():
            try:
                with self.health.guard("events"):
                    for kind, job_id in self._events():
                        if kind == "cancel":
                            self.leases.cancel_local(job_id)
                        elif kind == "submitted":
                            self.wake.set()
            except JobStoreUnavailableError:
                pass  # logged once per outage by Health
            except Exception:
                # A bug must not end the wake-ups for good (cancels would then wait for
                # the next heartbeat, submits for the next poll): log it, listen again.
                log.exception("fleet event listener failed; listening again")
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
