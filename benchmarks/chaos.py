"""Section 7: the chaos run. Faults and bad requests against a fleet, then what must hold.

``python -m benchmarks.run --only chaos --chaos-minutes 10`` runs it for minutes;
``test_remote_vector_index_builder/test_chaos.py`` runs a minute of it in CI.
Both call ``run_chaos`` (the test with its own SeaweedFS, the benchmark with
the run's). Everything is on 127.0.0.1: the fleet and its faults are in
``chaos_fleet``, the checks in ``chaos_checks``.

Traffic, drawn from the seed before the run starts: good jobs (2,000 x 64
float, and one in five 6,000 x 768 float, whose 17.6 MiB storage section is
over the 15 MiB at which the index upload overlaps the build) mixed with the
bad requests of ``BAD_KINDS``, each kind at least once. A poller reads every
accepted job's ``/_status`` about once a second until it ends, as the k-NN
client does, and its ``/_jobs/{id}`` when it ends. After the chaos every
fault is undone, accepted jobs get ``drain_s`` to end, and a final round of
two jobs per replica shows which replicas still claim work.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import chaos_checks as checks
from benchmarks.chaos_checks import COMPLETED, FAILED, Answers, Check, Tracked
from benchmarks.chaos_fleet import (
    FAULT_KINDS,
    ChaosConfig,
    ChaosFleet,
    CrashWatcher,
    Timeline,
    described,
    injectors,
)
from remote_vector_index_builder.app.fleet_store import AUDIT
from test_remote_vector_index_builder.data import clustered, doc_id_blob, vector_blob
from test_remote_vector_index_builder.fleet_harness import request

BUCKET = "rvib-chaos"
SEGMENTS = {"small": (2000, 64), "large": (6000, 768)}
LARGE_SHARE = 0.2
# Seconds between good jobs (uniform); bad requests come on top, about one per
# BAD_EVERY_S seconds and each kind at least once. One good job a second was more
# than 3 one-slot replicas built under the faults on this 2-core machine (31 jobs
# queued after a minute, 29 s to drain): the run is about faults, not backlog.
GOOD_GAP_S = (1.0, 2.5)
BAD_EVERY_S = 6.0
POLL_ROUND_S = 1.0
HTTP_TIMEOUT_S = 15.0
# The k-NN client retries these answers (and a broken connection); so does the run.
RETRIED = {408, 409, 429, 500, 502, 503, 509}
POST_ATTEMPTS = 4
TERMINAL = {COMPLETED, FAILED}
BAD_KINDS = (
    "m1",
    "nested200",
    "nested260",
    "huge_ef",
    "wrong_count",
    "wrong_dim",
    "unknown_bucket",
    "missing_object",
    "bad_json",
    "bad_space",
)
_BAD_DESCRIPTIONS = {
    "m1": "m: 1 (Faiss's HNSW crashes on it)",
    "nested200": "algorithm_parameters extra nested 200 deep",
    "nested260": "algorithm_parameters extra nested 260 deep",
    "huge_ef": "ef_search 2^31-1",
    "wrong_count": "doc_count 5 more than the blob holds",
    "wrong_dim": "dimension twice the blob's",
    "unknown_bucket": "a bucket that does not exist",
    "missing_object": "a vector blob that does not exist",
    "bad_json": "a body that is not JSON",
    "bad_space": "space_type cosine",
}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value}
    return value


class Data:
    """Seeded base vectors in the bucket; each job gets its own copy and doc ids."""

    def __init__(self, client: Any, seed: int) -> None:
        self.client = client
        self.vectors = {
            name: clustered(n, dim, seed=seed + i)
            for i, (name, (n, dim)) in enumerate(SEGMENTS.items())
        }
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=BUCKET)
        for name, rows in self.vectors.items():
            client.put_object(Bucket=BUCKET, Key=f"base/{name}.knnvec", Body=vector_blob(rows))

    def segment(self, seq: int, name: str, tag: str) -> tuple[str, str, np.ndarray]:
        """A job's own vector blob (a server-side copy) and doc ids (unique to the job)."""
        n = SEGMENTS[name][0]
        stem = f"chaos/{seq:05d}-{tag}/seg"
        self.client.copy_object(
            Bucket=BUCKET,
            Key=f"{stem}.knnvec",
            CopySource={"Bucket": BUCKET, "Key": f"base/{name}.knnvec"},
        )
        doc_ids = (np.arange(n, dtype=np.int64) * 7 + seq * 100_000).astype(np.int32)
        self.client.put_object(Bucket=BUCKET, Key=f"{stem}.knndid", Body=doc_id_blob(doc_ids))
        return f"{stem}.knnvec", f"{stem}.knndid", doc_ids


