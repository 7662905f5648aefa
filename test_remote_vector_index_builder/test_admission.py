"""Admission's one ordering rule and its estimates, over both queues: one process's
in-memory store and a fleet's Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from remote_vector_index_builder.app.admission import STARVATION_S, Admission, Placement, Queue
from remote_vector_index_builder.app.local import LocalBackend
from remote_vector_index_builder.core import memory
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.s3_calls import S3Config
from test_remote_vector_index_builder.support import (
    estimate,
    fleet_submit,
    make_settings,
    request_for,
    sync_store,
)
from testbed.fleet_harness import RedisServer


def build_request(path: str, **kw: Any) -> BuildRequest:
    return request_for("b", path, 8, 10, **kw)


@dataclass
class Queued:
    """One backend's queue, and how a job joins it (through the job service's intake)."""

    queue: Queue
    submit: Callable[[BuildRequest], str]
    head: Callable[[], list[str]]


@pytest.fixture(params=["local", "fleet"])
def queued(
    request: pytest.FixtureRequest, tmp_path: Any
) -> Iterator[Callable[[Admission], Queued]]:
    """Factory: the queue of one backend whose intake admits with ``admission``."""
    if request.param == "local":

        def local(admission: Admission) -> Queued:
            backend = LocalBackend(make_settings(S3Config()), admission, None, float)
            return Queued(
                backend,
                lambda r: asyncio.run(backend.service.submit(r)),
                lambda: backend.queue_head(10),
            )

        yield local
        return
    with RedisServer(tmp_path / "redis") as server:

        def fleet(admission: Admission) -> Queued:
            store = sync_store(server.url)
            return Queued(
                store,
                lambda r: fleet_submit(server.url, r, admission),
                lambda: store.queue_head(10),
            )

        yield fleet


def test_a_large_job_is_not_starved_by_a_stream_of_small_ones(
    queued: Callable[[Admission], Queued],
) -> None:
    """A replica whose memory holds one large build or many small ones (real estimates).

    Small jobs keep arriving while small builds hold memory: before the guard's
    window they are taken past the waiting large job; once it has waited the
    window, they are held back, and the large job is taken as soon as the
    running builds drain. One process's budget used to let any waiter that fit go
    first, so the large job waited for ever. The replica's clock is a seam.
    """
    large = build_request("idx/large", dimension=768, doc_count=1_000_000)
    admission = Admission(estimate(large).host_bytes, 0, estimate)
    assert 5 * estimate(build_request("idx/s")).host_bytes < admission.host_limit
    backend = queued(admission)
    clock = [0.0]
    placement = Placement(backend.queue, admission, monotonic=lambda: clock[0])
    smalls = iter(build_request(f"idx/small-{n}") for n in range(100))
    running: list[memory.MemoryEstimate] = []

    def submit_small() -> str:
        return backend.submit(next(smalls))

    def take() -> str | None:
        claimed = placement.take()
        if claimed is None:
            return None
        assert claimed.need == estimate(claimed.request) and claimed.attempt == 1
        running.append(claimed.need)
        return claimed.job_id

    first = submit_small()
    assert take() == first  # a small build holds memory from now on
    large_id = backend.submit(large)
    # Inside the window: small jobs behind the large one are taken while it waits.
    for at in (0.0, STARVATION_S / 2, STARVATION_S - 1):
        clock[0] = at
        small_id = submit_small()
        assert take() == small_id
    assert backend.head() == [large_id]
    # Past the window: a small job fits now, but is held back for the large one.
    clock[0] = STARVATION_S
    held = submit_small()
    assert take() is None
    assert backend.head() == [large_id, held]
    # The small builds end one by one; the large job is taken once they all have.
    while len(running) > 1:
        admission.release(running.pop(0))
        assert take() is None
    admission.release(running.pop(0))
    assert take() == large_id
    assert backend.head() == [held]
    assert take() is None  # the large build holds all the memory now
    admission.release(running.pop(0))
    assert take() == held
    assert backend.head() == []


def test_each_job_is_estimated_once_by_a_replica(
    queued: Callable[[Admission], Queued],
) -> None:
    """Intake (507) and placement share one estimate; it used to be computed, dropped and
    computed again (and placement computed it again on every pass over the queue)."""
    calls: list[str] = []

    def counted(request: BuildRequest) -> memory.MemoryEstimate:
        calls.append(request.vector_path)
        return estimate(request)

    fits_one = estimate(build_request("idx/a")).host_bytes
    admission = Admission(fits_one, 0, counted)
    backend = queued(admission)
    placement = Placement(backend.queue, admission)
    first, second = (backend.submit(build_request(p)) for p in ("idx/a", "idx/b"))
    claimed = placement.take()
    assert claimed is not None and claimed.job_id == first
    for _ in range(3):  # the second waits for memory, looked at on every pass
        assert placement.take() is None
    admission.release(claimed.need)
    claimed = placement.take()
    assert claimed is not None and claimed.job_id == second
    assert sorted(calls) == ["idx/a.knnvec", "idx/b.knnvec"]
