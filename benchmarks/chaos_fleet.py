"""The chaos run's fleet and its faults: what is started, what is done to it, and when.

The fleet is ``fleet_harness``'s: replica processes (the real app and CPU
builder, slowed per batch so faults land mid-build) on a real redis-server
(append-only file on), behind its round-robin proxy; S3 is a SeaweedFS server
the replicas reach through ``faultproxy.FaultProxy``. Three injector threads,
one per component, each with its own random stream drawn from the run's seed,
take turns through their fault kinds (every kind once before any repeats):

* replicas: ``kill -9`` (restarted after a moment), ``SIGSTOP`` past the lease
  then ``SIGCONT``;
* Redis: ``kill -9`` and a restart from the append-only file; out of memory
  (``CONFIG SET maxmemory 1``); MISCONF (a ``BGSAVE`` into a removed directory
  with RDB saving and ``stop-writes-on-bgsave-error`` on);
* S3: connection resets of part uploads and of downloads, a stalled download,
  a lost ``CompleteMultipartUpload`` answer (applied, answer cut), 503 SlowDown.

A fourth thread restarts any replica that exits without being told to (a
crash) and records it. Every episode, process lifetime and pause lands in the
``Timeline`` the checks read.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from test_remote_vector_index_builder.faultproxy import Fault, FaultProxy
from test_remote_vector_index_builder.fleet_harness import (
    RedisServer,
    Replica,
    RoundRobinProxy,
    free_port,
)

MIB = 2**20
PROCESS_KINDS = ("kill9", "sigstop")
REDIS_KINDS = ("redis_restart", "redis_oom", "redis_misconf")
S3_KINDS = ("s3_reset_part", "s3_reset_download", "s3_stall", "s3_lost_complete", "s3_slowdown")
FAULT_KINDS = PROCESS_KINDS + REDIS_KINDS + S3_KINDS
# How long the round-robin proxy waits on one replica before it tries the next: a
# paused replica accepts connections and never answers.
BACKEND_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ChaosConfig:
    seed: int
    chaos_s: float  # how long faults and traffic run
    work_dir: Path
    s3_endpoint: str  # the S3 server itself; replicas reach it through the fault proxy
    region: str = "us-east-1"
    replicas: int = 3
    # test_fleet's reasoning: on a loaded 2-core machine a live replica starved of
    # CPU for 1.5 s lost jobs it was still building; 4 s leaves room under chaos.
    lease_s: float = 4.0
    heartbeat_s: float = 0.25
    batch_rows: int = 500
    batch_delay_s: float = 0.2
    # Finished jobs expire this soon so that the run outlives its first jobs' keys.
    ttl_s: float = 30.0
    s3_read_timeout_s: float = 3.0
    drain_s: float = 90.0  # after the chaos: how long accepted jobs get to end (at least)
    final_s: float = 60.0  # the final round (one job per replica and more)
    exclude: frozenset[str] = frozenset()  # fault or bad-request kinds left out
    # RLIMIT_AS per replica: a huge ef_search must fail there, not take the machine.
    address_space_bytes: int = 6 * 2**30

    @property
    def drain_limit_s(self) -> float:
        """How long accepted jobs get to end after the chaos: a long run may leave a
        longer queue behind (still bounded: the wait ends when they have all ended)."""
        return max(self.drain_s, self.chaos_s / 2)


@dataclass
class Episode:
    kind: str
    target: str  # a replica id, "redis", or the S3 requests the fault matched
    started: float
    ended: float | None = None
    hits: int | None = None  # S3 faults: requests it was applied to
    note: str = ""


@dataclass
class Incarnation:
    """One process of a replica: from its start to its kill, crash or the run's end."""

    started: float
    ended: float | None = None
    how: str = ""


@dataclass
class Timeline:
    """What was done to the fleet, in wall-clock time (the replicas' log timestamps)."""

    episodes: list[Episode] = field(default_factory=list)
    incarnations: dict[str, list[Incarnation]] = field(default_factory=dict)
    stops: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, kind: str, target: str) -> Episode:
        episode = Episode(kind, target, time.time())
        with self.lock:
            self.episodes.append(episode)
        return episode

    def end(self, episode: Episode, **changes: Any) -> None:
        with self.lock:
            episode.ended = time.time()
            for name, value in changes.items():
                setattr(episode, name, value)

    def error(self, text: str) -> None:
        with self.lock:
            self.harness_errors.append(text)


