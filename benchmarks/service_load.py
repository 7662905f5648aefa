"""Section 5: ``GET /_status`` latency of the real service while builds keep the cores busy.

The service runs as ``python -m remote_vector_index_builder serve`` (CPU device,
loopback only) against the local S3 server. A few full-size builds are
submitted over HTTP; once the service process uses most of both cores, an
open-loop client sends ``GET /_status/{id}`` at a fixed rate for a bounded
time. Open loop: request *i* is due at ``t0 + i / rate`` whatever happened to
the others, and its latency is counted from that due time, so a stalled
server cannot hide queueing delay by slowing the client down. Three windows:
the idle service, the first seconds after the builds are submitted
(downloads, parsing) and, the one the target is about, once every running job
is building (Faiss on both cores).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import ROOT, Context, child_env, fmt_count, percentile, say
from remote_vector_index_builder.local_s3 import free_port

TARGET_P99_S = 0.020
_NOT_RUNNING = {"queued", "completed", "failed", "cancelled"}


def _http(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json; charset=UTF-8"} if payload else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return json.loads(data) if data else None
    finally:
        conn.close()


def open_loop(
    port: int, path: str, rate: float, duration_s: float, workers: int = 16
) -> dict[str, Any]:
    """Send ``rate`` requests/s for ``duration_s``; latencies from each request's due time."""
    total = int(rate * duration_s)
    due_latency: list[float | None] = [None] * total
    service_latency: list[float | None] = [None] * total
    errors: list[str] = []
    counter = itertools.count()
    start = time.perf_counter() + 0.2

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while (i := next(counter)) < total:
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent = time.perf_counter()
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == 200
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    errors.append(repr(exc))
                    continue
                done = time.perf_counter()
                if not ok:
                    errors.append(f"HTTP {response.status}")
                due_latency[i] = done - due
                service_latency[i] = done - sent
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    lat = [x for x in due_latency if x is not None]
    svc = [x for x in service_latency if x is not None]
    return {
        "requests": total,
        "completed": len(lat),
        "errors": len(errors),
        "first_errors": errors[:3],
        "achieved_rate": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50_s": percentile(lat, 50),
        "p90_s": percentile(lat, 90),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat) if lat else float("nan"),
        # When the slowest requests were due (seconds into the window): stalls or noise.
        "slowest": sorted(
            ((i / rate, x) for i, x in enumerate(due_latency) if x is not None),
            key=lambda pair: -pair[1],
        )[:5],
        "service_p50_s": percentile(svc, 50),
        "service_p99_s": percentile(svc, 99),
    }


