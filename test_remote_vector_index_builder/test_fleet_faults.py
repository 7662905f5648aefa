"""The fleet's edges against a real redis-server, in process: Redis full (``maxmemory``
with ``noeviction``) or refusing writes after a failed save (MISCONF), errors while
recording, unreadable entries, re-claims, and the loops that must survive them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from remote_vector_index_builder.app.admission import Placement
from remote_vector_index_builder.app.fleet_health import FleetMetrics
from remote_vector_index_builder.app.fleet_leases import Leases
from remote_vector_index_builder.app.fleet_service import FleetJobService
from remote_vector_index_builder.app.fleet_store import (
    AUDIT,
    CHANNEL,
    JOBS,
    LEASES,
    QUEUE,
    REPLICAS,
    FleetStore,
    StatusCache,
    job_key,
)
from remote_vector_index_builder.app.job_responses import JobDetail, JobSummary
from remote_vector_index_builder.app.jobs import Job, JobQuery, JobState, Outcome
from remote_vector_index_builder.app.main import Overrides, create_app
from remote_vector_index_builder.core.errors import (
    CancelledError,
    JobStoreUnavailableError,
)
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.s3_calls import S3Config
from test_remote_vector_index_builder.support import (
    GatedBuilder,
    admission,
    estimate,
    fast_body,
    fleet_status,
    fleet_submit,
    make_settings,
    request_for,
    required_body,
    run_out_lease,
    sync_store,
    upload,
    wait_idle,
    wait_terminal,
    with_service,
)
from testbed.data import clustered
from testbed.fleet_harness import RedisServer

TICK = threading.Event()  # never set: ``TICK.wait(s)`` paces a wait on a condition


def build_request(path: str = "idx/seg", **kw: Any) -> BuildRequest:
    return request_for("b", path, 8, 10, **kw)


def wait_until(what: str, check: Callable[[], Any], polls: int = 1000) -> Any:
    for _ in range(polls):
        value = check()
        if value:
            return value
        TICK.wait(0.01)
    raise AssertionError(f"never happened: {what}")


# Redis unable to take writes, and how it gets there and back.
CONDITIONS = {
    "full": ("OOM", RedisServer.fill, RedisServer.unfill),
    "unsaving": ("MISCONF", RedisServer.break_saves, RedisServer.mend_saves),
}


@pytest.fixture(params=sorted(CONDITIONS))
def refusing(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Any]:
    """``(code, start, stop)``: ``start()`` makes Redis refuse writes, ``stop()`` mends it."""
    code, start, stop = CONDITIONS[request.param]
    stopped = [False]

    def mend() -> None:
        if not stopped[0]:
            stopped[0] = True
            stop(redis_server)

    yield code, lambda: start(redis_server), mend
    mend()


def everything(r: Any) -> dict[str, Any]:
    """Every key the fleet writes, read back whole."""
    found: dict[str, Any] = {}
    for key in sorted(r.keys("*")):
        kind = r.type(key)
        if kind == "hash":
            found[key] = r.hgetall(key)
        elif kind == "zset":
            found[key] = r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            found[key] = r.xrange(key)
        else:
            found[key] = r.get(key)
    return found


def leases(store: FleetStore, released: list[int] | None = None, **kw: Any) -> Leases:
    metrics = FleetMetrics(CollectorRegistry())
    done = released if released is not None else []
    return Leases(store, StatusCache(), metrics, float, lambda: done.append(1), **kw)


COMPLETED = Outcome(JobState.COMPLETED, file_name="seg.faiss")


def owned_job(store: FleetStore, jobs: Leases, request: BuildRequest) -> Job:
    """``request`` submitted and claimed by ``store``'s replica, held by ``jobs``."""
    attempt = store.claim(fleet_submit(store.config.url, request))
    assert attempt >= 1
    job = Job(id=request.job_id, request=request, submitted_at=0.0, attempt=attempt)
    jobs.own(job)
    return job


