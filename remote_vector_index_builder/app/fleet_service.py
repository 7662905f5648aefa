"""The endpoints' job service in fleet mode: submit, read and cancel jobs in Redis.

One async round trip per ``/_status``; Redis unreachable answers the last-known
body from the status cache, else 503 with ``Retry-After`` (never 404).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from remote_vector_index_builder.app import fleet_scripts as scripts
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
from remote_vector_index_builder.app.jobs import Clock, JobSnapshot, JobState, status_body
from remote_vector_index_builder.app.runner import CANCELLED_MESSAGE
from remote_vector_index_builder.core.errors import (
    JobConflictError,
    JobNotFoundError,
    JobStoreUnavailableError,
    StoreFullError,
)
from remote_vector_index_builder.core.params import BuildRequest


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
        with self.health.guard("submit"):
            outcome, detail = await self._submit(keys=keys, args=args)
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
            raise _not_found(job_id)
        body = status_body(JobState(state), file_name or None, error or None)
        self.cache.put(job_id, body)
        return body

    async def snapshot(self, job_id: str) -> JobSnapshot:
        with self.health.guard("read job"):
            fields = await self._r.hgetall(job_key(job_id))
        if not fields:
            raise _not_found(job_id)
        return snapshot_from_hash(fields)

    async def snapshots(self) -> list[JobSnapshot]:
        with self.health.guard("list jobs"):
            ids = await self._r.zrange(JOBS, 0, -1)
            pipe = self._r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(job_key(job_id))
            hashes = await pipe.execute() if ids else []
        # An id whose hash expired is left out here (a read); the reaper drops it.
        return [snapshot_from_hash(fields) for fields in hashes if fields]

    async def cancel(self, job_id: str) -> JobSnapshot:
        keys = [job_key(job_id), QUEUE]
        args: list[Arg] = [job_id, self.config.ttl_ms, CANCELLED_MESSAGE, CHANNEL]
        with self.health.guard("cancel"):
            outcome, state = await self._cancel(keys=keys, args=args)
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