def schedule(config: ChaosConfig) -> list[tuple[float, str]]:
    """``(seconds after the start, kind)`` of every request, drawn from the seed."""
    rng = random.Random(f"{config.seed}-traffic")
    plan: list[tuple[float, str]] = []
    t = rng.uniform(*GOOD_GAP_S)
    while t < config.chaos_s:
        plan.append((t, "large" if rng.random() < LARGE_SHARE else "small"))
        t += rng.uniform(*GOOD_GAP_S)
    kinds = [k for k in BAD_KINDS if k not in config.exclude]
    if kinds:
        rounds = max(1, round(config.chaos_s / BAD_EVERY_S / len(kinds)))
        bad = kinds * rounds
        rng.shuffle(bad)
        plan += [(rng.uniform(1.0, max(1.5, config.chaos_s - 5.0)), kind) for kind in bad]
    return sorted(plan)


class Traffic:
    """Submits the schedule through the proxy, and polls what was accepted."""

    def __init__(self, url: str, data: Data, seed: int) -> None:
        self.url = url
        self.data = data
        self.rng = random.Random(f"{seed}-bodies")
        self.jobs: list[Tracked] = []
        self.answers = Answers()
        self.lock = threading.Lock()
        self.seq = 0

    # -- requests --------------------------------------------------------------------------

    def _body(self, name: str, tag: str) -> tuple[dict[str, Any], np.ndarray]:
        self.seq += 1
        vector_key, doc_id_key, doc_ids = self.data.segment(self.seq, name, tag)
        n, dim = SEGMENTS[name]
        body = {
            "repository_type": "s3",
            "container_name": BUCKET,
            "vector_path": vector_key,
            "doc_id_path": doc_id_key,
            "tenant_id": "chaos",
            "dimension": dim,
            "doc_count": n,
            "data_type": "float",
            "index_parameters": {
                "space_type": self.rng.choice(["l2", "innerproduct"]),
                "algorithm_parameters": {
                    "m": self.rng.choice([8, 16, 24]),
                    "ef_construction": self.rng.choice([40, 64, 100]),
                    "ef_search": self.rng.choice([16, 50, 100]),
                },
            },
        }
        return body, doc_ids

    def submit(self, kind: str) -> None:
        name = "large" if kind == "large" else "small"
        body, doc_ids = self._body(name, kind)
        algorithm = body["index_parameters"]["algorithm_parameters"]
        segment: str | None = name
        raw: bytes | None = None
        if kind == "m1":
            algorithm["m"] = 1
        elif kind in ("nested200", "nested260"):
            algorithm["future_option"] = _nested(int(kind[-3:]))
        elif kind == "huge_ef":
            algorithm["ef_search"] = 2**31 - 1
        elif kind == "wrong_count":
            body["doc_count"] += 5
            segment = None
        elif kind == "wrong_dim":
            body["dimension"] *= 2
            segment = None
        elif kind == "unknown_bucket":
            body["container_name"] = "rvib-chaos-no-such-bucket"
            segment = None
        elif kind == "missing_object":
            body["vector_path"] = body["vector_path"].replace("/seg.", "/missing.")
            segment = None
        elif kind == "bad_json":
            raw = json.dumps(body).encode()[:-7]
        elif kind == "bad_space":
            body["index_parameters"]["space_type"] = "cosine"
        code, answer = self._post(kind, body, raw)
        if kind in BAD_KINDS:
            with self.lock:
                self.answers.posts.append((kind, code, str(body["vector_path"])))
        if code == "200" and isinstance(answer, dict) and "job_id" in answer:
            job = Tracked(
                job_id=str(answer["job_id"]),
                kind=kind,
                body=body,
                segment=segment,
                doc_ids=doc_ids,
                accepted_at=time.time(),
            )
            with self.lock:
                self.jobs.append(job)

    def _post(self, kind: str, body: dict[str, Any], raw: bytes | None) -> tuple[str, Any]:
        label = "POST /_build " + ("good" if kind in ("small", "large", "final") else kind)
        code, answer = "error", None
        for _ in range(POST_ATTEMPTS):
            try:
                status, headers, answer = _send(self.url, "POST", "/_build", raw or body)
                code = str(status)
            except (OSError, http.client.HTTPException):
                status, headers, code = 0, {}, "error"
            self._count(label, code, headers, kind)
            if status and status not in RETRIED:
                break
            time.sleep(min(float(headers.get("retry-after", 0.5)), 3.0))
        return code, answer

    def _count(self, label: str, code: str, headers: dict[str, str], kind: str) -> None:
        with self.lock:
            self.answers.counts[(label, code)] += 1
            if code == "500":
                self.answers.odd[f"{label} answered 500 for a {kind} job"] += 1
            elif code == "503" and "retry-after" not in headers:
                self.answers.odd[f"{label} answered 503 without Retry-After ({kind})"] += 1

    # -- polls -----------------------------------------------------------------------------

    def live(self) -> list[Tracked]:
        with self.lock:
            return [job for job in self.jobs if job.status is None]

    def poll(self, job: Tracked) -> None:
        try:
            status, headers, answer = _send(self.url, "GET", f"/_status/{job.job_id}")
            code = str(status)
        except (OSError, http.client.HTTPException):
            status, headers, answer, code = 0, {}, None, "error"
        job.polls += 1
        self._count("GET /_status", code, headers, job.kind)
        if status == 404:
            job.lost.append(time.time())
        if status != 200 or not isinstance(answer, dict):
            return
        if answer.get("task_status") in TERMINAL:
            detail = self.detail(job)
            with self.lock:
                job.detail = detail
                job.status = str(answer["task_status"])
                job.ended_at = time.time()

    def detail(self, job: Tracked) -> dict[str, Any] | None:
        for _ in range(5):
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, headers, answer = _send(self.url, "GET", f"/_jobs/{job.job_id}")
                self._count("GET /_jobs/{id}", str(status), headers, job.kind)
                if status == 200 and isinstance(answer, dict):
                    return answer
            time.sleep(0.5)
        return None