def test_redis_refusing_writes_refuses_every_step_whole(
    redis_server: RedisServer, refusing: Any
) -> None:
    """Full (OOM) or after a failed save (MISCONF): every lifecycle step is one outage.

    Nothing moves: a submit is not accepted past ``maxmemory`` (a script whose first
    write was a DEL or ZREM used to get through), no half step is left behind, and
    each refusal is ``JobStoreUnavailableError`` (503 with ``Retry-After``), not a bug.
    """
    code, start, stop = refusing
    url = redis_server.url
    store = sync_store(url, heartbeat_s=20.0)  # registered for 60 s: nothing expires here
    queued = fleet_submit(url, build_request("idx/queued"))
    owned = fleet_submit(url, build_request("idx/owned"))
    lapsed = fleet_submit(url, build_request("idx/lapsed"))
    assert store.claim(owned) == 1 and store.claim(lapsed) == 1
    run_out_lease(url, lapsed)
    store.register({})
    r = redis_server.admin()
    before = everything(r)
    done = Outcome(JobState.COMPLETED, file_name="owned.faiss", index_bytes=1)
    steps: dict[str, Callable[[], Any]] = {
        "submit": lambda: fleet_submit(url, build_request("idx/new")),
        "resubmit": lambda: fleet_submit(url, build_request("idx/queued")),  # no write: fine
        "cancel": lambda: with_service(url, lambda s: s.delete(queued)),
        "claim": lambda: store.claim(queued),
        "renew": lambda: store.renew([(owned, 1, "building", "{}", "cpu")]),
        "complete": lambda: store.complete(owned, 1, done, device="cpu", progress="{}"),
        "release": lambda: store.release(owned, 1),
        "reclaim": lambda: store.reclaim(lapsed),
        "register": lambda: store.register({}),
    }
    start()
    refused = []
    for name, step in steps.items():
        try:
            step()
        except JobStoreUnavailableError as exc:
            assert exc.retry_after_s == 7 and code in str(exc), exc
            refused.append(name)
    assert refused == [name for name in steps if name != "resubmit"]
    del before[REPLICAS]  # the registration's expiry is Redis's clock: compared below
    after = everything(r)
    assert after.pop(REPLICAS)[0][0] == "r1"
    assert after == before
    stop()
    assert store.claim(queued) == 1
    assert store.complete(owned, 1, done, device="cpu", progress="{}")
    assert store.reclaim(lapsed) == "queued"
    assert fleet_submit(url, build_request("idx/new")) in r.zrange(QUEUE, 0, -1)


def test_an_outcome_is_recorded_once_redis_takes_writes_again(
    redis_server: RedisServer, refusing: Any
) -> None:
    """COMPLETE refused used to raise out of ``finish``: the job stayed owned, its lease
    renewed for ever, RUNNING until the replica restarted. Now it waits Redis out."""
    _, start, stop = refusing
    store = sync_store(redis_server.url)
    released: list[int] = []
    jobs = leases(store, released)
    job = owned_job(store, jobs, build_request())
    start()
    result: list[Any] = []

    def finish() -> None:
        try:
            result.append(jobs.record(job, COMPLETED))
        except BaseException as exc:
            result.append(exc)
            raise

    recorder = threading.Thread(target=finish)
    recorder.start()
    # Refused at least once: still this replica's (the heartbeat keeps its lease) meanwhile.
    wait_until("a refusal", lambda: not store.health.reachable() or result)
    assert result == [] and [e.job for e in jobs.owned()] == [job]
    stop()
    recorder.join(timeout=30)
    assert result == [True] and jobs.owned() == [] and released == [1]
    assert fleet_status(redis_server.url, job.id)["task_status"] == "COMPLETED_INDEX_BUILD"