class ChaosFleet:
    """Redis, the S3 fault proxy, the replicas and the proxy in front of them."""

    def __init__(self, config: ChaosConfig, timeline: Timeline) -> None:
        self.config = config
        self.timeline = timeline
        root = config.work_dir
        self.redis = RedisServer(root / "redis", appendonly=True)
        self.s3 = FaultProxy(config.s3_endpoint)
        self.replicas: list[Replica] = []
        for i in range(config.replicas):
            replica_id = f"c{i}"
            port = free_port()
            self.replicas.append(
                Replica(
                    replica_id,
                    port,
                    self._settings(replica_id, port),
                    root / f"{replica_id}.log",
                    config.batch_delay_s,
                    address_space_bytes=config.address_space_bytes,
                )
            )
            timeline.incarnations[replica_id] = []
            timeline.stops[replica_id] = []
        self.locks = {r.replica_id: threading.Lock() for r in self.replicas}
        self.lb = RoundRobinProxy([r.url for r in self.replicas], timeout_s=BACKEND_TIMEOUT_S)

    def _settings(self, replica_id: str, port: int) -> dict[str, Any]:
        c = self.config
        return {
            "host": "127.0.0.1",
            "port": port,
            "s3_endpoint_url": self.s3.url,
            "s3_region": c.region,
            "s3_path_style": True,
            "s3_part_size": 5 * MIB,
            "s3_max_attempts": 3,
            "s3_connect_timeout_s": 2.0,
            "s3_read_timeout_s": c.s3_read_timeout_s,
            "device": "cpu",
            "max_workers": 1,
            "omp_threads": 1,
            "add_batch_rows": c.batch_rows,
            "build_nice": 0,
            "shutdown_grace_seconds": 0,
            "redis_url": self.redis.url,
            "replica_id": replica_id,
            "lease_seconds": c.lease_s,
            "heartbeat_seconds": c.heartbeat_s,
            "max_attempts": 3,
            "redis_retry_after_seconds": 2,
            "request_store_ttl_seconds": c.ttl_s,
            "log_format": "json",
            "log_level": "INFO",
        }

    def redis_client(self) -> Any:
        return redis.Redis.from_url(self.redis.url, decode_responses=True, socket_timeout=10)

    def start(self) -> None:
        self.redis.start()
        for replica in self.replicas:
            self._spawn(replica)
        for replica in self.replicas:
            replica.wait_ready(120)

    def _spawn(self, replica: Replica) -> None:
        with self.timeline.lock:
            self.timeline.incarnations[replica.replica_id].append(Incarnation(time.time()))
        replica.start()

    def restart(self, replica: Replica) -> None:
        """Start ``replica`` again and wait until it answers; a failure is recorded."""
        self._spawn(replica)
        try:
            replica.wait_ready(120)
        except RuntimeError as exc:
            self.timeline.error(f"replica {replica.replica_id} did not come back: {exc}")

    def ended(self, replica: Replica, how: str) -> None:
        with self.timeline.lock:
            life = self.timeline.incarnations[replica.replica_id][-1]
            if life.ended is None:
                life.ended, life.how = time.time(), how

    def exited(self, replica: Replica) -> None:
        """``replica`` exited without being told to: a crash, recorded with its code."""
        assert replica.process is not None
        code = replica.process.returncode
        self.ended(replica, f"exit {code}")
        with self.timeline.lock:
            life = self.timeline.incarnations[replica.replica_id][-1]
            self.timeline.crashes.append(
                {"replica": replica.replica_id, "code": code, "at": life.ended}
            )
        replica.process = None

    def ready(self) -> None:
        """Every replica running and answering ``/_ready`` (one that crashed is restarted)."""
        for replica in self.replicas:
            with self.locks[replica.replica_id]:  # waits out a restart under way
                if replica.alive():
                    replica.signal(signal.SIGCONT)
                    try:
                        replica.wait_ready(120)
                    except RuntimeError as exc:
                        self.timeline.error(f"replica {replica.replica_id} not ready: {exc}")
                else:
                    if replica.process is not None:
                        self.exited(replica)
                    self.restart(replica)

    def heal(self) -> None:
        """Every fault undone: replicas running, Redis writable, S3 answering."""
        self.ready()
        if not self.redis.ping():
            self.redis.start()
        client = self.redis_client()
        client.config_set("maxmemory", 0)
        client.config_set("save", "")
        client.config_set("dir", str(self.redis.directory))
        self.s3.clear()
        self.s3.accept()

    def close(self) -> None:
        self.lb.close()
        for replica in self.replicas:
            if replica.process is not None:
                self.ended(replica, "end of run")
            replica.kill()
        self.s3.close()
        self.redis.kill()