def _cpu_s(process: psutil.Process) -> float:
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def _schedstat(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of ``pid``: (seconds on a CPU, seconds runnable but waiting for one)."""
    stats: dict[int, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on_cpu, waiting, _ = (Path(task) / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        stats[int(task.name)] = (int(on_cpu) / 1e9, int(waiting) / 1e9)
    return stats


def _run_queue_wait(
    pid: int, before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> dict[str, float]:
    """How long the event loop (the main thread) and the rest waited for a CPU."""
    loop_wait = after.get(pid, (0.0, 0.0))[1] - before.get(pid, (0.0, 0.0))[1]
    loop_cpu = after.get(pid, (0.0, 0.0))[0] - before.get(pid, (0.0, 0.0))[0]
    others = [tid for tid in after if tid != pid]
    other_wait = sum(after[t][1] - before.get(t, (0.0, 0.0))[1] for t in others)
    other_cpu = sum(after[t][0] - before.get(t, (0.0, 0.0))[0] for t in others)
    return {
        "event_loop_cpu_s": loop_cpu,
        "event_loop_wait_s": loop_wait,
        "other_threads_cpu_s": other_cpu,
        "other_threads_wait_s": other_wait,
    }


def _wait_busy(service: psutil.Process, cores: float, timeout_s: float) -> float:
    """Wait until the service uses ``cores`` CPUs over a second; returns what it used."""
    deadline = time.monotonic() + timeout_s
    used = 0.0
    while time.monotonic() < deadline:
        before = _cpu_s(service)
        time.sleep(1.0)
        used = _cpu_s(service) - before
        if used >= cores:
            break
    return used


def run(
    ctx: Context,
    n: int,
    dim: int,
    builds: int,
    rate: float,
    duration_s: float,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """``command``: how to start the service (default ``python -m ... serve``)."""
    blobs = ctx.blobs(n, dim, "float")
    stems = [f"load/{i}_vectors/s_emb_0" for i in range(builds)]
    for stem in stems:
        ctx.store.upload_file("rvib-bench", stem + ".knnvec", blobs.vector_file)
        ctx.store.upload_file("rvib-bench", stem + ".knndid", blobs.doc_id_file)
    port = free_port()
    env = child_env(
        {
            "S3_ENDPOINT_URL": ctx.endpoint,
            "RVIB_S3_PATH_STYLE": "true",
            "RVIB_DEVICE": "cpu",
            "RVIB_LISTEN_HOST": "127.0.0.1",
            "RVIB_LISTEN_PORT": str(port),
            "LOG_LEVEL": "WARNING",
            "RVIB_SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    log_path = Path(ctx.work_dir) / "service.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command or [sys.executable, "-m", "remote_vector_index_builder", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        service = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while True:
            try:
                _http(port, "GET", "/_heart_beat")
                break
            except (OSError, RuntimeError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not start; see {log_path}") from None
                time.sleep(0.2)
        path_of = "/_status/{}"
        # 1. The idle service, for reference, on the status of a finished small job.
        small = ctx.blobs(1000, dim, "float")
        small_job = _http(port, "POST", "/_build", small.request_body())["job_id"]
        while _http(port, "GET", path_of.format(small_job))["task_status"] == "RUNNING_INDEX_BUILD":
            time.sleep(0.2)
        idle = open_loop(port, path_of.format(small_job), rate, min(duration_s, 10.0))
        say(f"  idle: p50 {idle['p50_s'] * 1e3:.1f} ms, p99 {idle['p99_s'] * 1e3:.1f} ms")
        jobs = []
        for stem in stems:
            body = blobs.request_body(vector_path=stem + ".knnvec", doc_id_path=stem + ".knndid")
            jobs.append(_http(port, "POST", "/_build", body)["job_id"])
        # 2. While the jobs start: downloads, parsing, the first batches.
        window = min(duration_s, 10.0)
        if ctx.profile_dir is not None:
            from benchmarks import profiles

            start_folded = ctx.profile_dir / "service-gil-while-jobs-start.folded"
            command = profiles.attach_command(start_folded, proc.pid, window, gil=True)
            start_spy = subprocess.Popen(command)
        sched_start = _schedstat(proc.pid)
        starting = open_loop(port, path_of.format(jobs[0]), rate, window)
        starting["run_queue"] = _run_queue_wait(proc.pid, sched_start, _schedstat(proc.pid))
        if ctx.profile_dir is not None:
            start_spy.wait(timeout=60)
            profiles.write_summary(start_folded)
        say(
            f"  jobs starting: p50 {starting['p50_s'] * 1e3:.1f} ms, "
            f"p99 {starting['p99_s'] * 1e3:.1f} ms; event loop waited "
            f"{starting['run_queue']['event_loop_wait_s']:.2f} s for a CPU"
        )
        # 3. Once every running job is building: both cores busy with Faiss.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            listed = _http(port, "GET", "/_jobs")
            active = [listed[job]["state"] for job in jobs]
            active = [state for state in active if state not in _NOT_RUNNING]
            if not active or all(state == "building" for state in active):
                break
            time.sleep(0.5)
        busy_cpus = _wait_busy(service, 1.7, 30.0)
        say(f"  building: {busy_cpus:.2f} CPUs over 1 s; {rate:.0f} req/s for {duration_s:.0f}s")
        cpu_before, wall_before = _cpu_s(service), time.perf_counter()
        system_before = psutil.cpu_times()
        sched_before = _schedstat(proc.pid)
        spy = None
        if ctx.profile_dir is not None:
            from benchmarks import profiles

            folded = ctx.profile_dir / "service-gil-while-building.folded"
            command = profiles.attach_command(folded, proc.pid, duration_s, gil=True)
            spy = subprocess.Popen(command)
        loaded = open_loop(port, path_of.format(jobs[0]), rate, duration_s)
        run_queue = _run_queue_wait(proc.pid, sched_before, _schedstat(proc.pid))
        if spy is not None:
            spy.wait(timeout=60)
            profiles.write_summary(folded)
        service_cpus = (_cpu_s(service) - cpu_before) / (time.perf_counter() - wall_before)
        system_after = psutil.cpu_times()
        busy = (system_after.user + system_after.system) - (
            system_before.user + system_before.system
        )
        idle_time = system_after.idle - system_before.idle
        after = _http(port, "GET", "/_jobs")
        states = [after[job]["state"] for job in jobs]
        say(
            f"  building: p50 {loaded['p50_s'] * 1e3:.1f} ms, p99 {loaded['p99_s'] * 1e3:.1f} ms, "
            f"service used {service_cpus:.2f} CPUs; job states after {states}; "
            f"event loop waited {run_queue['event_loop_wait_s']:.2f} s for a CPU "
            f"(ran {run_queue['event_loop_cpu_s']:.2f} s)"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "n": n,
        "dim": dim,
        "builds": builds,
        "rate": rate,
        "duration_s": duration_s,
        "cpus": os.cpu_count(),
        "idle": idle,
        "starting": starting,
        "loaded": loaded,
        "service_cpus_during_load": service_cpus,
        "run_queue_during_load": run_queue,
        "machine_busy_fraction": busy / (busy + idle_time) if busy + idle_time > 0 else None,
        "job_states_after_load": states,
        "target": {"max_p99_s": TARGET_P99_S},
    }


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### 5. `GET /_status` latency at {result['rate']:.0f} requests/s, open loop "
        f"({result['builds']} builds of {fmt_count(result['n'])} x {result['dim']} submitted)",
        "",
        "| service state | duration s | requests | errors | achieved req/s | p50 ms | p90 ms "
        "| p99 ms | max ms | service CPUs used |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row, cpus in (
        ("idle", result["idle"], None),
        ("jobs starting (download, parse)", result["starting"], None),
        ("building, both cores busy", result["loaded"], result["service_cpus_during_load"]),
    ):
        duration = row["requests"] / result["rate"]
        lines.append(
            f"| {name} | {duration:.0f} | {row['requests']} | {row['errors']} "
            f"| {row['achieved_rate']:.0f} | {row['p50_s'] * 1e3:.1f} | {row['p90_s'] * 1e3:.1f} "
            f"| {row['p99_s'] * 1e3:.1f} | {row['max_s'] * 1e3:.1f} "
            f"| {'' if cpus is None else f'{cpus:.2f}'} |"
        )
    queue = result.get("run_queue_during_load")
    if queue:
        lines += [
            "",
            f"While building, the service's event-loop thread ran {queue['event_loop_cpu_s']:.2f}"
            f" CPU-s and waited {queue['event_loop_wait_s']:.2f} s runnable for a CPU; its"
            f" other threads ran {queue['other_threads_cpu_s']:.1f} CPU-s and waited"
            f" {queue['other_threads_wait_s']:.1f} s (``/proc/<pid>/task/*/schedstat``).",
        ]
    return lines


def verdict(result: dict[str, Any]) -> list[str]:
    p99, limit = result["loaded"]["p99_s"], result["target"]["max_p99_s"]
    status = "MET" if p99 <= limit else f"MISSED by {100 * (p99 / limit - 1):.0f}%"
    still = sum(s == "building" for s in result["job_states_after_load"])
    return [
        f"GET /_status p99 <= {limit * 1e3:.0f} ms at {result['rate']:.0f} req/s while building: "
        f"{p99 * 1e3:.1f} ms -> {status} ({still} of {result['builds']} jobs still building "
        "when the load ended)"
    ]
