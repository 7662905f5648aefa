"""Section 3: one large object down and up, our object store vs the reference service's boto3.

Reference download: ``download_fileobj`` into a ``BytesIO`` with
``TransferConfig(multipart_threshold=50 MiB, multipart_chunksize=50 MiB,
max_concurrency=max(8, int(cpus * 0.625)), io_chunksize=sys.maxsize)`` and
``ChecksumMode=ENABLED``. Reference upload: ``upload_fileobj`` with 50 MiB parts,
``max_concurrency=max(8, int(cpus * 0.5))`` and ``ChecksumAlgorithm=CRC32``.

Ours: ``S3ObjectStore.download`` (parallel ranged GETs into one buffer) and the
two upload paths of the workflow: ``open_upload`` fed 4 MiB writes (memory
mode) and ``upload_file`` (disk mode, file in the page cache).

Each child times its second transfer (``--warm``; the first, untimed, opens the
connections and does the lazy imports, as a long-running service has), unless
``--transfer-cold``. Both clients are treated alike.

Both over plain HTTP and over HTTPS (the same server with a self-signed
certificate): botocore hashes every upload body with SHA-256 over HTTP only,
and streams checksummed uploads through its aws-chunked wrapper over HTTPS
only, so the two schemes cost the client differently; AWS itself is HTTPS.

To read the numbers: the S3 server runs on the same two cores. Its CPU time
per GiB is measured for every transfer, and two ceilings are measured beside
them: parallel ranged GETs by ``curl`` processes (almost no client CPU) and by
plain boto3 threads that throw the bytes away.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    AWS_ENV,
    BUCKET,
    GIB,
    MIB,
    REGION,
    Context,
    cpu_seconds_of,
    median,
    run_child,
    s3_server_process,
    say,
)

SOURCE_KEY = "transfer/source.bin"
DOWNLOADS = ("ours", "reference")
UPLOADS = ("ours-stream", "ours-file", "reference")
CEILINGS = ("curl x8", "boto3 GETs x16")


def _source_file(work_dir: Path, size: int) -> Path:
    path = work_dir / f"transfer-{size}.bin"
    if not path.exists() or path.stat().st_size != size:
        rng = np.random.default_rng(11)
        with path.open("wb") as file:
            for first in range(0, size, 64 * MIB):
                file.write(rng.integers(0, 256, min(64 * MIB, size - first), np.uint8).tobytes())
    return path


def _curl_ceiling(
    endpoint: str, size: int, processes: int, ca_bundle: Path | None
) -> dict[str, Any]:
    """``processes`` curl clients, each GETting one contiguous range into /dev/null."""
    curl = shutil.which("curl")
    if curl is None:
        return {"skipped": "curl not installed"}
    user = f"{AWS_ENV['AWS_ACCESS_KEY_ID']}:{AWS_ENV['AWS_SECRET_ACCESS_KEY']}"
    step = -(-size // processes)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [curl, "-sf", "-o", os.devnull, "--aws-sigv4", f"aws:amz:{REGION}:s3"]
            + (["--cacert", str(ca_bundle)] if ca_bundle else [])
            + ["--user", user, "-r", f"{first}-{min(first + step, size) - 1}"]
            + [f"{endpoint}/{BUCKET}/{SOURCE_KEY}"]
        )
        for first in range(0, size, step)
    ]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(codes):
        return {"skipped": f"curl failed ({codes})"}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "bytes": size}


def _measure(
    ctx: Context, scheme: str, kind: str, impl: str, size: int, source: Path
) -> dict[str, Any]:
    endpoint = ctx.https_endpoint if scheme == "https" else ctx.endpoint
    assert endpoint is not None
    env = {"AWS_CA_BUNDLE": str(ctx.ca_bundle)} if scheme == "https" else {}
    server = s3_server_process()
    server_cpu = cpu_seconds_of(server)
    profile = ctx.profile(f"transfers-{scheme}-{kind}-{impl}")
    options = ["--warm"] if ctx.warm_transfers else []
    if server is not None:
        # The child reads the server's CPU around its timed transfer only.
        options += ["--server-pid", str(server.pid)]
    if kind == "download":
        args = ["download", "--endpoint", endpoint, "--key", SOURCE_KEY, "--impl", impl, *options]
        result = run_child(args, env=env, profile=profile)
    elif kind == "upload":
        key = f"transfer/up-{impl}.bin"
        args = ["upload", "--endpoint", endpoint, "--key", key, "--impl", impl, *options]
        args += ["--size", str(size), "--source", str(source)]
        result = run_child(args, env=env, profile=profile)
        for name in (key, key + ".warm-up"):
            ctx.client.delete_object(Bucket=BUCKET, Key=name)
    elif impl.startswith("curl"):
        result = _curl_ceiling(endpoint, size, 8, ctx.ca_bundle if scheme == "https" else None)
    else:
        args = ["get-flood", "--endpoint", endpoint, "--key", SOURCE_KEY, "--concurrency", "16"]
        result = run_child(args, env=env, profile=profile)
    result.setdefault("server_cpu_s", cpu_seconds_of(server) - server_cpu)
    if "wall_s" in result:
        say(
            f"  {scheme:<5} {kind:<8} {impl:<14}: {result['bytes'] / result['wall_s'] / 1e6:.0f} "
            f"MB/s, client {result['cpu_s']:.2f} CPU-s, server {result['server_cpu_s']:.2f} CPU-s"
        )
    return result


def run(ctx: Context, size: int, schemes: list[str]) -> dict[str, Any]:
    source = _source_file(ctx.work_dir, size)
    ctx.store.upload_file(BUCKET, SOURCE_KEY, source)
    if ctx.https_endpoint is None:
        schemes = [s for s in schemes if s != "https"]
    plan = [("download", impl) for impl in DOWNLOADS] + [("upload", impl) for impl in UPLOADS]
    plan += [("ceiling", impl) for impl in CEILINGS]
    steps = [(scheme, kind, impl) for scheme in schemes for kind, impl in plan]
    runs: dict[str, list[dict[str, Any]]] = {"/".join(step): [] for step in steps}
    for repeat in range(ctx.repeats):
        # Alternate the order so neither side always runs on a colder server.
        for step in steps if repeat % 2 == 0 else steps[::-1]:
            runs["/".join(step)].append(_measure(ctx, *step, size, source))
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        done = [r for r in results if "wall_s" in r]
        if not done:
            summary[name] = {"skipped": results[0].get("skipped", "no result")}
            continue
        gib = done[0]["bytes"] / GIB
        row: dict[str, Any] = {
            "mb_per_s": median(r["bytes"] / r["wall_s"] / 1e6 for r in done),
            "client_cpu_s_per_gib": median(r["cpu_s"] / gib for r in done),
            "server_cpu_s_per_gib": median(r["server_cpu_s"] / gib for r in done),
            "bytes": done[0]["bytes"],
        }
        if "baseline_rss" in done[0]:
            row["peak_rss"] = median(r["peak_rss"] for r in done)
            row["peak_over_baseline"] = median(r["peak_rss"] - r["baseline_rss"] for r in done)
            row["peak_over_baseline_per_object"] = row["peak_over_baseline"] / done[0]["bytes"]
            row["concurrency"] = done[0].get("concurrency")
            row["part_bytes"] = done[0].get("part_bytes")
        summary[name] = row
    return {
        "bytes": size,
        "warm": ctx.warm_transfers,
        "repeats": ctx.repeats,
        "schemes": schemes,
        "cpus": os.cpu_count(),
        "summary": summary,
        "runs": runs,
        "target": {
            "min_download_speedup": 2.0,
            "max_download_rss_per_object": 1.1,
            "max_upload_cpu_s_per_gib": 2.0,
        },
    }


def table(result: dict[str, Any]) -> list[str]:
    size_mib = result["bytes"] / MIB
    lines = [
        f"### 3. S3 transfers of a {size_mib:.0f} MiB object (median of {result['repeats']})",
        "",
        (
            "Each transfer is timed after an untimed one in the same process (a long-lived"
            " client: connections open, lazy imports done)."
            if result.get("warm")
            else "Each transfer is the first of a fresh process (--transfer-cold)."
        ),
        "",
        "| scheme | transfer | client | MB/s | client CPU-s / GiB | server CPU-s / GiB "
        "| peak RSS MB | peak - baseline MB | (peak - baseline) / object | connections x part |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    names = {
        "ours": "ours (`S3ObjectStore.download`)",
        "reference": "reference (boto3 `download_fileobj` -> BytesIO)",
        "ours-stream": "ours (`open_upload`, 4 MiB writes)",
        "ours-file": "ours (`upload_file`)",
    }
    for name, row in result["summary"].items():
        scheme, kind, impl = name.split("/")
        label = names.get(impl, impl)
        if kind == "upload" and impl == "reference":
            label = "reference (boto3 `upload_fileobj`)"
        if kind == "ceiling":
            label = {
                "curl x8": "8 curl processes, ranged GETs -> /dev/null",
                "boto3 GETs x16": "plain boto3, 16 threads, 16 MiB ranged GETs, bytes discarded",
            }.get(impl, impl)
        if "skipped" in row:
            lines.append(f"| {scheme} | {kind} | {label} | skipped: {row['skipped']} | | | | | | |")
            continue
        rss = peak = per_object = layout = ""
        if "peak_rss" in row:
            rss = f"{row['peak_rss'] / 1e6:.0f}"
            peak = f"{row['peak_over_baseline'] / 1e6:.0f}"
            per_object = f"{row['peak_over_baseline_per_object']:.2f}"
            layout = f"{row['concurrency']} x {row['part_bytes'] // MIB} MiB"
        lines.append(
            f"| {scheme} | {kind} | {label} | {row['mb_per_s']:.0f} "
            f"| {row['client_cpu_s_per_gib']:.2f} "
            f"| {row['server_cpu_s_per_gib']:.2f} | {rss} | {peak} | {per_object} | {layout} |"
        )
    return lines


def verdict(result: dict[str, Any]) -> list[str]:
    s, t = result["summary"], result["target"]
    out = []
    for scheme in result["schemes"]:
        ours, ref = s.get(f"{scheme}/download/ours", {}), s.get(f"{scheme}/download/reference", {})
        if "mb_per_s" in ours and "mb_per_s" in ref:
            speedup = ours["mb_per_s"] / ref["mb_per_s"]
            need = t["min_download_speedup"]
            status = "MET" if speedup >= need else f"MISSED by {100 * (1 - speedup / need):.0f}%"
            out.append(
                f"{scheme}: download >= {need:.1f} x reference throughput: {speedup:.2f} x "
                f"-> {status}"
            )
            rss = ours["peak_over_baseline_per_object"]
            limit = t["max_download_rss_per_object"]
            status = "MET" if rss <= limit else f"MISSED by {100 * (rss / limit - 1):.0f}%"
            out.append(
                f"{scheme}: download peak - baseline <= {limit:.1f} x object: {rss:.2f} -> {status}"
            )
        for impl in ("ours-stream", "ours-file"):
            row = s.get(f"{scheme}/upload/{impl}", {})
            if "client_cpu_s_per_gib" in row:
                cpu, limit = row["client_cpu_s_per_gib"], t["max_upload_cpu_s_per_gib"]
                status = "MET" if cpu <= limit else f"MISSED by {100 * (cpu / limit - 1):.0f}%"
                out.append(
                    f"{scheme}: upload ({impl}) <= {limit:.1f} CPU-s / GiB: {cpu:.2f} -> {status}"
                )
    return out
