"""The chaos run's faults: three injector threads and a crash watcher.

Each injector owns one component and its own random stream drawn from the
run's seed, and takes turns through its fault kinds (every kind once before
any repeats), one episode at a time:

* replicas: ``kill -9`` (restarted after a moment), ``SIGSTOP`` past the lease
  then ``SIGCONT``;
* Redis: ``kill -9`` and a restart from the append-only file; out of memory
  (``CONFIG SET maxmemory 1``); MISCONF (a ``BGSAVE`` into a removed directory
  with RDB saving and ``stop-writes-on-bgsave-error`` on);
* S3: connection resets of part uploads and of downloads, a stalled download,
  a lost ``CompleteMultipartUpload`` answer (applied, answer cut), 503 SlowDown.

The crash watcher restarts any replica that exits without being told to and
records it.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import redis

from benchmarks.chaos_fleet import ChaosFleet
from testbed.faultproxy import Fault
from testbed.fleet_harness import Replica

PROCESS_KINDS = ("kill9", "sigstop")
REDIS_KINDS = ("redis_restart", "redis_oom", "redis_misconf")
S3_KINDS = ("s3_reset_part", "s3_reset_download", "s3_stall", "s3_lost_complete", "s3_slowdown")
FAULT_KINDS = PROCESS_KINDS + REDIS_KINDS + S3_KINDS


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
