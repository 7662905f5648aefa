"""The fleet's scripts and stores against a real redis-server, in process (fast).

The multi-process fleet (replicas killed, paused, Redis restarted) is in test_fleet.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any, TypeVar

import numpy as np
import pytest
import redis
import redis.asyncio
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.fleet_service import FleetJobService
from remote_vector_index_builder.app.fleet_store import (
    AUDIT,
    CHANNEL,
    JOBS,
    LEASES,
    QUEUE,
    StatusCache,
    job_key,
)
from remote_vector_index_builder.app.jobs import JobState, Outcome
from remote_vector_index_builder.app.main import create_app
from remote_vector_index_builder.core.errors import (
    JobConflictError,
    JobNotFoundError,
    JobStoreUnavailableError,
    StoreFullError,
)
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.s3_calls import S3Config
from test_remote_vector_index_builder.support import (
    fleet_status,
    fleet_submit,
    make_settings,
    request_for,
    run_out_lease,
    sync_store,
    with_service,
)
from testbed.data import clustered, doc_id_blob, vector_blob
from testbed.fleet_harness import RedisServer

T = TypeVar("T")


def build_request(path: str = "idx/seg", **kw: Any) -> BuildRequest:
    return request_for("b", path, 8, 10, **kw)


def test_concurrent_duplicate_submits_create_one_job(redis_server: RedisServer) -> None:
    url = redis_server.url
    request = build_request()

    async def race(service: FleetJobService) -> list[str]:
        return list(await asyncio.gather(*(service.submit(request) for _ in range(30))))

    assert set(with_service(url, race)) == {request.job_id}
    r = redis.Redis.from_url(url, decode_responses=True)
    assert r.zrange(QUEUE, 0, -1) == [request.job_id]
    assert r.hget(job_key(request.job_id), "attempt") == "0"
    with pytest.raises(JobConflictError, match="different build parameters"):
        fleet_submit(url, build_request(dimension=16))


def test_store_full_of_active_jobs_refuses(redis_server: RedisServer) -> None:
    url = redis_server.url

    async def fill(service: FleetJobService) -> None:
        await service.submit(build_request("idx/a"))
        await service.submit(build_request("idx/b"))
        with pytest.raises(StoreFullError, match="REQUEST_STORE_MAX_SIZE"):
            await service.submit(build_request("idx/c"))

    with_service(url, fill, max_active=2)


def test_claim_lease_reclaim_and_fencing(redis_server: RedisServer) -> None:
    url = redis_server.url
    a, b = sync_store(url, "r1"), sync_store(url, "r2")
    job_id = fleet_submit(url, build_request())
    assert [a.claim(job_id), b.claim(job_id)] == [1, 0]
    assert b.renew([(job_id, 1, "", "{}", "cpu")]) == [(False, False)]
    assert a.renew([(job_id, 1, "building", "{}", "cpu")]) == [(True, False)]
    assert b.reclaim(job_id) == "alive"  # the lease has not run out on Redis's clock
    run_out_lease(url, job_id)
    assert b.expired(10) == [job_id]
    assert b.reclaim(job_id) == "queued"
    assert fleet_status(url, job_id)["task_status"] == "RUNNING_INDEX_BUILD"
    assert b.claim(job_id) == 2
    # The old owner comes back: it can neither renew nor record.
    assert a.renew([(job_id, 1, "", "{}", "cpu")]) == [(False, False)]
    done = Outcome(JobState.COMPLETED, file_name="seg.faiss", index_bytes=10)
    assert not a.complete(job_id, 1, done, device="cpu", progress="{}")
    assert b.complete(job_id, 2, done, device="cpu", progress="{}")
    r: Any = redis.Redis.from_url(url, decode_responses=True)
    assert 0 < r.pttl(job_key(job_id)) <= 60_000  # the finished TTL counts from now
    assert r.zcard(LEASES) == 0 and r.zcard(QUEUE) == 0
    assert fleet_status(url, job_id) == {
        "task_status": "COMPLETED_INDEX_BUILD",
        "file_name": "seg.faiss",
        "error_message": None,
    }
    assert fleet_submit(url, build_request()) == job_id and r.zcard(QUEUE) == 0  # exists, not new
    events = [(e["event"], e["attempt"], e["replica"]) for _, e in r.xrange(AUDIT)]
    assert events == [
        ("start", "1", "r1"),
        ("reclaimed", "1", "r1"),
        ("start", "2", "r2"),
        ("end", "2", "r2"),
    ]


def test_a_job_interrupted_max_attempts_times_fails_with_that_message(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    store = sync_store(url, lease_s=0.05, max_attempts=2)
    job_id = fleet_submit(url, build_request())
    outcomes = []
    for attempt in (1, 2):
        assert store.claim(job_id) == attempt
        run_out_lease(url, job_id)
        outcomes.append(store.reclaim(job_id))
    assert outcomes == ["queued", "failed"]
    body = fleet_status(url, job_id)
    assert body["task_status"] == "FAILED_INDEX_BUILD"
    assert body["error_message"].startswith("the build was interrupted 2 times")
    # A new request starts afresh, attempt numbers still climbing (they fence).
    assert fleet_submit(url, build_request()) == job_id
    assert store.claim(job_id) == 3


def test_cancel_queued_and_owned_jobs(redis_server: RedisServer) -> None:
    url = redis_server.url
    store = sync_store(url, lease_s=0.2)
    queued = fleet_submit(url, build_request("idx/q"))
    deleted = with_service(url, lambda s: s.delete(queued))
    snap = deleted.snapshot
    assert not deleted.forgotten
    assert snap.state is JobState.CANCELLED and snap.error == "cancelled by operator"
    assert fleet_status(url, queued)["error_message"] == "cancelled by operator"
    # Deleted again, the ended job is forgotten: its hash and its place in the listing.
    again = with_service(url, lambda s: s.delete(queued))
    assert again.forgotten and again.snapshot.state is JobState.CANCELLED
    r: Any = redis.Redis.from_url(url, decode_responses=True)
    assert not r.exists(job_key(queued)) and r.zscore(JOBS, queued) is None
    for gone in (queued, "never-seen"):
        with pytest.raises(JobNotFoundError):
            with_service(url, lambda s: s.delete(gone))  # noqa: B023

    owned = fleet_submit(url, build_request("idx/o"))
    assert store.claim(owned) == 1
    client: Any = redis.Redis.from_url(url, decode_responses=True)
    events = client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(CHANNEL)
    snap = with_service(url, lambda s: s.delete(owned)).snapshot
    assert snap.cancel_requested and snap.owner == "r1" and not snap.state.terminal
    message = None
    for _ in range(50):
        message = events.get_message(timeout=0.1)
        if message is not None:
            break
    assert message is not None and message["data"] == f"cancel {owned}"
    assert store.renew([(owned, 1, "", "{}", "cpu")]) == [(True, True)]  # the flag, too
    run_out_lease(url, owned)  # the owner died: the reaper ends it as cancelled
    assert store.reclaim(owned) == "cancelled"
    assert fleet_status(url, owned)["error_message"] == "cancelled by operator"


def test_release_hands_a_job_back_without_counting_an_interruption(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    first = fleet_submit(url, build_request("idx/1"))
    second = fleet_submit(url, build_request("idx/2"))
    store = sync_store(url)
    assert store.claim(first) == 1
    assert store.release(first, 1)
    assert not store.release(first, 1)  # no longer its owner
    assert store.queue_head(5) == [first, second]  # back in its old place
    r = redis.Redis.from_url(url, decode_responses=True)
    assert r.hget(job_key(first), "interrupted") == "0"
    assert store.claim(first) == 2


def test_scripts_survive_a_flushed_script_cache(redis_server: RedisServer) -> None:
    """A Redis failover or restart forgets loaded scripts; redis-py loads them again."""
    url = redis_server.url
    store = sync_store(url)
    job_id = fleet_submit(url, build_request())
    redis.Redis.from_url(url).script_flush()
    assert store.claim(job_id) == 1
    redis.Redis.from_url(url).script_flush()
    assert store.renew([(job_id, 1, "", "{}", "cpu")]) == [(True, False)]


def test_status_while_redis_is_down_comes_from_the_cache_or_is_a_503(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    cache = StatusCache()
    job_id = fleet_submit(url, build_request())
    assert with_service(url, lambda s: s.status(job_id), cache)["task_status"] == (
        "RUNNING_INDEX_BUILD"
    )
    redis_server.kill()
    cached = with_service(url, lambda s: s.status(job_id), cache)
    assert cached["task_status"] == "RUNNING_INDEX_BUILD"
    for call in (
        lambda s: s.status("never-seen"),
        lambda s: s.submit(build_request("idx/new")),
    ):
        with pytest.raises(JobStoreUnavailableError) as raised:
            with_service(url, call, cache)
        assert raised.value.retry_after_s == 7


def test_one_replica_in_fleet_mode_builds_through_the_app(
    s3_config: S3Config, s3_client: Any, bucket: str, redis_server: RedisServer
) -> None:
    vectors = clustered(500, 16)
    s3_client.put_object(Bucket=bucket, Key="idx/f.knnvec", Body=vector_blob(vectors))
    ids = np.arange(500, dtype=np.int32)
    s3_client.put_object(Bucket=bucket, Key="idx/f.knndid", Body=doc_id_blob(ids))
    settings = make_settings(
        s3_config,
        redis_url=redis_server.url,
        replica_id="solo",
        lease_seconds=2,
        heartbeat_seconds=0.2,
        max_workers=1,
    )
    body = {
        "repository_type": "s3",
        "container_name": bucket,
        "vector_path": "idx/f.knnvec",
        "doc_id_path": "idx/f.knndid",
        "dimension": 16,
        "doc_count": 500,
    }
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/_build", json=body).json()["job_id"]
        stop = threading.Event()
        for _ in range(3000):
            answer = client.get(f"/_status/{job_id}").json()
            if answer["task_status"] != "RUNNING_INDEX_BUILD":
                break
            stop.wait(0.01)
        assert answer == {
            "task_status": "COMPLETED_INDEX_BUILD",
            "file_name": "f.faiss",
            "error_message": None,
        }
        listing = client.get("/_jobs").json()
        assert listing[job_id]["owner"] == "solo" and listing[job_id]["attempt"] == 1
        detail = client.get(f"/_jobs/{job_id}").json()
        assert detail["progress"]["percent"] == 100.0 and detail["index_bytes"] > 0
        assert set(detail["stages"]) == {"download", "parse", "build", "upload"}
        assert client.get("/_status/never-seen").status_code == 404
        metrics = client.get("/metrics").text
        assert "rvib_fleet_replicas 1.0" in metrics
        assert "rvib_fleet_jobs_claimed_total 1.0" in metrics
        # The replica registry as the last heartbeat read it (one every 0.2 s).
        for _ in range(500):
            fleet = client.get("/_heart_beat").json()["fleet"]
            if fleet["replicas_alive"]:
                break
            stop.wait(0.01)
        assert fleet == {"replica_id": "solo", "replicas_alive": ["solo"], "redis_reachable": True}
        # Redis gone: the job's last-known body, a 503 for the rest; readiness unaffected.
        redis_server.kill()
        assert client.get(f"/_status/{job_id}").json()["task_status"] == "COMPLETED_INDEX_BUILD"
        unknown = client.get("/_status/never-seen")
        assert unknown.status_code == 503 and unknown.headers["retry-after"] == "10"
        refused = client.post("/_build", json={**body, "vector_path": "idx/g.knnvec"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
        assert client.get("/_ready").status_code == 200
        beat = client.get("/_heart_beat")
        assert beat.status_code == 200 and beat.json()["fleet"]["redis_reachable"] is False


def test_a_replica_is_in_the_registry_from_start_up_until_it_shuts_down(
    s3_config: S3Config, redis_server: RedisServer
) -> None:
    url = redis_server.url
    settings = make_settings(
        s3_config, redis_url=url, replica_id="early", lease_seconds=30, heartbeat_seconds=10
    )
    other = sync_store(url, "other", heartbeat_s=20.0)  # registered for 60 s
    other.register({})
    with TestClient(create_app(settings)) as client:
        # Registered by the first heartbeat at start-up, not one heartbeat (10 s) later.
        fleet = client.get("/_heart_beat").json()["fleet"]
        assert fleet["replicas_alive"] == ["early", "other"]
        assert "rvib_fleet_replicas 2.0" in client.get("/metrics").text
    assert other.register({}) == ["other"]  # left the registry on shutdown


def test_one_process_never_imports_redis() -> None:
    """Without RVIB_REDIS_URL the service runs today's code path: redis is not even imported."""
    script = """
import sys
from fastapi.testclient import TestClient
from remote_vector_index_builder.app.main import create_app
from remote_vector_index_builder.app.settings import Settings

settings = Settings(_env_file=None, device="cpu", max_workers=1, omp_threads=1)
with TestClient(create_app(settings)) as client:
    assert client.get("/_status/x").status_code == 404
    assert client.get("/_jobs").json() == {}
    assert "fleet" not in client.get("/_heart_beat").json()
loaded = sorted(m for m in sys.modules if m == "redis" or m.startswith("redis."))
print("redis modules:", loaded)
sys.exit(1 if loaded else 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "redis modules: []" in done.stdout
