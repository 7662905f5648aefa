"""Three replica processes, a real redis-server and a round-robin proxy: the fleet's promises.

Each replica is ``fleet_harness`` (the real app, the real CPU builder slowed per
batch so kills land mid-build) with one build slot. S3 is the suite's local
server. Leases are short (3 s, heartbeat 0.2 s) so failovers take seconds.
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import faiss
import numpy as np
import pytest
import redis

from remote_vector_index_builder.app.fleet_store import AUDIT, job_key
from remote_vector_index_builder.core import index_io
from remote_vector_index_builder.core.s3_calls import S3Config
from testbed.data import clustered, doc_id_blob, vector_blob
from testbed.fleet_harness import (
    RedisServer,
    Replica,
    RoundRobinProxy,
    free_port,
    request,
)

pytestmark = pytest.mark.slow

N, DIM, BATCH = 4000, 16, 500  # eight batches per build
BATCH_DELAY_S = 0.15
# A lease is the failure detector: on a machine this loaded, a live replica starved of
# CPU for 1.5 s lost jobs it was still building (fenced, correctly, but built twice).
LEASE_S, HEARTBEAT_S = 3.0, 0.2
RETRY_AFTER_S = 3
RUNNING = "RUNNING_INDEX_BUILD"
COMPLETED = "COMPLETED_INDEX_BUILD"
FAILED = "FAILED_INDEX_BUILD"
POLL = threading.Event()  # never set: ``POLL.wait(s)`` is a sleep that reads as one


@dataclass
class Fleet:
    redis: RedisServer
    replicas: list[Replica]
    proxy: RoundRobinProxy
    client: Any = field(init=False)

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)

    def by_id(self, replica_id: str) -> Replica:
        return next(r for r in self.replicas if r.replica_id == replica_id)

    def others(self, replica_id: str) -> list[Replica]:
        return [r for r in self.replicas if r.replica_id != replica_id]

    def heal(self) -> None:
        """Every replica up and idle (a test may have killed, paused or stopped one)."""
        if not self.redis.ping():
            self.redis.start()
        for replica in self.replicas:
            if not replica.alive():
                replica.kill()
                replica.start()
        for replica in self.replicas:
            replica.wait_ready()

    def audit(self, job_id: str) -> list[dict[str, str]]:
        return [e for _, e in self.client.xrange(AUDIT) if e["job"] == job_id]


@pytest.fixture(scope="module")
def fleet(s3_config: S3Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    server = RedisServer(root / "redis", appendonly=True)
    server.start()
    replicas = []
    for name in ("r1", "r2", "r3"):
        port = free_port()
        settings = {
            "host": "127.0.0.1",
            "port": port,
            "s3_endpoint_url": s3_config.endpoint_url,
            "s3_path_style": True,
            "s3_part_size": s3_config.part_size,
            "s3_max_attempts": 2,
            "device": "cpu",
            "max_workers": 1,
            "omp_threads": 1,
            "add_batch_rows": BATCH,
            "build_nice": 0,
            "shutdown_grace_seconds": 0,
            "redis_url": server.url,
            "replica_id": name,
            "lease_seconds": LEASE_S,
            "heartbeat_seconds": HEARTBEAT_S,
            "max_attempts": 3,
            "redis_retry_after_seconds": RETRY_AFTER_S,
        }
        replicas.append(Replica(name, port, settings, root / f"{name}.log", BATCH_DELAY_S))
    for replica in replicas:
        replica.start()
    proxy = RoundRobinProxy([r.url for r in replicas])
    the_fleet = Fleet(server, replicas, proxy)
    try:
        the_fleet.heal()
        yield the_fleet
    finally:
        proxy.close()
        for replica in replicas:
            replica.kill()
        server.kill()


@pytest.fixture
def healthy(fleet: Fleet) -> Fleet:
    fleet.heal()
    return fleet


def put_segment(s3_client: Any, bucket: str, stem: str, seed: int = 0) -> dict[str, Any]:
    vectors = clustered(N, DIM, seed=seed)
    ids = np.arange(N, dtype=np.int32) * 3 + 7
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knndid", Body=doc_id_blob(ids))
    return {
        "repository_type": "s3",
        "container_name": bucket,
        "vector_path": f"{stem}.knnvec",
        "doc_id_path": f"{stem}.knndid",
        "tenant_id": "fleet",
        "dimension": DIM,
        "doc_count": N,
        "index_parameters": {"algorithm_parameters": {"ef_construction": 32, "m": 8}},
    }


def submit(url: str, body: dict[str, Any]) -> str:
    code, _, answer = request("POST", f"{url}/_build", body)
    assert code == 200, answer
    return str(answer["job_id"])


def wait_for(what: str, check: Callable[[], Any], polls: int = 600, every_s: float = 0.05) -> Any:
    for _ in range(polls):
        value = check()
        if value:
            return value
        POLL.wait(every_s)
    raise AssertionError(f"never happened: {what}")


def detail(url: str, job_id: str) -> dict[str, Any]:
    code, _, body = request("GET", f"{url}/_jobs/{job_id}")
    assert code == 200, body
    return dict(body)


def building(url: str, job_id: str) -> dict[str, Any] | None:
    """The job's detail once it is mid-build (some batches added), else None."""
    job = detail(url, job_id)
    if job["state"] == "building" and job["progress"]["done"] > 0:
        return job
    return None


