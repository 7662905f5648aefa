"""Section 7: the chaos run. Faults and bad requests against a fleet, then what must hold.

``python -m benchmarks.run --only chaos --chaos-minutes 10`` runs it for minutes;
``test_remote_vector_index_builder/test_chaos.py`` runs a minute of it in CI.
Both call ``run_chaos`` (the test with its own SeaweedFS, the benchmark with
the run's). Everything is on 127.0.0.1: the fleet is ``chaos_fleet``'s, its
faults ``chaos_faults``'s, the requests and polls ``chaos_traffic``'s, the
checks ``chaos_checks``'s. After the chaos every fault is undone, accepted
jobs get ``drain_s`` (or half the chaos time) to end, and a final round of two
jobs per replica shows which replicas still claim work.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import chaos_checks as checks
from benchmarks.chaos_checks import COMPLETED, FAILED, Check, Tracked
from benchmarks.chaos_faults import FAULT_KINDS, CrashWatcher, described, injectors
from benchmarks.chaos_fleet import ChaosConfig, ChaosFleet, Timeline
from benchmarks.chaos_traffic import (
    BAD_DESCRIPTIONS,
    BAD_KINDS,
    BUCKET,
    Data,
    Poller,
    Traffic,
    schedule,
    wait_ended,
)
from remote_vector_index_builder.app.fleet_store import AUDIT


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
        wait_ended(traffic, list(traffic.jobs), config.drain_limit_s)
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
        wait_ended(traffic, final, config.final_s)
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
            requests.append((f"bad: {BAD_DESCRIPTIONS[kind]}", codes))
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
