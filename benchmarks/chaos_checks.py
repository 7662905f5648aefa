"""The chaos run's verdict: what must hold after it, each as a figure and a pass/fail.

* every accepted job ended (the poller saw a terminal ``/_status``);
* no ``/_status`` poll answered 404 while its job lived, and no answer was a
  500 or a 503 without ``Retry-After``;
* no two builds of one job overlapped: each build is a build thread's span in
  a replica's JSON log (``job <id> attempt <n>: build thread started`` /
  ``ended``, or the process's death), less the time its replica was stopped;
  an owner resumed from SIGSTOP that ends without starting another stage or
  recording anything is the fence at work, counted apart;
* every COMPLETED file loads in Faiss, holds the job's doc ids in order, and
  its recall@k recomputed here matches its quality report;
* every bad request was refused (4xx) or ended as the table of expectations says;
* no replica exited on its own, no job failed with an unexpected error;
* no incomplete multipart upload is left in the bucket;
* Redis holds a bounded number of keys (see ``redis_keys``);
* every replica still claims jobs after the chaos.
"""

from __future__ import annotations

import json
import re
import signal
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.chaos_fleet import Timeline
from remote_vector_index_builder.app.fleet_store import INTERRUPTED_MESSAGE
from remote_vector_index_builder.core import quality

COMPLETED = "COMPLETED_INDEX_BUILD"
# The fleet's failure once every attempt's replica was killed or paused past its lease.
INTERRUPTED = INTERRUPTED_MESSAGE.split("%d", 1)[0]
FAILED = "FAILED_INDEX_BUILD"
# Recall recomputed here against the report's: the same index, sample and ef_search
# give the same figure; the margin is for the few ties of float distances.
RECALL_TOLERANCE = 0.005
# Keys that exist whatever the jobs: queue, leases, jobs index, replica registry, audit.
FIXED_KEYS = 5
# Slack on the job-key bound: the poller sees a job end up to a round after it did.
KEY_SLACK_S = 5.0
# What a bad request may become: refused with a 4xx, or accepted and ended so.
EXPECTED: dict[str, frozenset[str]] = {
    "m1": frozenset({"rejected", "failed"}),
    "nested200": frozenset({"rejected", "failed", "completed"}),
    "nested260": frozenset({"rejected"}),
    "huge_ef": frozenset({"rejected", "completed"}),
    "wrong_count": frozenset({"rejected", "failed"}),
    "wrong_dim": frozenset({"rejected", "failed"}),
    "unknown_bucket": frozenset({"rejected", "failed"}),
    "missing_object": frozenset({"rejected", "failed"}),
    "bad_json": frozenset({"rejected"}),
    "bad_space": frozenset({"rejected"}),
}
_SIGNALS = {int(s) for s in signal.Signals}
_THREAD = re.compile(r"^job (\w+) attempt (\d+): build thread (started|ended)$")


@dataclass
class Tracked:
    """An accepted job, as the poller saw it."""

    job_id: str
    kind: str  # small, large, final, or a bad-request kind
    body: dict[str, Any]
    segment: str | None  # which base vectors its blob holds (None: no readable blob)
    doc_ids: np.ndarray | None
    accepted_at: float
    status: str | None = None  # the terminal task_status, once seen
    ended_at: float | None = None
    detail: dict[str, Any] | None = None  # GET /_jobs/{id} when it ended
    polls: int = 0
    lost: list[float] = field(default_factory=list)  # 404 while it lived

    @property
    def index_key(self) -> str:
        return str(self.body["vector_path"])[: -len(".knnvec")] + ".faiss"