def finished(url: str, job_id: str) -> dict[str, Any] | None:
    code, _, body = request("GET", f"{url}/_status/{job_id}")
    assert code == 200, (code, body)
    return dict(body) if body["task_status"] != RUNNING else None


class Poller:
    """Polls ``/_status`` through the proxy like the k-NN client, recording every answer."""

    def __init__(self, url: str, job_id: str) -> None:
        self.answers: list[tuple[int, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, job_id), daemon=True)
        self._thread.start()

    def _run(self, url: str, job_id: str) -> None:
        while not self._stop.is_set():
            code, _, body = request("GET", f"{url}/_status/{job_id}")
            self.answers.append((code, body))
            if code == 200 and body["task_status"] != RUNNING:
                return
            self._stop.wait(0.02)

    def join(self, timeout_s: float = 60) -> None:
        self._thread.join(timeout_s)
        self._stop.set()
        assert not self._thread.is_alive(), "the job never finished"


def assert_loads_with_ids(s3_client: Any, bucket: str, stem: str) -> None:
    raw = s3_client.get_object(Bucket=bucket, Key=f"{stem}.faiss")["Body"].read()
    index = index_io.read(raw)
    assert index.ntotal == N
    expected = np.arange(N, dtype=np.int64) * 3 + 7
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), expected)


def test_kill_9_of_the_owner_mid_build_loses_nothing(
    healthy: Fleet, s3_client: Any, bucket: str
) -> None:
    fleet = healthy
    body = put_segment(s3_client, bucket, "idx/kill")
    job_id = submit(fleet.proxy.url, body)
    poller = Poller(fleet.proxy.url, job_id)
    victim = wait_for("mid-build", lambda: building(fleet.proxy.url, job_id))["owner"]
    fleet.by_id(victim).signal(signal.SIGKILL)
    poller.join()
    # The client saw nothing but RUNNING, then COMPLETED: never a 404, never FAILED.
    assert {code for code, _ in poller.answers} == {200}
    states = [body["task_status"] for _, body in poller.answers]
    assert states[-1] == COMPLETED and set(states[:-1]) == {RUNNING}
    assert poller.answers[-1][1]["file_name"] == "kill.faiss"
    final = detail(fleet.proxy.url, job_id)
    assert final["attempt"] == 2 and final["owner"] != victim
    assert_loads_with_ids(s3_client, bucket, "idx/kill")
    events = [(e["event"], e["attempt"], e["replica"]) for e in fleet.audit(job_id)]
    assert events[0] == ("start", "1", victim)
    assert events[1:] == [
        ("reclaimed", "1", victim),
        ("start", "2", final["owner"]),
        ("end", "2", final["owner"]),
    ]


