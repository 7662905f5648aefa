"""The jobs this replica owns in fleet mode: their leases, fencing and recorded outcomes.

This is the runner's ``JobLedger`` in fleet mode. The attempt number a job
was claimed with fences it: a build whose lease another replica took over
stops at its next checkpoint and records nothing. Entries are held by
``(job id, attempt)``: a replica whose lease lapsed and that claims the same
job again holds two attempts of it for a while, and only the newest may go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from remote_vector_index_builder.app.fleet_health import FleetMetrics
from remote_vector_index_builder.app.fleet_store import (
    FleetStore,
    StatusCache,
    progress_json,
)
from remote_vector_index_builder.app.jobs import Clock, Job, Outcome
from remote_vector_index_builder.core.errors import CancelledError, JobStoreUnavailableError

log = logging.getLogger(__name__)

FENCED_MESSAGE = "another replica took this job over after this replica's lease expired"


@dataclass
class Owned:
    """A job this replica holds the lease of, with the attempt that fences it."""

    job: Job
    attempt: int
    renewed_at: float  # monotonic, of the last renewal Redis accepted
    lost: bool = False


class Leases:
    """The jobs this replica owns, by lease: the runner's ledger in fleet mode.

    ``record`` records through the fenced ``complete`` script and, while Redis is
    unreachable or refuses writes, keeps retrying (the lease is still renewed
    meanwhile, so no other replica takes the job): the index is in S3 already and
    the client keeps seeing RUNNING until the outcome is recorded. Whatever else
    goes wrong, the job leaves this replica's hands: its lease then runs out and
    the reaper queues it again, instead of a heartbeat renewing it for ever.
    """

    def __init__(
        self,
        store: FleetStore,
        cache: StatusCache,
        metrics: FleetMetrics,
        clock: Clock,
        on_release: Callable[[], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.on_release = on_release
        # When renewals happened (a seam: tests move it instead of waiting out a lease).
        self.monotonic = monotonic
        self.closing = threading.Event()
        self._owned: dict[tuple[str, int], Owned] = {}
        self._lock = threading.Lock()

    def own(self, job: Job) -> None:
        """Hold ``job``, claimed as attempt ``job.attempt``; an older attempt here is fenced."""
        entry = Owned(job, job.attempt, self.monotonic())
        with self._lock:
            older = [e for k, e in self._owned.items() if k[0] == job.id and not e.lost]
            self._owned[(job.id, job.attempt)] = entry
        for old in older:
            self.lose(
                old, why=f"this replica claimed attempt {job.attempt} after its lease expired"
            )

    def _entry(self, job: Job) -> Owned | None:
        """``job``'s entry (this very attempt, not another one of the same id); under the lock."""
        entry = self._owned.get((job.id, job.attempt))
        return entry if entry is not None and entry.job is job else None

    def owned(self) -> list[Owned]:
        with self._lock:
            return list(self._owned.values())

    def active(self) -> list[Job]:
        with self._lock:
            return [entry.job for entry in self._owned.values() if not entry.lost]

    def _take(self, job: Job) -> Owned | None:
        with self._lock:
            entry = self._entry(job)
            if entry is not None:
                del self._owned[(job.id, job.attempt)]
            return entry

    def lose(
        self, entry: Owned, *, recorded_elsewhere: bool = False, why: str = FENCED_MESSAGE
    ) -> None:
        """Another replica owns the job now: stop at the next checkpoint, record nothing.

        A renewal refused because this replica has just recorded the outcome itself
        (a heartbeat racing ``finish``) is no loss: the entry is gone by then.
        """
        with self._lock:
            held = self._owned.get((entry.job.id, entry.attempt))
            if not recorded_elsewhere and held is not entry:
                return
            first = not entry.lost
            entry.lost = True
        entry.job.cancel_requested.set()
        if first:
            self.metrics.leases_lost.inc()
            log.warning(
                "job %s attempt %d fenced: %s; this replica stops it and records nothing",
                entry.job.id,
                entry.attempt,
                why,
            )

    def renewed(self, entry: Owned, cancel: bool) -> None:
        with self._lock:
            entry.renewed_at = self.monotonic()
        if cancel:
            entry.job.cancel_requested.set()

    def cancel_local(self, job_id: str) -> None:
        with self._lock:
            entries = [entry for key, entry in self._owned.items() if key[0] == job_id]
        for entry in entries:
            entry.job.cancel_requested.set()

    def checkpoint(self, job: Job) -> None:
        """Between batches and parts: a build whose lease may have lapsed asks Redis first.

        A process paused past its lease (SIGSTOP, a VM stall) resumes here before
        its heartbeat thread has noticed; it must not do another batch unfenced.
        """
        with self._lock:
            entry = self._entry(job)
            stale = entry is not None and (
                self.monotonic() - entry.renewed_at > self.store.config.lease_s / 2
            )
        if entry is not None and stale and not entry.lost:
            snap = job.snapshot()
            try:
                [(kept, cancel)] = self.store.renew(
                    [(job.id, entry.attempt, "", progress_json(snap), snap.device or "")]
                )
            except JobStoreUnavailableError:
                kept, cancel = None, False  # unreachable is not lost: build on
            except Exception:
                # Not the build's fault: build on (the heartbeat keeps trying).
                log.exception("job %s: renewing its lease failed; building on", job.id)
                kept, cancel = None, False
            if kept:
                self.renewed(entry, cancel)
            elif kept is not None:
                self.lose(entry)
        if entry is not None and entry.lost:
            raise CancelledError(FENCED_MESSAGE)

    def commit_check(self, job: Job) -> None:
        """Right before the index becomes visible in S3: confirm the lease now.

        Another replica may own the job (its lease ran out while this one was cut
        off from Redis but not from S3): the upload must stop rather than replace
        that replica's file. Renewed synchronously; raises ``CancelledError`` (the
        build records nothing) when the lease is lost, or when Redis cannot confirm
        it and the last confirmation is a whole lease old. A shorter outage is no
        loss: nobody can have taken the job over yet.
        """
        with self._lock:
            entry = self._entry(job)
        if entry is None or entry.lost:
            raise CancelledError(FENCED_MESSAGE)  # no longer this replica's to commit
        snap = job.snapshot()
        try:
            [(kept, cancel)] = self.store.renew(
                [(job.id, entry.attempt, "", progress_json(snap), snap.device or "")]
            )
        except Exception as exc:
            if not isinstance(exc, JobStoreUnavailableError):
                log.exception("job %s: confirming its lease before the upload failed", job.id)
            with self._lock:
                unconfirmed_s = self.monotonic() - entry.renewed_at
            if unconfirmed_s < self.store.config.lease_s:
                return
            why = (
                f"its lease went unconfirmed for {unconfirmed_s:.0f} s (RVIB_LEASE_SECONDS is "
                f"{self.store.config.lease_s:g}) and another replica may own the job now"
            )
            self.lose(entry, why=why)
            raise CancelledError(why) from exc
        if not kept:
            self.lose(entry)
            raise CancelledError(FENCED_MESSAGE)
        self.renewed(entry, cancel)

    def record(self, job: Job, outcome: Outcome) -> bool:
        with self._lock:
            entry = self._entry(job)
        if entry is None:
            return False
        if entry.lost:
            self._take(job)  # its build has ended: nothing is left to fence
            return False
        if not job.end(outcome, self.clock()):
            return False
        snap = job.snapshot()
        recorded: bool | None = None
        try:
            recorded = self._complete(
                entry, outcome, device=snap.device, progress=progress_json(snap)
            )
        except Exception:
            log.exception(
                "job %s attempt %d: recording its outcome (%s) failed; it runs again once "
                "its lease expires",
                job.id,
                entry.attempt,
                outcome.state.value,
            )
        finally:
            self._take(job)
            self.on_release()
        if recorded:
            self.cache.put(job.id, snap.status_body())
            return True
        if recorded is False:
            self.lose(entry, recorded_elsewhere=True)
        return False

    def _complete(
        self, entry: Owned, outcome: Outcome, *, device: str | None, progress: str
    ) -> bool | None:
        """The ``complete`` script, retried while Redis cannot serve: recorded, fenced (False),
        or None when the replica shuts down first."""
        delay = 0.1
        job_id = entry.job.id
        while True:
            try:
                return self.store.complete(
                    job_id, entry.attempt, outcome, device=device, progress=progress
                )
            except JobStoreUnavailableError:
                if self.closing.wait(delay):
                    log.error(
                        "job %s: shutting down while Redis cannot serve; the outcome (%s) is "
                        "not recorded and the job will run again elsewhere once its lease "
                        "expires",
                        job_id,
                        outcome.state.value,
                    )
                    return None
                delay = min(delay * 2, 2.0)

    def hand_back(self, job: Job) -> bool:
        """Shutdown: re-queue the job for another replica (not counted as an interruption)."""
        entry = self._take(job)
        if entry is None:
            return True  # nothing left to record here
        entry.lost = True
        try:
            self.store.release(job.id, entry.attempt)
        except JobStoreUnavailableError:
            log.warning("job %s: Redis cannot serve; its lease will expire instead", job.id)
        except Exception:
            log.exception("job %s: handing it back failed; its lease will expire instead", job.id)
        return True