@dataclass
class Answers:
    """Every HTTP answer the run got: ``(what, status)`` counts and the odd ones."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    odd: Counter[str] = field(default_factory=Counter)  # 500s, 503s without Retry-After
    # Bad requests: (kind, final status or "error", vector_path).
    posts: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    name: str
    figure: str
    passed: bool
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Build:
    replica: str
    job_id: str
    attempt: int
    started: float
    ended: float
    how: str  # "ended", or how its process ended


def _entries(log_text: str) -> list[dict[str, Any]]:
    out = []
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue  # a traceback or a native library's own line
        try:
            entry = json.loads(line)
            entry["t"] = datetime.fromisoformat(entry["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        out.append(entry)
    return out


def builds_of(replica: str, entries: list[dict[str, Any]], timeline: Timeline) -> list[Build]:
    """Build-thread spans of one replica; one without its end line ends with its process."""
    open_: dict[tuple[str, int], float] = {}
    done: list[Build] = []
    for entry in entries:
        match = _THREAD.match(str(entry.get("message", "")))
        if match is None:
            continue
        key = (match.group(1), int(match.group(2)))
        if match.group(3) == "started":
            open_[key] = entry["t"]
        elif key in open_:
            done.append(Build(replica, *key, open_.pop(key), entry["t"], "ended"))
    lives = timeline.incarnations.get(replica, [])
    for (job_id, attempt), started in open_.items():
        # The process that logged it: the last one started before the line.
        life = next((x for x in reversed(lives) if x.started <= started), None)
        if life is None or life.ended is None:
            done.append(Build(replica, job_id, attempt, started, float("inf"), "still running"))
        else:
            done.append(Build(replica, job_id, attempt, started, life.ended, life.how))
    return done


def _minus(
    span: tuple[float, float], holes: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    pieces = [span]
    for lo, hi in holes:
        nxt = []
        for a, b in pieces:
            if hi <= a or lo >= b:
                nxt.append((a, b))
                continue
            if a < lo:
                nxt.append((a, lo))
            if hi < b:
                nxt.append((hi, b))
        pieces = nxt
    return pieces


def _overlap(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in x for c, d in y)


def overlaps(
    builds: list[Build], logs: dict[str, list[dict[str, Any]]], timeline: Timeline
) -> tuple[list[str], list[str]]:
    """``(overlaps, fenced resumes)``: pairs of builds of one job that ran at once."""
    by_job: dict[str, list[Build]] = {}
    for build in builds:
        by_job.setdefault(build.job_id, []).append(build)
    bad: list[str] = []
    fenced: list[str] = []
    for job_id, runs in by_job.items():
        runs.sort(key=lambda b: b.started)
        for i, old in enumerate(runs):
            for new in runs[i + 1 :]:
                active_old = _minus((old.started, old.ended), timeline.stops[old.replica])
                active_new = _minus((new.started, new.ended), timeline.stops[new.replica])
                seconds = _overlap(active_old, active_new)
                if seconds <= 0:
                    continue
                text = (
                    f"job {job_id}: attempt {old.attempt} on {old.replica} and attempt "
                    f"{new.attempt} on {new.replica} built at once for {seconds:.2f} s"
                )
                if _fenced_resume(old, new, logs[old.replica], timeline):
                    fenced.append(text)
                else:
                    bad.append(text)
    return bad, fenced


def _fenced_resume(
    old: Build, new: Build, entries: list[dict[str, Any]], timeline: Timeline
) -> bool:
    """The old owner was paused while the job moved on, and after it resumed it only
    wound down: no new stage, no recorded outcome, before its thread ended."""
    if old.how != "ended":
        return False
    resumed = [
        hi for lo, hi in timeline.stops[old.replica] if old.started <= lo and hi <= old.ended
    ]
    if not resumed or max(resumed) > new.ended:
        return False
    after = max(resumed)
    for entry in entries:
        if entry.get("job_id") != old.job_id or not after < entry["t"] < old.ended:
            continue
        message = str(entry.get("message", ""))
        if message.startswith("stage ") and " started" in message:
            return False
        if message.startswith(f"job {old.job_id} completed"):
            return False
    return True


def crash_text(crash: dict[str, Any], builds: list[Build], kinds: dict[str, str]) -> str:
    """A replica's own exit, with the builds its process was running then."""
    code = int(crash["code"])
    name = f" ({signal.Signals(-code).name})" if code < 0 and -code in _SIGNALS else ""
    running = sorted(
        f"{b.job_id} attempt {b.attempt} ({kinds.get(b.job_id, 'untracked')})"
        for b in builds
        if b.replica == crash["replica"] and b.how == f"exit {code}" and b.ended == crash["at"]
    )
    return (
        f"{crash['replica']} exited with {code}{name} while building "
        f"{', '.join(running) or 'nothing'}"
    )