class Injector(threading.Thread):
    """One component's faults, one episode at a time, until ``stop`` is set."""

    kinds: tuple[str, ...] = ()
    gap_s: tuple[float, float] = (2.0, 6.0)

    def __init__(self, fleet: ChaosFleet, seed: int, stop: threading.Event) -> None:
        super().__init__(name=f"chaos-{type(self).__name__}", daemon=True)
        self.fleet = fleet
        self.timeline = fleet.timeline
        self.config = fleet.config
        self.rng = random.Random(f"{seed}-{type(self).__name__}")
        self.stop = stop
        self.enabled = tuple(k for k in self.kinds if k not in fleet.config.exclude)

    def run(self) -> None:
        cycle: list[str] = []
        while self.enabled and not self.stop.wait(self.rng.uniform(*self.gap_s)):
            if not cycle:
                cycle = list(self.enabled)
                self.rng.shuffle(cycle)
            kind = cycle.pop()
            try:
                getattr(self, kind)()
            except Exception as exc:  # the run goes on; the table lists it
                self.timeline.error(f"{kind}: {type(exc).__name__}: {exc}")

    def hold(self, low: float, high: float) -> None:
        """Keep a fault on for a while (less once the chaos phase ends)."""
        self.stop.wait(self.rng.uniform(low, high))


class ProcessFaults(Injector):
    kinds = PROCESS_KINDS

    def _pick(self) -> Replica:
        return self.rng.choice(self.fleet.replicas)

    def kill9(self) -> None:
        replica = self._pick()
        with self.fleet.locks[replica.replica_id]:
            if not replica.alive():
                return
            episode = self.timeline.begin("kill9", replica.replica_id)
            replica.kill()  # SIGKILL
            self.fleet.ended(replica, "kill -9")
            self.hold(0.3, 2.0)
            self.fleet.restart(replica)
            self.timeline.end(episode)

    def sigstop(self) -> None:
        replica = self._pick()
        with self.fleet.locks[replica.replica_id]:
            if not replica.alive():
                return
            episode = self.timeline.begin("sigstop", replica.replica_id)
            stopped = time.time()
            replica.signal(signal.SIGSTOP)
            # Past the lease most of the time: the job is taken over while it sleeps.
            self.hold(0.5 * self.config.lease_s, 2.5 * self.config.lease_s)
            replica.signal(signal.SIGCONT)
            resumed = time.time()
            with self.timeline.lock:
                self.timeline.stops[replica.replica_id].append((stopped, resumed))
            self.timeline.end(episode, note=f"{resumed - stopped:.1f} s")


class RedisFaults(Injector):
    kinds = REDIS_KINDS
    gap_s = (3.0, 7.0)

    def redis_restart(self) -> None:
        episode = self.timeline.begin("redis_restart", "redis")
        self.fleet.redis.kill()
        self.hold(0.3, 2.0)
        self.fleet.redis.start()
        self.timeline.end(episode)

    def redis_oom(self) -> None:
        client = self.fleet.redis_client()
        episode = self.timeline.begin("redis_oom", "redis")
        client.config_set("maxmemory", 1)
        try:
            self.hold(2.0, 5.0)
        finally:
            client.config_set("maxmemory", 0)
            self.timeline.end(episode)

    def redis_misconf(self) -> None:
        """Writes refused with MISCONF: RDB saving on, and its last BGSAVE failed."""
        client = self.fleet.redis_client()
        episode = self.timeline.begin("redis_misconf", "redis")
        gone = Path(tempfile.mkdtemp(prefix="rvib-chaos-gone-"))
        try:
            client.config_set("stop-writes-on-bgsave-error", "yes")
            client.config_set("save", "3600 1")
            client.config_set("dir", str(gone))
            shutil.rmtree(gone)
            with contextlib.suppress(redis.ResponseError):  # one may already be running
                client.bgsave()
            deadline = time.monotonic() + 10
            while client.info("persistence")["rdb_last_bgsave_status"] != "err":
                if time.monotonic() > deadline or self.stop.wait(0.05):
                    break
            self.hold(2.0, 5.0)
        finally:
            client.config_set("dir", str(self.fleet.redis.directory))
            client.config_set("save", "")
            self.timeline.end(episode)


