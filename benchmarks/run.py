"""``python -m benchmarks.run``: every benchmark section against a local S3 server.

Starts SeaweedFS on 127.0.0.1 (``remote_vector_index_builder.local_s3.LocalS3``),
writes seeded Gaussian-mixture blobs in the k-NN format, runs the sections
(each measurement in a fresh child process), prints markdown tables and
writes ``<out>/bench-<time>.json``, ``.md`` and ``.png`` (also as ``latest.*``).

Sections: e2e (job vs raw build), memory (peak RSS, estimate), transfers (S3
vs the reference service's boto3 settings), variants (storage, threads, rows
per add), service (``/_status`` latency under build load), modes (CPU build
modes: build time, recall, quality-check cost), chaos (faults and bad requests
against a fleet, then its promises checked; only with ``--only chaos``). See
benchmarks/README.md for what each measures and the latest results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import (
    build_modes,
    chaos,
    e2e,
    fleet,
    graph_build,
    memory_estimate,
    report,
    service_load,
    transfers,
    variants,
)
from benchmarks.common import (
    AWS_ENV,
    BUCKET,
    REGION,
    ROOT,
    Context,
    load_average,
    make_certificate,
    parse_bytes,
    parse_count,
    say,
    touch_free_memory,
)

SECTIONS = ("e2e", "memory", "transfers", "variants", "service", "fleet", "modes", "graph", "chaos")
# A run without --only measures performance; the chaos run (a soak of faults) is asked for.
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "chaos")


def _counts(text: str) -> list[int]:
    return [parse_count(part) for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmarks of the remote vector index builder on a local S3 server.",
    )
    p.add_argument("--size", default="100k", help="vectors in the main data set (100k, 1M, ...)")
    p.add_argument("--dim", type=int, default=768, help="dimension (bits for binary)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections: {','.join(SECTIONS)} (default: all but chaos)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output directory")
    p.add_argument(
        "--memory-sizes",
        default="20k,50k,100k,200k",
        help="float sizes for the measured-vs-estimated memory table",
    )
    p.add_argument(
        "--memory-repeats",
        type=int,
        default=1,
        help="runs per memory point (peak RSS varies by a few MB between runs)",
    )
    p.add_argument(
        "--memory-modes", default="memory,disk", help="serialization modes per data type"
    )
    p.add_argument(
        "--e2e-kinds",
        default=",".join(e2e.KINDS),
        help=f"runs of the e2e section, some of {','.join(e2e.KINDS)} (at least one raw)",
    )
    p.add_argument("--transfer-size", default="1GiB", help="object size for the S3 section")
    p.add_argument(
        "--transfer-schemes", default="http,https", help="endpoints for the S3 section (https: TLS)"
    )
    p.add_argument("--variant-size", default="50k", help="vectors for the storage/thread grid")
    p.add_argument("--variant-threads", default="1,2", help="OpenMP thread counts to compare")
    p.add_argument(
        "--batch-size", default=None, help="vectors for the rows-per-add jobs (--variant-size)"
    )
    p.add_argument(
        "--batch-rows", default="8192,32768,131072,0", help="rows per add; 0 = one add of all"
    )
    p.add_argument(
        "--modes-size", default="50k", help="rows of the generated and text sets (modes)"
    )
    p.add_argument(
        "--graph-sets",
        default="cohere-1k-l2,cohere-1k-ip,tight-20k,decay-20k,lsa-20k",
        help="data sets of the graph section (benchmarks/graph_build.py lists them)",
    )
    p.add_argument(
        "--graph-methods",
        default=",".join(graph_build.METHODS),
        help="builds per set: faiss, standard, default, exact-knn, fast, blocked, gpu-replay",
    )
    p.add_argument(
        "--minilm-cache",
        default="",
        help="the .npy of MiniLM vectors the minilm sets read (default: in the work directory)",
    )
    p.add_argument(
        "--graph-crossover", default="", help="set whose prefixes place the exact-kNN limit"
    )
    p.add_argument("--load-builds", type=int, default=3, help="builds submitted under load")
    p.add_argument("--load-rate", type=float, default=200.0, help="GET /_status per second")
    p.add_argument("--load-duration", type=float, default=20.0, help="seconds of load")
    p.add_argument("--fleet-size", default="20k", help="vectors per job in the fleet section")
    p.add_argument("--fleet-dim", type=int, default=128, help="dimension of the fleet's jobs")
    p.add_argument("--fleet-jobs", type=int, default=4, help="jobs per throughput batch")
    p.add_argument(
        "--fleet-lease", type=float, default=5.0, help="RVIB_LEASE_SECONDS of the failover run"
    )
    p.add_argument(
        "--chaos-minutes", type=float, default=1.0, help="minutes of faults in the chaos run"
    )
    p.add_argument(
        "--chaos-seed", type=int, default=16, help="seed of the chaos run's schedule (replays it)"
    )
    p.add_argument(
        "--chaos-exclude",
        default="",
        help="comma-separated fault or bad-request kinds the chaos run leaves out",
    )
    p.add_argument(
        "--transfer-cold",
        action="store_true",
        help="time each transfer as the first of a fresh process (default: the second)",
    )
    p.add_argument(
        "--no-touch-memory",
        action="store_true",
        help="skip writing to the free memory once before measuring (see common.py)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the first repeat of each measurement under py-spy (profiles in <out>)",
    )
    p.add_argument("--work-dir", default=None, help="where blobs are written (default: a temp dir)")
    return p


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import faiss

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    try:
        weed_version = subprocess.run(
            [weed, "version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        weed_version = "?"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "seaweedfs": weed_version.splitlines()[0] if weed_version else "?",
        "load_average_at_start": load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    n, dim = parse_count(args.size), args.dim
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(AWS_ENV)
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "started": stamp,
        "command": "python -m benchmarks.run " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "sections": {},
        "timings_s": {},
    }

    from remote_vector_index_builder.core.builder_choice import BuilderOptions
    from remote_vector_index_builder.core.object_store import S3ObjectStore
    from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client
    from remote_vector_index_builder.local_s3 import LocalS3, free_port

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rvib-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sections: dict[str, Any] = results["sections"]
    # The same server also on HTTPS (self-signed), for transfers over TLS as to AWS.
    tls = make_certificate(work) if "transfers" in only else None
    https_port = free_port() if tls else 0
    extra = (
        (f"-s3.port.https={https_port}", f"-s3.cert.file={tls[0]}", f"-s3.key.file={tls[1]}")
        if tls
        else ()
    )
    try:
        with LocalS3(extra_args=extra) as s3:
            say(f"local S3 (SeaweedFS) at {s3.endpoint_url}; data in {work}")
            config = S3Config(endpoint_url=s3.endpoint_url, region=REGION, path_style=True)
            client = make_s3_client(config)
            client.create_bucket(Bucket=BUCKET)
            store = S3ObjectStore(client, config)
            ctx = Context(s3.endpoint_url, store, client, work, args.repeats, {})
            ctx.warm_transfers = not args.transfer_cold
            if not args.no_touch_memory and set(only) != {"chaos"}:
                begin = time.perf_counter()
                touched = touch_free_memory()
                seconds = time.perf_counter() - begin
                say(f"touched {touched / 2**30:.1f} GiB of free memory in {seconds:.1f}s")
                results["machine"]["touched_memory_gib"] = round(touched / 2**30, 1)
            if args.profile:
                ctx.profile_dir = out / f"profile-{stamp}"
                ctx.profile_dir.mkdir(parents=True, exist_ok=True)
                say(f"profiles (py-spy) in {ctx.profile_dir}")
            if tls:
                ctx.https_endpoint = f"https://127.0.0.1:{https_port}"
                ctx.ca_bundle = tls[0]
            for name in only:
                say(f"section {name}")
                begin = time.perf_counter()
                if name == "e2e":
                    kinds = tuple(k.strip() for k in args.e2e_kinds.split(",") if k.strip())
                    sections[name] = e2e.run(ctx, n, dim, kinds)
                elif name == "memory":
                    earlier: dict[str, list[dict[str, Any]]] = {}
                    if "e2e" in sections:
                        earlier = sections["e2e"]["runs"]
                    sections[name] = memory_estimate.run(
                        ctx,
                        n,
                        dim,
                        _counts(args.memory_sizes),
                        args.memory_repeats,
                        reuse=earlier,
                        modes=tuple(m.strip() for m in args.memory_modes.split(",") if m.strip()),
                    )
                elif name == "transfers":
                    schemes = [s.strip() for s in args.transfer_schemes.split(",") if s.strip()]
                    sections[name] = transfers.run(ctx, parse_bytes(args.transfer_size), schemes)
                elif name == "variants":
                    variant_n = parse_count(args.variant_size)
                    batch_n = parse_count(args.batch_size) if args.batch_size else variant_n
                    reuse: dict[str, list[dict[str, Any]]] = {}
                    if "memory" in sections.get("e2e", {}).get("runs", {}) and batch_n == n:
                        # Section 1's memory-mode jobs are the default rows-per-add runs.
                        default_rows = min(BuilderOptions().add_batch_rows, n)
                        reuse[f"float/{default_rows}"] = sections["e2e"]["runs"]["memory"]
                    sections[name] = variants.run(
                        ctx,
                        variant_n,
                        dim,
                        [int(t) for t in args.variant_threads.split(",")],
                        batch_n,
                        _counts(args.batch_rows),
                        reuse,
                    )
                elif name == "service":
                    sections[name] = service_load.run(
                        ctx, n, dim, args.load_builds, args.load_rate, args.load_duration
                    )
                elif name == "fleet":
                    sections[name] = fleet.run(
                        ctx,
                        parse_count(args.fleet_size),
                        args.fleet_dim,
                        args.fleet_jobs,
                        args.load_rate,
                        args.load_duration,
                        args.fleet_lease,
                    )
                elif name == "modes":
                    sections[name] = build_modes.run(ctx, parse_count(args.modes_size))
                elif name == "chaos":
                    left_out = frozenset(
                        k.strip() for k in args.chaos_exclude.split(",") if k.strip()
                    )
                    sections[name] = chaos.run(ctx, args.chaos_minutes, args.chaos_seed, left_out)
                elif name == "graph":
                    if args.minilm_cache:
                        graph_build.MINILM_CACHE = Path(args.minilm_cache)
                    sections[name] = graph_build.run(
                        ctx,
                        [s.strip() for s in args.graph_sets.split(",") if s.strip()],
                        [m.strip() for m in args.graph_methods.split(",") if m.strip()],
                        args.graph_crossover or None,
                    )
                results["timings_s"][name] = time.perf_counter() - begin
                say(f"section {name} done in {results['timings_s'][name]:.0f}s")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_at_end"] = load_average()
    results["total_s"] = time.perf_counter() - started

    lines = render(results)
    text = "\n".join(lines)
    print(text)
    base = out / f"bench-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    base.with_suffix(".md").write_text(text + "\n")
    png = report.chart(sections, base.with_suffix(".png"))
    for suffix in (".json", ".md", ".png"):
        source = base.with_suffix(suffix)
        if source.exists():
            shutil.copyfile(source, out / f"latest{suffix}")
    files = ".json/.md/.png" if png else ".json/.md"
    say(f"wrote {base}{files} (and latest.*) in {results['total_s']:.0f}s")
    return 0


def render(results: dict[str, Any]) -> list[str]:
    m, sections = results["machine"], results["sections"]
    lines = [
        f"## Benchmark run {results['started']}",
        "",
        f"`{results['command'].strip()}` - {m['cpus']} CPUs ({m['cpu_model']}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, faiss "
        f"{m['faiss']}, {m['seaweedfs']}; load average {m['load_average_at_start']:.1f} at "
        f"start, {m.get('load_average_at_end', float('nan')):.1f} at end; "
        f"{results.get('total_s', 0) / 60:.1f} min.",
        "",
    ]
    modules = {
        "e2e": e2e,
        "memory": memory_estimate,
        "transfers": transfers,
        "variants": variants,
        "service": service_load,
        "fleet": fleet,
        "modes": build_modes,
        "chaos": chaos,
        "graph": graph_build,
    }
    verdicts: list[str] = []
    for name, module in modules.items():
        if name in sections:
            lines += [*module.table(sections[name]), ""]
            verdict = getattr(module, "verdict", None)
            if verdict is not None:
                verdicts += verdict(sections[name])
    if verdicts:
        lines += ["### Targets", ""] + [f"- {v}" for v in verdicts]
    if results["timings_s"]:
        times = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
        lines += ["", f"Section wall times: {times}."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