def _send(
    url: str, method: str, path: str, body: dict[str, Any] | bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    if isinstance(body, bytes):  # not JSON on purpose
        host, _, port = url[len("http://") :].partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        with contextlib.suppress(ValueError):
            return response.status, headers, json.loads(raw)
        return response.status, headers, raw.decode(errors="replace")
    return request(method, url + path, body, timeout=HTTP_TIMEOUT_S)


class Poller(threading.Thread):
    """Polls every live job about once a second until ``stop`` is set."""

    def __init__(self, traffic: Traffic, stop: threading.Event) -> None:
        super().__init__(name="chaos-poller", daemon=True)
        self.traffic = traffic
        self.stop = stop

    def run(self) -> None:
        with ThreadPoolExecutor(4, thread_name_prefix="chaos-poll") as pool:
            while True:
                begun = time.monotonic()
                list(pool.map(self.traffic.poll, self.traffic.live()))
                if self.stop.wait(max(0.0, POLL_ROUND_S - (time.monotonic() - begun))):
                    return


def _wait_ended(traffic: Traffic, jobs: list[Tracked], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(job.status is None for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.5)


def run_chaos(
    config: ChaosConfig, s3_client: Any, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the chaos and check the outcome; the result renders with ``checks.table``."""
    say(
        f"chaos run: seed {config.seed}, {config.chaos_s:.0f} s of faults "
        f"(reproduce: python -m benchmarks.run --only chaos --chaos-seed {config.seed} "
        f"--chaos-minutes {config.chaos_s / 60:g})"
    )
    timeline = Timeline()
    data = Data(s3_client, config.seed)
    fleet = ChaosFleet(config, timeline)
    traffic = Traffic(fleet.lb.url, data, config.seed)
    chaos_over, run_over = threading.Event(), threading.Event()
    try:
        fleet.start()
        background: list[threading.Thread] = [
            Poller(traffic, run_over),
            CrashWatcher(fleet, run_over),
        ]
        faults = injectors(fleet, chaos_over)
        for thread in background + faults:
            thread.start()
        started = time.monotonic()
        for offset, kind in schedule(config):
            if chaos_over.wait(max(0.0, started + offset - time.monotonic())):
                break
            traffic.submit(kind)
        chaos_over.wait(max(0.0, started + config.chaos_s - time.monotonic()))
        chaos_over.set()
        for thread in faults:
            thread.join()
        say(f"  chaos over after {time.monotonic() - started:.0f} s; healing the fleet")
        fleet.heal()
        healed = time.monotonic()
        _wait_ended(traffic, list(traffic.jobs), config.drain_limit_s)
        say(
            f"  drained for {time.monotonic() - healed:.0f} s, {len(traffic.live())} jobs "
            "still live; final round"
        )
        # A replica that crashed during the drain is back before the final round.
        fleet.ready()
        final_from = len(traffic.jobs)
        for _ in range(2 * config.replicas):
            traffic.submit("final")
        final = traffic.jobs[final_from:]
        _wait_ended(traffic, final, config.final_s)
        run_over.set()
        for thread in background:
            thread.join()
        result = _verdict(config, fleet, traffic, timeline, s3_client, final)
        _record(config.work_dir / "chaos-result.json", result, timeline, traffic)
    finally:
        run_over.set()
        chaos_over.set()
        fleet.close()
    return result


def _verdict(
    config: ChaosConfig,
    fleet: ChaosFleet,
    traffic: Traffic,
    timeline: Timeline,
    s3_client: Any,
    final: list[Tracked],
) -> dict[str, Any]:
    jobs = list(traffic.jobs)
    found: list[Check] = []

    unended = [j for j in jobs if j.status is None]
    found.append(
        Check(
            "accepted jobs ended",
            f"{len(jobs) - len(unended)} / {len(jobs)}",
            not unended,
            tuple(f"job {j.job_id} ({j.kind}) never ended: {_where(traffic, j)}" for j in unended),
        )
    )
    lost = [j for j in jobs if j.lost]
    polls = sum(j.polls for j in jobs)
    found.append(
        Check(
            "no 404 while a job lived",
            f"{sum(len(j.lost) for j in lost)} of {polls} polls ({len(lost)} jobs)",
            not lost,
            tuple(f"job {j.job_id} ({j.kind}): {len(j.lost)} polls answered 404" for j in lost),
        )
    )
    found.append(
        Check(
            "no 500, every 503 with Retry-After",
            f"{sum(traffic.answers.odd.values())} answers",
            not traffic.answers.odd,
            tuple(f"{what}: {n} times" for what, n in traffic.answers.odd.most_common()),
        )
    )

    # Before the files are read (a long run has hundreds): the last jobs' keys still exist.
    client = fleet.redis_client()
    key_check, key_figures = checks.redis_keys(
        client, jobs, config.ttl_s, config.replicas, time.time()
    )
    found.append(key_check)

    logs = checks.load_logs({r.replica_id: r.log_path for r in fleet.replicas})
    builds = [b for r, entries in logs.items() for b in checks.builds_of(r, entries, timeline)]
    bad, fenced = checks.overlaps(builds, logs, timeline)
    found.append(
        Check(
            "no two builds of a job at once",
            f"{len(bad)} overlaps in {len(builds)} builds ({len(fenced)} resumed owners fenced)",
            not bad,
            tuple(bad),
        )
    )

    completed = [j for j in jobs if j.status == COMPLETED and j.segment is not None]
    file_problems: list[str] = []
    for job in completed:
        assert job.segment is not None
        try:
            blob = s3_client.get_object(Bucket=BUCKET, Key=job.index_key)["Body"].read()
        except Exception as exc:  # any S3 error is a finding here
            file_problems.append(f"job {job.job_id} ({job.kind}): no index file: {exc}")
            continue
        file_problems += checks.verify_file(job, blob, traffic.data.vectors[job.segment])
    found.append(
        Check(
            "COMPLETED files load, hold the doc ids, match their recall",
            f"{len(completed)} files, {len(file_problems)} problems",
            not file_problems,
            tuple(file_problems),
        )
    )

    handled, sent, problems = checks.bad_request_outcomes(jobs, traffic.answers)
    found.append(
        Check(
            "bad requests refused or ended", f"{handled} / {sent}", handled == sent, tuple(problems)
        )
    )
    kinds = {j.job_id: j.kind for j in jobs}
    crashes = [checks.crash_text(crash, builds, kinds) for crash in timeline.crashes]
    found.append(
        Check("no replica exited on its own", f"{len(crashes)} exits", not crashes, tuple(crashes))
    )
    unexpected = [
        f"job {j.job_id} ({j.kind}): {(j.detail or {}).get('error_message')}"
        for j in jobs
        if j.status == FAILED
        and str((j.detail or {}).get("error_message") or "").startswith("unexpected error")
    ]
    found.append(
        Check(
            "no job failed with an unexpected error",
            f"{len(unexpected)} jobs",
            not unexpected,
            tuple(unexpected),
        )
    )

    uploads = s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    found.append(
        Check(
            "no incomplete multipart upload left",
            f"{len(uploads)} uploads",
            not uploads,
            tuple(f"{u['Key']} (started {u['Initiated']})" for u in uploads),
        )
    )

    final_ids = {j.job_id for j in final}
    claimers = {
        str(entry["replica"])
        for _, entry in client.xrange(AUDIT)
        if entry.get("event") == "start" and entry.get("job") in final_ids
    }
    everyone = {r.replica_id for r in fleet.replicas}
    found.append(
        Check(
            "every replica still claims",
            f"{len(claimers & everyone)} / {len(everyone)} replicas claimed final jobs",
            claimers >= everyone,
            tuple(
                f"{r} claimed none of {len(final)} final jobs" for r in sorted(everyone - claimers)
            ),
        )
    )
    return _result(config, traffic, timeline, found, key_figures)


def _record(path: Path, result: dict[str, Any], timeline: Timeline, traffic: Traffic) -> None:
    """Everything a failure needs to be read later: the result, the faults, the jobs."""
    record = {
        "result": result,
        "episodes": [asdict(e) for e in timeline.episodes],
        "incarnations": {r: [asdict(x) for x in xs] for r, xs in timeline.incarnations.items()},
        "stops": timeline.stops,
        "crashes": timeline.crashes,
        "jobs": [
            {
                "job_id": j.job_id,
                "kind": j.kind,
                "vector_path": j.body.get("vector_path"),
                "accepted_at": j.accepted_at,
                "status": j.status,
                "ended_at": j.ended_at,
                "detail": j.detail,
                "lost": j.lost,
            }
            for j in traffic.jobs
        ],
    }
    path.write_text(json.dumps(record, indent=1, default=str))


def _where(traffic: Traffic, job: Tracked) -> str:
    """Where a job that never ended is stuck, as ``/_jobs/{id}`` tells it."""
    detail = traffic.detail(job)
    if detail is None:
        return "no /_jobs answer"
    progress = detail.get("progress") or {}
    lease = detail.get("lease_expires_at")
    renewed = "no lease" if lease is None else f"lease ends in {float(lease) - time.time():.1f} s"
    return (
        f"state {detail.get('state')}, attempt {detail.get('attempt')}, owner "
        f"{detail.get('owner')}, stage {progress.get('stage')} {progress.get('done')}/"
        f"{progress.get('total')}, {renewed}"
    )


def _result(
    config: ChaosConfig,
    traffic: Traffic,
    timeline: Timeline,
    found: list[Check],
    key_figures: dict[str, int],
) -> dict[str, Any]:
    injected = []
    for kind in FAULT_KINDS:
        episodes = [e for e in timeline.episodes if e.kind == kind]
        if kind in config.exclude:
            continue
        detail = ""
        if kind.startswith("s3_"):
            detail = f"{sum(e.hits or 0 for e in episodes)} requests hit"
        elif episodes and all(e.ended is not None for e in episodes):
            seconds = [float(e.ended or 0.0) - e.started for e in episodes]
            detail = f"{min(seconds):.1f}-{max(seconds):.1f} s each"
        injected.append({"what": described(kind), "episodes": len(episodes), "detail": detail})
    jobs = list(traffic.jobs)
    kinds = Counter(job.kind for job in jobs)
    ended = Counter(job.status or "never ended" for job in jobs)
    requests: list[tuple[str, str]] = [
        (
            "jobs accepted: small / large / final / bad",
            f"{kinds['small']} / {kinds['large']} / {kinds['final']} / "
            f"{len(jobs) - kinds['small'] - kinds['large'] - kinds['final']}",
        ),
        (
            "jobs COMPLETED / FAILED / never ended",
            f"{ended[COMPLETED]} / {ended[FAILED]} / {ended['never ended']}",
        ),
    ]
    for kind in BAD_KINDS:
        answers = Counter(code for k, code, _ in traffic.answers.posts if k == kind)
        if answers:
            codes = ", ".join(f"{code} x{n}" for code, n in sorted(answers.items()))
            requests.append((f"bad: {_BAD_DESCRIPTIONS[kind]}", codes))
    by_label: dict[str, list[str]] = {}
    for (label, code), count in sorted(traffic.answers.counts.items()):
        if not label.startswith("POST /_build ") or label.endswith("good"):
            by_label.setdefault(label, []).append(f"{code} x{count}")
    requests += [(f"{label} answers", ", ".join(codes)) for label, codes in by_label.items()]
    return {
        "seed": config.seed,
        "chaos_s": config.chaos_s,
        "replicas": config.replicas,
        "lease_s": config.lease_s,
        "ttl_s": config.ttl_s,
        "excluded": sorted(config.exclude),
        "injected": injected,
        "requests": requests,
        "checks": [asdict(c) for c in found],
        "redis": key_figures,
        "failed_reasons": sorted(
            {str((j.detail or {}).get("error_message")) for j in jobs if j.status == FAILED}
        ),
        "harness_errors": list(timeline.harness_errors),
        "passed": all(c.passed for c in found),
    }


# -- the benchmark section (python -m benchmarks.run --only chaos) ------------------------


def run(ctx: Any, minutes: float, seed: int, exclude: frozenset[str]) -> dict[str, Any]:
    from benchmarks.common import say

    config = ChaosConfig(
        seed=seed,
        chaos_s=60.0 * minutes,
        work_dir=Path(ctx.work_dir) / f"chaos-{seed}",
        s3_endpoint=ctx.endpoint,
        exclude=exclude,
    )
    config.work_dir.mkdir(parents=True, exist_ok=True)
    return run_chaos(config, ctx.client, say)


def table(result: dict[str, Any]) -> list[str]:
    return checks.table(result)


def verdict(result: dict[str, Any]) -> list[str]:
    failed = [c["name"] for c in result["checks"] if not c["passed"]]
    total = len(result["checks"])
    if not failed:
        return [f"chaos run, seed {result['seed']}: {total} of {total} checks pass -> MET"]
    return [
        f"chaos run, seed {result['seed']}: {total - len(failed)} of {total} checks pass "
        f"(failed: {'; '.join(failed)}) -> MISSED"
    ]