class S3Faults(Injector):
    kinds = S3_KINDS
    gap_s = (1.0, 4.0)

    def _apply(self, kind: str, fault: Fault) -> None:
        episode = self.timeline.begin(kind, f"{fault.method or '*'} {fault.target or '*'}")
        self.fleet.s3.add(fault)
        deadline = time.monotonic() + self.rng.uniform(6.0, 12.0)
        while fault.times is None or fault.hits < fault.times:
            if time.monotonic() > deadline or self.stop.wait(0.1):
                break
        self.fleet.s3.clear()
        self.timeline.end(episode, hits=fault.hits)

    def s3_reset_part(self) -> None:
        times = self.rng.randint(1, 2)
        fault = Fault("reset", method="PUT", target="partNumber=", at="request", times=times)
        self._apply("s3_reset_part", fault)

    def s3_reset_download(self) -> None:
        times = self.rng.randint(1, 2)
        self._apply("s3_reset_download", Fault("reset", method="GET", target=".knn", times=times))

    def s3_stall(self) -> None:
        # Longer than the replicas' read timeout: the client gives up and retries.
        stall = self.config.s3_read_timeout_s + 1
        fault = Fault("stall", method="GET", target=".knn", stall_s=stall, times=1)
        self._apply("s3_stall", fault)

    def s3_lost_complete(self) -> None:
        # Forwarded (S3 completes the object), then the answer is cut off by a reset.
        fault = Fault("reset", method="POST", target="uploadId=", at="response", times=1)
        self._apply("s3_lost_complete", fault)

    def s3_slowdown(self) -> None:
        fault = Fault("status", method="PUT", status=503, code="SlowDown", times=2)
        self._apply("s3_slowdown", fault)


class CrashWatcher(threading.Thread):
    """Restarts a replica that exited on its own (a crash) and records how it ended."""

    def __init__(self, fleet: ChaosFleet, stop: threading.Event) -> None:
        super().__init__(name="chaos-crash-watcher", daemon=True)
        self.fleet = fleet
        self.stop = stop

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for replica in self.fleet.replicas:
                lock = self.fleet.locks[replica.replica_id]
                if not lock.acquire(blocking=False):
                    continue  # an injector is working on it
                try:
                    self._check(replica)
                finally:
                    lock.release()

    def _check(self, replica: Replica) -> None:
        process = replica.process
        if process is None or process.poll() is None:
            return
        self.fleet.exited(replica)
        self.fleet.restart(replica)


def injectors(fleet: ChaosFleet, stop: threading.Event) -> list[Injector]:
    seed = fleet.config.seed
    return [cls(fleet, seed, stop) for cls in (ProcessFaults, RedisFaults, S3Faults)]


def described(kind: str) -> str:
    return _DESCRIPTIONS.get(kind, kind)


_DESCRIPTIONS: dict[str, str] = {
    "kill9": "kill -9 of a replica (restarted)",
    "sigstop": "SIGSTOP of a replica, then SIGCONT",
    "redis_restart": "Redis kill -9 and restart (append-only file)",
    "redis_oom": "Redis out of memory (maxmemory 1)",
    "redis_misconf": "Redis MISCONF (failed BGSAVE)",
    "s3_reset_part": "S3: part upload reset mid-body",
    "s3_reset_download": "S3: download reset mid-body",
    "s3_stall": "S3: download stalled past the read timeout",
    "s3_lost_complete": "S3: CompleteMultipartUpload applied, answer lost",
    "s3_slowdown": "S3: 503 SlowDown on uploads",
}