def test_no_job_is_built_twice_and_no_replica_runs_two_builds(
    healthy: Fleet, s3_client: Any, bucket: str
) -> None:
    fleet = healthy
    bodies = [put_segment(s3_client, bucket, f"idx/many{i}", seed=i) for i in range(6)]
    ids = [submit(fleet.proxy.url, body) for body in bodies]
    for job_id in ids:
        assert wait_for("done", partial(finished, fleet.proxy.url, job_id))["task_status"] == (
            COMPLETED
        )
    spans: dict[str, list[tuple[int, int]]] = {}
    for job_id in ids:
        events = fleet.audit(job_id)
        starts = [e for e in events if e["event"] == "start"]
        ends = [e for e in events if e["event"] == "end"]
        assert len(starts) == 1 and len(ends) == 1, events  # one build per job
        assert ends[0]["state"] == "completed" and ends[0]["replica"] == starts[0]["replica"]
        spans.setdefault(starts[0]["replica"], []).append(
            (int(starts[0]["at"]), int(ends[0]["at"]))
        )
    for replica, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, (replica, intervals)  # one build slot: never two at once
    assert len(spans) >= 2  # the work spread over the fleet


def test_every_replica_answers_status_identically(
    healthy: Fleet, s3_client: Any, bucket: str
) -> None:
    fleet = healthy
    ids = [
        submit(fleet.replicas[i].url, put_segment(s3_client, bucket, f"idx/same{i}", seed=i))
        for i in range(2)
    ]
    missing = put_segment(s3_client, bucket, "idx/gone")
    s3_client.delete_object(Bucket=bucket, Key="idx/gone.knnvec")
    failed = submit(fleet.replicas[2].url, missing)
    for job_id in [*ids, failed]:
        wait_for("done", partial(finished, fleet.proxy.url, job_id))
    for job_id in [*ids, failed]:
        answers = [request("GET", f"{r.url}/_status/{job_id}") for r in fleet.replicas]
        assert {code for code, _, _ in answers} == {200}
        assert all(body == answers[0][2] for _, _, body in answers)
        assert set(answers[0][2]) == {"task_status", "file_name", "error_message"}
    for replica in fleet.replicas:
        assert request("GET", f"{replica.url}/_status/never-accepted")[0] == 404
        listing = request("GET", f"{replica.url}/_jobs")[2]
        assert {*ids, failed} <= set(listing)


def test_thirty_concurrent_identical_posts_make_one_job_and_one_build(
    healthy: Fleet, s3_client: Any, bucket: str
) -> None:
    fleet = healthy
    body = put_segment(s3_client, bucket, "idx/dup")
    with ThreadPoolExecutor(30) as pool:
        answers = list(
            pool.map(lambda _: request("POST", f"{fleet.proxy.url}/_build", body), range(30))
        )
    assert {code for code, _, _ in answers} == {200}
    [job_id] = {answer["job_id"] for _, _, answer in answers}
    assert wait_for("done", lambda: finished(fleet.proxy.url, job_id))["task_status"] == COMPLETED
    assert [e["event"] for e in fleet.audit(job_id)] == ["start", "end"]


