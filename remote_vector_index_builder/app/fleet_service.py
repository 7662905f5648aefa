"""The endpoints' job service in fleet mode: submit, read, cancel and forget jobs in Redis.

One async round trip per ``/_status``; Redis unreachable answers the last-known
body from the status cache, else 503 with ``Retry-After`` (never 404).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from remote_vector_index_builder.app import fleet_scripts as scripts
from remote_vector_index_builder.app.admission import Admission
from remote_vector_index_builder.app.fleet_health import Health
from remote_vector_index_builder.app.fleet_store import (
    CHANNEL,
    JOBS,
    LEASES,
    QUEUE,
    Arg,
    FleetConfig,
    StatusCache,
    job_key,
    snapshot_from_hash,
)
from remote_vector_index_builder.app.jobs import (
    CANCELLED_MESSAGE,
    Clock,
    Deleted,
    JobQuery,
    JobSnapshot,
    JobState,
    conflict,
    not_found,
    status_body,
    store_full,
)
from remote_vector_index_builder.app.metrics import Metrics
from remote_vector_index_builder.core.errors import JobStoreUnavailableError
from remote_vector_index_builder.core.params import BuildRequest

# Job hashes read per round trip of a listing.
LIST_BATCH = 1000


class FleetJobService:
    """The endpoints' job service in fleet mode: admission here, then one async round trip."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        config: FleetConfig,
        cache: StatusCache,
        health: Health,
        clock: Clock,
        admission: Admission,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.health = health
        self.clock = clock
        self.admission = admission
        self.metrics = metrics
        self._r: Any = client
        self._submit = client.register_script(scripts.SUBMIT)
        self._delete = client.register_script(scripts.DELETE)

    def now(self) -> float:
        return self.clock()

    async def submit(self, request: BuildRequest) -> str:
        self.admission.admit(request)
        job_id = request.job_id
        keys = [job_key(job_id), QUEUE, JOBS, LEASES]
        args: list[Arg] = [
            job_id,
            request.fingerprint,
            request.model_dump_json(),
            self.config.max_active,
            CHANNEL,
        ]
        with self.health.guard("submit"):
            outcome, detail = await self._submit(keys=keys, args=args)
        if outcome == "conflict":
            raise conflict(request, JobState(detail))
        if outcome == "full":
            raise store_full(int(detail))
        if outcome == "created":
            self.cache.put(job_id, status_body(JobState.QUEUED, None, None))
            if self.metrics is not None:
                self.metrics.jobs_submitted.labels(request.data_type.value).inc()
        return job_id

    async def status(self, job_id: str) -> dict[str, Any]:
        try:
            with self.health.guard("status"):
                state, file_name, error = await self._r.hmget(
                    job_key(job_id), ["state", "file_name", "error"]
                )
        except JobStoreUnavailableError:
            cached = self.cache.get(job_id)
            if cached is not None:
                return cached
            raise
        if state is None:
            raise not_found(job_id)
        body = status_body(JobState(state), file_name or None, error or None)
        self.cache.put(job_id, body)
        return body

    async def snapshot(self, job_id: str) -> JobSnapshot:
        with self.health.guard("read job"):
            fields = await self._r.hgetall(job_key(job_id))
        if not fields:
            raise not_found(job_id)
        return snapshot_from_hash(fields)

    async def snapshots(self, query: JobQuery) -> list[JobSnapshot]:
        with self.health.guard("list jobs"):
            ids = sorted(await self._r.zrange(JOBS, 0, -1))
        if query.after is not None:
            ids = [job_id for job_id in ids if job_id > query.after]
        found: list[JobSnapshot] = []
        for start in range(0, len(ids), LIST_BATCH):
            with self.health.guard("list jobs"):
                pipe = self._r.pipeline(transaction=False)
                for job_id in ids[start : start + LIST_BATCH]:
                    pipe.hgetall(job_key(job_id))
                hashes = await pipe.execute()
            # An id whose hash expired is left out here (a read); the reaper drops it.
            found += [s for s in map(snapshot_from_hash, filter(None, hashes)) if query.wants(s)]
            if query.limit is not None and len(found) >= query.limit:
                return found[: query.limit]
        return found

    async def delete(self, job_id: str) -> Deleted:
        keys = [job_key(job_id), QUEUE, JOBS]
        args: list[Arg] = [job_id, self.config.ttl_ms, CANCELLED_MESSAGE, CHANNEL]
        with self.health.guard("delete"):
            outcome, _, fields = await self._delete(keys=keys, args=args)
        if outcome == "missing":
            raise not_found(job_id)
        if outcome == "forgotten":
            self.cache.drop(job_id)
            ended = snapshot_from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
            return Deleted(ended, forgotten=True)
        return Deleted(await self.snapshot(job_id), forgotten=False)

    async def close(self) -> None:
        await self._r.aclose()