def verify_file(job: Tracked, blob: bytes, vectors: np.ndarray) -> list[str]:
    """Problems with one COMPLETED job's index file (none: it is the one it should be)."""
    problems = []
    try:
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    except RuntimeError as exc:
        return [f"job {job.job_id} ({job.kind}): the index does not load: {exc}"]
    # deserialize_index gives the concrete class; a downcast wrapper would not own it.
    if not isinstance(index, faiss.IndexIDMap):
        return [f"job {job.job_id} ({job.kind}): not an ID map but {type(index).__name__}"]
    ids = faiss.vector_to_array(index.id_map)
    assert job.doc_ids is not None
    if not np.array_equal(ids, job.doc_ids.astype(np.int64)):
        problems.append(f"job {job.job_id} ({job.kind}): the id map is not the job's doc ids")
    report = (job.detail or {}).get("quality")
    if report is None:
        problems.append(f"job {job.job_id} ({job.kind}): COMPLETED without a quality report")
        return problems
    params = job.body["index_parameters"]
    recall = recall_of(
        index, vectors, params["space_type"], int(report["k"]), int(report["ef_search"])
    )
    if abs(recall - float(report["recall"])) > RECALL_TOLERANCE:
        problems.append(
            f"job {job.job_id} ({job.kind}): recall@{report['k']} is {recall:.4f} in the file, "
            f"the report says {report['recall']:.4f}"
        )
    return problems


def recall_of(index: Any, vectors: np.ndarray, space: str, k: int, ef_search: int) -> float:
    """Recall@k of the file's HNSW on the quality report's sample, each row's own left out.

    The same sample rows as the service's report (its seeded sampler), searched
    here at ``min(ef_search, ntotal)`` (a larger ef finds nothing more) against
    exact neighbours over the vectors the job was sent.
    """
    inner = faiss.downcast_index(index.index)
    n = int(inner.ntotal)
    sample = quality.QuerySample.take(vectors)
    metric = faiss.METRIC_INNER_PRODUCT if space == "innerproduct" else faiss.METRIC_L2
    _, truth = faiss.knn(sample.rows, vectors, k + 1, metric)
    params = faiss.SearchParametersHNSW()
    params.efSearch = min(ef_search, n)
    _, found = inner.search(sample.rows, k + 1, params=params)
    hits = 0
    for row, position in enumerate(sample.positions):
        t = _drop_self(truth[row], int(position), k)
        f = _drop_self(found[row], int(position), k)
        hits += len(set(t) & set(f) - {-1})
    return hits / float(len(sample.positions) * k)


def _drop_self(labels: np.ndarray, position: int, k: int) -> list[int]:
    kept = [int(x) for x in labels if int(x) != position]
    return kept[:k]


def bad_request_outcomes(jobs: list[Tracked], answers: Answers) -> tuple[int, int, list[str]]:
    """``(handled, sent, problems)`` over the bad requests, against ``EXPECTED``."""
    handled, sent, problems = 0, 0, []
    accepted = {(j.kind, j.body.get("vector_path")): j for j in jobs if j.kind in EXPECTED}
    for kind, code, path in answers.posts:
        sent += 1
        error = ""
        if code.startswith("4"):
            outcome = "rejected"
        elif code == "200":
            job = accepted.get((kind, path))
            status = None if job is None else job.status
            outcome = {COMPLETED: "completed", FAILED: "failed"}.get(status or "", "never ended")
            error = str(((job and job.detail) or {}).get("error_message") or "")
            if outcome == "failed" and error.startswith(INTERRUPTED):
                # The kills and pauses ended it, as they may end a good job: not the request.
                outcome = "interrupted by the faults"
        else:
            outcome = f"answered {code}"
        if outcome in EXPECTED[kind] or outcome == "interrupted by the faults":
            handled += 1
        else:
            if error:
                outcome = f"{outcome} ({error})"
            problems.append(f"{kind}: {outcome}, expected {' or '.join(sorted(EXPECTED[kind]))}")
    return handled, sent, problems