def test_cancel_through_another_replica_stops_the_owner(
    healthy: Fleet, s3_client: Any, bucket: str
) -> None:
    fleet = healthy
    job_id = submit(fleet.proxy.url, put_segment(s3_client, bucket, "idx/cancel"))
    owner = wait_for("mid-build", lambda: building(fleet.proxy.url, job_id))["owner"]
    other = fleet.others(owner)[-1]
    code, _, answer = request("DELETE", f"{other.url}/_jobs/{job_id}")
    assert code == 202 and answer["cancel_requested"] is True and answer["owner"] == owner
    final = wait_for("cancelled", lambda: finished(other.url, job_id))
    assert final == {
        "task_status": FAILED,
        "file_name": None,
        "error_message": "cancelled by operator",
    }
    [end] = [e for e in fleet.audit(job_id) if e["event"] == "end"]
    assert end["replica"] == owner and end["state"] == "cancelled"
    # Its own outcome is no lost lease (a heartbeat may race the recording).
    assert f"job {job_id} attempt 1 fenced" not in fleet.by_id(owner).log()
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix="idx/cancel.faiss")
    assert not listing.get("Contents")
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_a_paused_owner_is_fenced_and_records_nothing(
    healthy: Fleet, s3_client: Any, bucket: str
) -> None:
    fleet = healthy
    job_id = submit(fleet.proxy.url, put_segment(s3_client, bucket, "idx/fence"))
    # Read from the replicas directly: a paused process holds the proxy's requests.
    first = fleet.replicas[0].url
    zombie = wait_for("mid-build", lambda: building(first, job_id))["owner"]
    witness = fleet.others(zombie)[0]
    fleet.by_id(zombie).signal(signal.SIGSTOP)
    try:
        taken = wait_for(
            "taken over",
            lambda: (job := detail(witness.url, job_id))["attempt"] == 2 and job["owner"] and job,
        )
    finally:
        fleet.by_id(zombie).signal(signal.SIGCONT)
    assert taken["owner"] != zombie
    final = wait_for("done", lambda: finished(witness.url, job_id))
    assert final["task_status"] == COMPLETED
    events = [(e["event"], e["attempt"], e["replica"]) for e in fleet.audit(job_id)]
    assert [e for e in events if e[0] == "end"] == [("end", "2", taken["owner"])]
    # The old owner stopped at its next checkpoint and said why.
    zombie_log = fleet.by_id(zombie)
    wait_for("fenced logged", lambda: f"job {job_id} attempt 1 fenced" in zombie_log.log())
    assert f"job {job_id} completed" not in zombie_log.log()
    assert_loads_with_ids(s3_client, bucket, "idx/fence")


def test_sigterm_hands_running_work_back(healthy: Fleet, s3_client: Any, bucket: str) -> None:
    fleet = healthy
    job_id = submit(fleet.proxy.url, put_segment(s3_client, bucket, "idx/term"))
    owner = wait_for("mid-build", lambda: building(fleet.proxy.url, job_id))["owner"]
    fleet.by_id(owner).terminate()
    final = wait_for("done", lambda: finished(fleet.proxy.url, job_id))
    assert final["task_status"] == COMPLETED
    events = [(e["event"], e["attempt"], e["replica"]) for e in fleet.audit(job_id)]
    assert events[:2] == [("start", "1", owner), ("released", "1", owner)]
    assert events[2][:2] == ("start", "2") and events[2][2] != owner
    # Handed back, not interrupted: it does not count against RVIB_MAX_ATTEMPTS.
    assert fleet.client.hget(job_key(job_id), "interrupted") == "0"


def test_redis_outage_answers_503_never_404_and_every_job_completes(
    healthy: Fleet, s3_client: Any, bucket: str
) -> None:
    fleet = healthy
    ids = [
        submit(fleet.proxy.url, put_segment(s3_client, bucket, f"idx/out{i}", seed=i))
        for i in range(3)
    ]
    for job_id in ids:  # each replica has answered for each job once
        for replica in fleet.replicas:
            assert request("GET", f"{replica.url}/_status/{job_id}")[0] == 200
    wait_for("a build running", lambda: any(building(fleet.proxy.url, j) for j in ids))
    fleet.redis.kill()
    code, headers, _ = request(
        "POST", f"{fleet.proxy.url}/_build", put_segment(s3_client, bucket, "idx/during")
    )
    assert code == 503 and headers["retry-after"] == str(RETRY_AFTER_S)
    for job_id in ids:
        for replica in fleet.replicas:
            code, _, body = request("GET", f"{replica.url}/_status/{job_id}")
            assert code == 200 and body["task_status"] in (RUNNING, COMPLETED), body
    code, headers, _ = request("GET", f"{fleet.proxy.url}/_status/never-accepted")
    assert code == 503 and headers["retry-after"] == str(RETRY_AFTER_S)
    for replica in fleet.replicas:
        assert request("GET", f"{replica.url}/_ready")[0] == 200
    POLL.wait(LEASE_S)  # builds go on meanwhile; leases run out on the (dead) server
    fleet.redis.start()  # same port, same append-only file
    for job_id in ids:
        final = wait_for("done", partial(finished, fleet.proxy.url, job_id), polls=1200)
        assert final["task_status"] == COMPLETED, final
    assert submit(fleet.proxy.url, put_segment(s3_client, bucket, "idx/after"))