def test_a_failure_to_record_leaves_the_job_to_the_reaper(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is no outage (here an outcome that cannot be encoded) while recording:
    the job leaves this replica's hands, so its lease runs out and it runs again."""
    store = sync_store(redis_server.url)
    released: list[int] = []
    jobs = leases(store, released)
    job = owned_job(store, jobs, build_request())
    with caplog.at_level(logging.ERROR):
        unencodable = Outcome(
            JobState.COMPLETED, file_name="seg.faiss", quality={"recall": np.float32(0.9)}
        )
        recorded = jobs.record(job, unencodable)
    assert recorded is False and jobs.owned() == [] and released == [1]
    [record] = [r for r in caplog.records if "recording its outcome" in r.getMessage()]
    assert record.exc_info is not None and job.id in record.getMessage()
    run_out_lease(redis_server.url, job.id)  # no heartbeat renews it any more
    assert store.reclaim(job.id) == "queued"


def test_a_checkpoint_builds_on_while_redis_refuses_writes(
    redis_server: RedisServer, refusing: Any
) -> None:
    """The renewal of a stale lease at a checkpoint, refused: the build goes on (it used
    to fail as "unexpected error"), and the refusal is no confirmed renewal."""
    _, start, stop = refusing
    store = sync_store(redis_server.url, lease_s=10.0)
    now = [0.0]
    jobs = leases(store, monotonic=lambda: now[0])
    job = owned_job(store, jobs, build_request())
    now[0] = 6.0  # past half a lease since the claim: the checkpoint renews
    start()
    jobs.checkpoint(job)
    assert not job.cancel_requested.is_set()
    [entry] = jobs.owned()
    assert entry.renewed_at == 0.0 and not entry.lost
    stop()
    jobs.checkpoint(job)
    assert entry.renewed_at == 6.0


def test_the_endpoints_answer_503_with_retry_after_while_redis_refuses_writes(
    s3_config: S3Config, redis_server: RedisServer, refusing: Any
) -> None:
    code, start, stop = refusing
    r = redis_server.admin()
    settings = make_settings(
        s3_config,
        redis_url=redis_server.url,
        replica_id="solo",
        redis_retry_after_seconds=11,
        max_workers=1,
    )
    body = required_body("nowhere", "idx/a", 8, 10)
    # Queued, and it stays queued: no replica here can ever hold it.
    known = fleet_submit(redis_server.url, request_for("nowhere", "idx/huge", 768, 10**9))
    with TestClient(create_app(settings)) as client:
        start()
        answers = [client.post("/_build", json=body), client.delete(f"/_jobs/{known}")]
        for answer in answers:
            assert answer.status_code == 503 and answer.headers["retry-after"] == "11"
            assert code in answer.json()["detail"]
        assert r.zrange(JOBS, 0, -1) == [known]  # nothing accepted past the refusal
        # Reads go on.
        assert client.get(f"/_status/{known}").json()["task_status"] == "RUNNING_INDEX_BUILD"
        assert list(client.get("/_jobs").json()) == [known]
        stop()
        assert client.post("/_build", json=body).status_code == 200
        assert client.delete(f"/_jobs/{known}").status_code == 202
        assert r.zcard(JOBS) == 2


@pytest.mark.parametrize("fault", ["unsaving", "a bug"])
def test_a_failed_claim_gives_its_memory_back_and_the_replica_claims_again(
    redis_server: RedisServer, fault: str
) -> None:
    """The reservation made for a claim went back only on an outage: a few seconds of
    MISCONF (then classified as a bug) or any other error, and a replica whose memory
    holds one build never claimed again, although Redis was fine and /_ready said 200."""
    url = redis_server.url
    store = sync_store(url)
    budget = admission(estimate(build_request()).host_bytes)  # one build at a time
    placement = Placement(store, budget)
    first = fleet_submit(url, build_request("idx/first"))
    second = fleet_submit(url, build_request("idx/second"))
    r = redis_server.admin()
    if fault == "unsaving":
        redis_server.break_saves()
        with pytest.raises(JobStoreUnavailableError):
            placement.take()
        redis_server.mend_saves()
        expected = first
    else:
        # The claim script fails at its last step (the audit stream is no stream).
        r.delete(AUDIT)
        r.set(AUDIT, "not a stream")
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            placement.take()
        r.delete(AUDIT)
        expected = second  # the first is left leased: its lease runs out, the reaper has it
    assert budget.usage()[1] == 0
    claimed = placement.take()
    assert claimed is not None and claimed.job_id == expected
    assert budget.usage()[1] == claimed.need.host_bytes


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# Stored requests this version cannot parse back, as another version (or an accepted
# request nested past the JSON parser's depth) leaves them in Redis.
UNREADABLE: dict[str, Callable[[dict[str, Any]], None]] = {
    "data_type": lambda req: req.update(data_type="float8"),  # a newer version's value
    "recursion limit": lambda req: req["index_parameters"]["algorithm_parameters"].update(
        future=nested(300)
    ),
}


def make_unreadable(r: Any, job_id: str, how: str) -> None:
    request = json.loads(r.hget(job_key(job_id), "req"))
    UNREADABLE[how](request)
    r.hset(job_key(job_id), "req", json.dumps(request))


def test_an_unreadable_stored_request_fails_and_the_queue_moves_on(
    redis_server: RedisServer,
) -> None:
    """Such an entry made every replica's claim loop raise before the jobs behind it, and
    every listing answer 500. Now each reader gets past it and the claim loop fails it."""
    url = redis_server.url
    r = redis_server.admin()
    bad = {how: fleet_submit(url, build_request(f"idx/{n}")) for n, how in enumerate(UNREADABLE)}
    good = fleet_submit(url, build_request("idx/good"))
    for how, job_id in bad.items():
        make_unreadable(r, job_id, how)
    listing = {snap.id: snap for snap in with_service(url, lambda s: s.snapshots(JobQuery()))}
    assert set(listing) == {*bad.values(), good}
    newer = listing[bad["data_type"]]
    assert newer.request is None and newer.state is JobState.QUEUED
    summary = JobSummary.model_validate(JobSummary.of(newer).model_dump())  # GET /_jobs
    assert (summary.bucket, summary.data_type, summary.dimension) == ("b", "float8", 8)
    placement = Placement(sync_store(url), admission())
    claimed = placement.take()
    assert claimed is not None and claimed.job_id == good
    for how, job_id in bad.items():
        body = fleet_status(url, job_id)
        assert body["task_status"] == "FAILED_INDEX_BUILD"
        assert body["error_message"].startswith("this replica cannot read the stored build request")
        assert how in body["error_message"]
        # DELETE forgets it like any ended job.
        assert with_service(url, partial(FleetJobService.delete, job_id=job_id)).forgotten
    assert r.zrange(QUEUE, 0, -1) == []


def test_an_unreadable_queued_request_can_be_cancelled(redis_server: RedisServer) -> None:
    """DELETE cancelled it but answered 500: rendering the answer parsed the request."""
    url = redis_server.url
    job_id = fleet_submit(url, build_request())
    make_unreadable(redis_server.admin(), job_id, "recursion limit")
    snap = with_service(url, lambda s: s.delete(job_id)).snapshot
    detail = JobDetail.model_validate(JobDetail.at(snap, 0.0).model_dump())  # DELETE's 202
    assert detail.state is JobState.CANCELLED and detail.vector_path == "idx/seg.knnvec"
    assert fleet_status(url, job_id)["error_message"] == "cancelled by operator"


def test_a_replica_gets_past_an_unreadable_request_to_the_job_behind_it(
    s3_config: S3Config, s3_client: Any, bucket: str, redis_server: RedisServer
) -> None:
    url = redis_server.url
    upload(s3_client, bucket, "idx/ok", clustered(300, 16))
    poisoned = fleet_submit(url, request_for(bucket, "idx/poison", 16, 300))
    make_unreadable(redis_server.admin(), poisoned, "data_type")
    settings = make_settings(s3_config, redis_url=url, replica_id="solo", max_workers=1)
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/_build", json=fast_body(bucket, "idx/ok", 16, 300)).json()
        assert wait_terminal(client, job_id["job_id"])["task_status"] == "COMPLETED_INDEX_BUILD"
        failed = wait_terminal(client, poisoned)
        assert "cannot read the stored build request" in failed["error_message"]
        listing = client.get("/_jobs")
        assert listing.status_code == 200 and listing.json()[poisoned]["data_type"] == "float8"
        assert client.get(f"/_jobs/{poisoned}").json()["state"] == "failed"
        assert client.delete(f"/_jobs/{poisoned}").status_code == 200  # forgotten


def test_claiming_a_job_again_fences_this_replicas_older_attempt(
    redis_server: RedisServer,
) -> None:
    """The newer attempt replaced the older one's entry, unfenced: both built on."""
    url = redis_server.url
    store = sync_store(url)
    jobs = leases(store)
    old = owned_job(store, jobs, build_request())
    run_out_lease(url, old.id)  # its lease lapsed (a long pause) and it was queued again
    assert store.reclaim(old.id) == "queued"
    new = owned_job(store, jobs, build_request())
    assert (old.attempt, new.attempt) == (1, 2)
    assert old.cancel_requested.is_set() and not new.cancel_requested.is_set()
    with pytest.raises(CancelledError):
        jobs.checkpoint(old)
    jobs.checkpoint(new)
    assert jobs.active() == [new]
    assert not jobs.record(old, Outcome(JobState.COMPLETED, file_name="old.faiss"))
    assert jobs.record(new, COMPLETED)
    assert jobs.owned() == []
    ends = [
        (e["attempt"], e["state"])
        for _, e in redis_server.admin().xrange(AUDIT)
        if e["event"] == "end"
    ]
    assert ends == [("2", "completed")]


def test_a_replica_never_runs_two_builds_of_a_job_it_claims_again(
    s3_config: S3Config, s3_client: Any, bucket: str, redis_server: RedisServer
) -> None:
    """Through the app: its own reaper queues the job again while its build is paused,
    its claim loop takes it back; the older build stops and records nothing, and both
    threads count as busy until they end (the futures were keyed by id only)."""
    upload(s3_client, bucket, "idx/twice", clustered(4000, 16))
    builder = GatedBuilder(add_batch_rows=1000, pause_after=1)
    settings = make_settings(
        s3_config,
        redis_url=redis_server.url,
        replica_id="solo",
        lease_seconds=60,
        heartbeat_seconds=30,  # renewals at start-up, then only long after this test
        add_batch_rows=1000,
    )
    app = create_app(settings, Overrides(builder=builder))
    r = redis_server.admin()
    with TestClient(app) as client:
        job_id = client.post("/_build", json=fast_body(bucket, "idx/twice", 16, 4000)).json()[
            "job_id"
        ]
        assert builder.paused.wait(timeout=30)
        r.zadd(LEASES, {job_id: 0}, xx=True)  # the lease lapsed (as after a long pause)
        fleet = app.state.backend
        wait_until("claimed again", lambda: len(fleet.leases.owned()) == 2)
        [old, new] = sorted(fleet.leases.owned(), key=lambda entry: entry.attempt)
        assert (old.attempt, new.attempt) == (1, 2)
        assert old.lost and old.job.cancel_requested.is_set()
        assert app.state.runner.busy() == 2
        builder.resume.set()
        assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
        wait_idle(client)
        assert fleet.leases.owned() == []
        events = [(e["event"], e["attempt"]) for _, e in r.xrange(AUDIT)]
        assert events == [("start", "1"), ("reclaimed", "1"), ("start", "2"), ("end", "2")]


def test_the_commit_check_confirms_the_lease_right_before_the_upload(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    store = sync_store(url, lease_s=10.0)
    now = [0.0]
    jobs = leases(store, monotonic=lambda: now[0])
    job = owned_job(store, jobs, build_request())
    r = redis_server.admin()
    r.zadd(LEASES, {job.id: 1}, xx=True)  # about to run out (Redis's clock)
    now[0] = 3.0
    jobs.commit_check(job)  # renewed now, synchronously: not at the next heartbeat
    assert float(r.zscore(LEASES, job.id)) > 1 and jobs.owned()[0].renewed_at == 3.0
    # Taken over meanwhile (this replica's lease ran out): the upload stops, nothing recorded.
    run_out_lease(url, job.id)
    assert store.reclaim(job.id) == "queued"
    assert sync_store(url, "r2").claim(job.id) == 2
    with pytest.raises(CancelledError, match="another replica"):
        jobs.commit_check(job)
    assert not jobs.record(job, COMPLETED)
    assert fleet_status(url, job.id)["task_status"] == "RUNNING_INDEX_BUILD"


@pytest.mark.parametrize("cut_off", ["unreachable", "full"])
def test_an_owner_cut_off_from_redis_for_a_whole_lease_stops_before_it_uploads(
    redis_server: RedisServer, cut_off: str
) -> None:
    """Cut off from Redis but not from S3 past its lease, the owner used to complete its
    upload while another replica rebuilt the job: the file under a COMPLETED key could be
    replaced. Within a lease nobody can have taken the job over: the upload goes on."""
    store = sync_store(redis_server.url, lease_s=10.0)
    now = [0.0]
    jobs = leases(store, monotonic=lambda: now[0])
    job = owned_job(store, jobs, build_request())
    if cut_off == "unreachable":
        redis_server.kill()
    else:
        redis_server.fill()
    now[0] = 9.9
    jobs.commit_check(job)
    assert not job.cancel_requested.is_set()
    now[0] = 10.0
    with pytest.raises(CancelledError, match="unconfirmed for 10 s"):
        jobs.commit_check(job)
    assert job.cancel_requested.is_set() and jobs.active() == []
    assert not jobs.record(job, COMPLETED)
    assert jobs.owned() == []


def test_the_reaper_keeps_the_job_index_bounded(
    s3_config: S3Config, redis_server: RedisServer
) -> None:
    """Finished jobs' hashes expire, their ids in {rvib}:jobs stayed until a GET /_jobs:
    2,000 expired jobs left 2,000 ids. The reaper drops them; live ids stay."""
    url = redis_server.url
    r = redis_server.admin()
    live = fleet_submit(url, request_for("nowhere", "idx/huge", 768, 10**9))  # never fits
    r.zadd(JOBS, {f"expired-{n}": n for n in range(2000)})  # hashes gone, as after their TTL
    settings = make_settings(s3_config, redis_url=url, replica_id="solo")
    with TestClient(create_app(settings)):
        wait_until("pruned", lambda: r.zcard(JOBS) == 1, polls=3000)
    assert r.zrange(JOBS, 0, -1) == [live]


def test_the_event_listener_outlives_an_error_and_delivers_cancels_again(
    s3_config: S3Config,
    s3_client: Any,
    bucket: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis error the listener did not expect (NOPERM on the events channel here)
    ended its thread for good, silently: cancels then reached a running build only at its
    next heartbeat (or never, with no heartbeat renewal due). Now it listens again."""
    admin = redis_server.admin()
    admin.execute_command(
        "ACL", "SETUSER", "rvib", "on", ">secret", "~*", "+@all", "resetchannels", "&other"
    )
    upload(s3_client, bucket, "idx/listen", clustered(4000, 16))
    job_id = fleet_submit(redis_server.url, request_for(bucket, "idx/listen", 16, 4000))
    builder = GatedBuilder(add_batch_rows=1000, pause_after=1)
    settings = make_settings(
        s3_config,
        redis_url=f"redis://rvib:secret@127.0.0.1:{redis_server.port}/0",
        replica_id="solo",
        lease_seconds=60,
        heartbeat_seconds=30,  # no renewal (which carries the cancel flag too) in this test
        add_batch_rows=1000,
    )
    app = create_app(settings, Overrides(builder=builder))
    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        assert builder.paused.wait(timeout=30)
        wait_until("refused", lambda: "(events, NOPERM)" in caplog.text)
        admin.execute_command("ACL", "SETUSER", "rvib", "&{rvib}:events")
        wait_until("listening", lambda: admin.pubsub_numsub(CHANNEL) == [(CHANNEL, 1)])
        with_service(redis_server.url, partial(FleetJobService.delete, job_id=job_id))
        [entry] = app.state.backend.leases.owned()
        wait_until("the cancel delivered", entry.job.cancel_requested.is_set)
        builder.resume.set()
        assert wait_terminal(client, job_id)["error_message"] == "cancelled by operator"


def test_a_bucket_that_left_the_allow_list_fails_its_queued_jobs_at_claim(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    placement = Placement(sync_store(url), admission(), allowed_buckets=frozenset({"kept"}))
    dropped = fleet_submit(url, request_for("dropped", "idx/a", 8, 10))
    kept = fleet_submit(url, request_for("kept", "idx/b", 8, 10))
    claimed = placement.take()
    assert claimed is not None and claimed.job_id == kept
    body = fleet_status(url, dropped)
    assert body["task_status"] == "FAILED_INDEX_BUILD"
    assert "'dropped' is no longer in this service's allow-list" in body["error_message"]