def redis_keys(
    client: Any, jobs: list[Tracked], ttl_s: float, replicas: int, now: float
) -> tuple[Check, dict[str, int]]:
    """Keys in Redis against their bound.

    Bound: ``FIXED_KEYS`` + one registration per replica + one hash per job that
    has not ended or ended less than ``REQUEST_STORE_TTL_SECONDS`` ago (a job's
    hash expires that long after it ends; nothing else is per job). The jobs
    index ``{rvib}:jobs`` may hold no more ids than there are such jobs.
    """
    keys = [str(k) for k in client.scan_iter(count=1000)]
    job_keys = [k for k in keys if k.startswith("{rvib}:job:")]
    members = int(client.zcard("{rvib}:jobs"))
    recent = sum(1 for j in jobs if j.ended_at is None or j.ended_at >= now - ttl_s - KEY_SLACK_S)
    bound = FIXED_KEYS + replicas + recent
    figures = {
        "keys": len(keys),
        "job_keys": len(job_keys),
        "jobs_index": members,
        "bound": bound,
        "live_or_recent_jobs": recent,
        "accepted": len(jobs),
    }
    problems = []
    if len(keys) > bound:
        problems.append(f"{len(keys)} keys, bound {bound}")
    if members > recent:
        problems.append(
            f"{{rvib}}:jobs holds {members} ids for {recent} jobs that can still exist "
            f"({len(job_keys)} job hashes left)"
        )
    others = sorted(
        k for k in keys if not k.startswith("{rvib}:job:") and not k.startswith("{rvib}:replica:")
    )
    if len(others) > FIXED_KEYS:
        problems.append(f"unexpected keys: {others}")
    figure = (
        f"{len(keys)} keys (bound {bound}); {{rvib}}:jobs {members} ids, {len(job_keys)} "
        f"job hashes, {recent} jobs live or ended < TTL ago, {len(jobs)} accepted"
    )
    return Check("Redis keys bounded", figure, not problems, tuple(problems)), figures


def load_logs(paths: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    return {
        replica: _entries(path.read_text(errors="replace")) if path.exists() else []
        for replica, path in paths.items()
    }


def table(result: dict[str, Any]) -> list[str]:
    """The run's figures and checks as markdown (the benchmark section and the test print it)."""
    lines = [
        f"### 7. Chaos run (seed {result['seed']}, {result['chaos_s']:.0f} s of faults, "
        f"{result['replicas']} replicas, lease {result['lease_s']:.0f} s)",
        "",
        "| injected | episodes | detail |",
        "| --- | ---: | --- |",
    ]
    for row in result["injected"]:
        lines.append(f"| {row['what']} | {row['episodes']} | {row['detail']} |")
    lines += [
        "",
        "| traffic | figure |",
        "| --- | --- |",
    ]
    for what, figure in result["requests"]:
        lines.append(f"| {what} | {figure} |")
    lines += [
        "",
        "| check | figure | result |",
        "| --- | --- | --- |",
    ]
    for check in result["checks"]:
        verdict = "pass" if check["passed"] else "FAIL"
        lines.append(f"| {check['name']} | {check['figure']} | {verdict} |")
    failed = [c for c in result["checks"] if not c["passed"]]
    if failed:
        lines += ["", "Failures (first 8 of each):", ""]
        for check in failed:
            for problem in check["problems"][:8]:
                lines.append(f"- {check['name']}: {problem}")
    if result.get("harness_errors"):
        lines += ["", "Harness errors:", ""] + [f"- {e}" for e in result["harness_errors"]]
    return lines
