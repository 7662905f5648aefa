"""The chaos run's fleet: what is started, and the record of what was done to it.

The fleet is ``fleet_harness``'s: replica processes (the real app and CPU
builder, slowed per batch so faults land mid-build) on a real redis-server
(append-only file on), behind its round-robin proxy; S3 is a SeaweedFS server
the replicas reach through ``faultproxy.FaultProxy``. The faults themselves
are ``chaos_faults``'s; every episode, process lifetime and pause lands in the
``Timeline`` the checks read.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from testbed.faultproxy import FaultProxy
from testbed.fleet_harness import (
    RedisServer,
    Replica,
    RoundRobinProxy,
    free_port,
)

MIB = 2**20
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
    # The final round (one job per replica and more); the wait ends when they do. 60 s ran
    # out under a load average of 11 (other builds on the same 2 cores).
    final_s: float = 180.0
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
