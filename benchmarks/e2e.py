"""Section 1: a full job through the workflow vs Faiss building the same index from memory.

The yardstick (``raw``) adds the whole float array to ``IndexIDMap(IndexHNSWFlat(d, 16))``
with ef_construction 100 in one ``add_with_ids`` call, in a process that has
already read the array from local disk. The job downloads both blobs from the
local S3 server, parses, builds with the service's ``CpuBuilder``, serializes
and uploads (both serialization modes). Every measurement is a fresh child;
the order of the three rotates from repeat to repeat so drift in the machine's
load falls on all of them alike.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import (
    Context,
    cpu_seconds_of,
    fmt_count,
    median,
    run_child,
    s3_server_process,
    say,
)

KINDS = ("raw", "raw-batched", "memory", "memory-sequential", "disk")
RAW_KINDS = ("raw", "raw-batched")
# Rows per add of the batched raw build: the service's default (BuilderOptions).
RAW_BATCH_ROWS = 32768
# Targets of job wall / raw build (issue 13: memory mode with the overlapped upload).
WALL_TARGETS = {"memory": 1.02, "disk": 1.10}
STAGES = ("download", "parse", "build", "serialize", "serialize+upload", "upload")


def run(ctx: Context, n: int, dim: int, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """``kinds``: a subset of KINDS with at least one raw build (large sizes take long)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not set(kinds) & set(RAW_KINDS):
        raise ValueError(f"e2e kinds must be some of {KINDS}, with a raw one; got {kinds}")
    kinds = tuple(kind for kind in KINDS if kind in kinds)
    blobs = ctx.blobs(n, dim, "float")
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    server = s3_server_process()
    for repeat in range(ctx.repeats):
        shift = repeat % len(kinds)
        order = kinds[shift:] + kinds[:shift]
        for kind in order:
            server_cpu = cpu_seconds_of(server)
            if kind in RAW_KINDS:
                args = ["raw", "--vectors", str(blobs.vector_file)]
                args += ["--doc-ids", str(blobs.doc_id_file), "--dim", str(dim)]
                if kind == "raw-batched":
                    args += ["--batch-rows", str(RAW_BATCH_ROWS)]
                result = run_child(args, profile=ctx.profile(f"e2e-{n}x{dim}-{kind}"))
            else:
                profile = f"e2e-{n}x{dim}-{kind}"
                mode, overlap = kind.split("-")[0], not kind.endswith("-sequential")
                body = blobs.request_body()
                result = ctx.workflow(body, mode=mode, profile=profile, overlap=overlap)
            # The local S3 server runs on the same cores: its CPU time during the job.
            result["server_cpu_s"] = cpu_seconds_of(server) - server_cpu
            runs[kind].append(result)
            say(
                f"  e2e {fmt_count(n)}x{dim} {kind:<6} repeat {repeat + 1}: "
                f"{result['wall_s']:.2f}s wall, {result['cpu_s']:.1f} CPU-s "
                f"(load {result['load_before']:.1f})"
            )
    # The yardstick is the faster plain Faiss build of the two, in this run.
    raws = [kind for kind in RAW_KINDS if kind in runs]
    fastest = min(raws, key=lambda kind: median(r["wall_s"] for r in runs[kind]))
    raw_wall = median(r["wall_s"] for r in runs[fastest])
    raw_cpu = median(r["cpu_s"] for r in runs[fastest])
    summary: dict[str, Any] = {}
    for kind, results in runs.items():
        wall = median(r["wall_s"] for r in results)
        cpu = median(r["cpu_s"] for r in results)
        stages = {"build": wall} if kind in RAW_KINDS else {}
        if kind not in RAW_KINDS:
            for stage in STAGES:
                values = [r["stages"][stage] for r in results if stage in r["stages"]]
                if values:
                    stages[stage] = median(values)
        summary[kind] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "server_cpu_s": median(r["server_cpu_s"] for r in results),
            "wall_ratio": wall / raw_wall,
            "cpu_ratio": cpu / raw_cpu,
            # Paired: each job against the raw build of the same repeat.
            "paired_wall_ratios": [
                job["wall_s"] / raw["wall_s"]
                for job, raw in zip(results, runs[fastest], strict=True)
            ],
            # What the job adds around its build (transfers, parse, serialization), as a
            # share of the raw build: immune to the build's own run-to-run spread.
            "outside_build_ratio": (
                median(r["wall_s"] - r["stages"].get("build", 0.0) for r in results) / raw_wall
                if kind not in RAW_KINDS
                else 0.0
            ),
            "stages": stages,
            "peak_rss": median(r["peak_rss"] for r in results),
            "peak_over_baseline": median(r["peak_rss"] - r["baseline_rss"] for r in results),
            "index_bytes": results[0].get("index_bytes"),
            "load": median(r["load_before"] for r in results),
        }
    return {
        "n": n,
        "dim": dim,
        "repeats": ctx.repeats,
        "vector_blob_bytes": blobs.vector_bytes,
        "summary": summary,
        "yardstick": fastest,
        "runs": runs,
        "target": {"max_wall_ratio": WALL_TARGETS},
    }


def table(result: dict[str, Any]) -> list[str]:
    n, dim, s = result["n"], result["dim"], result["summary"]
    lines = [
        f"### 1. End-to-end job vs raw Faiss build ({fmt_count(n)} x {dim} float, "
        f"median of {result['repeats']})",
        "",
        "| run | wall s | CPU s | S3 server CPU s | download | parse | build | serialize "
        "| upload | wall / raw | wall / raw, paired per repeat | outside build / raw "
        "| CPU / raw | peak RSS MB | (peak - baseline) / (blob + index) | load avg |",
        "| --- " + "| ---: " * 15 + "|",
    ]
    lines[0] += f"; yardstick: {result.get('yardstick', 'raw')}"
    names = {
        "raw": "raw faiss, one add (in-memory array)",
        "raw-batched": f"raw faiss, {RAW_BATCH_ROWS}-row adds, storage reserved",
        "memory": "job, memory mode (upload overlapped with the build)",
        "memory-sequential": "job, memory mode, upload after the build",
        "disk": "job, disk mode",
    }
    for kind in (kind for kind in KINDS if kind in s):
        row = s[kind]
        st = row["stages"]
        upload = st.get("upload", st.get("serialize+upload"))
        serialize = "(streamed)" if "serialize+upload" in st else _num(st.get("serialize"))
        lines.append(
            f"| {names[kind]} | {row['wall_s']:.2f} | {row['cpu_s']:.1f} "
            f"| {row['server_cpu_s']:.1f} "
            f"| {_num(st.get('download'))} | {_num(st.get('parse'))} | {_num(st.get('build'))} "
            f"| {serialize} | {_num(upload)} | {row['wall_ratio']:.3f} "
            f"| {_paired(row)} | {row['outside_build_ratio']:.3f} | {row['cpu_ratio']:.3f} "
            f"| {row['peak_rss'] / 1e6:.0f} | {_held(row, result)} | {row['load']:.1f} |"
        )
    return lines


def _held(row: dict[str, Any], result: dict[str, Any]) -> str:
    """The job's memory over its baseline per byte of data it holds (not for raw)."""
    if not row.get("index_bytes"):
        return ""
    held = result["vector_blob_bytes"] + row["index_bytes"]
    return f"{row['peak_over_baseline'] / held:.2f}"


def _paired(row: dict[str, Any]) -> str:
    ratios = row.get("paired_wall_ratios") or []
    if not ratios:
        return ""
    spread = ", ".join(f"{r:.2f}" for r in ratios)
    return f"{median(ratios):.3f} ({spread})"


def verdict(result: dict[str, Any]) -> list[str]:
    out = []
    for kind, limit in result["target"]["max_wall_ratio"].items():
        if kind not in result["summary"]:
            continue
        row = result["summary"][kind]
        ratio = row["wall_ratio"]
        status = "MET" if ratio <= limit else f"MISSED by {100 * (ratio / limit - 1):.1f}%"
        paired = median(row.get("paired_wall_ratios") or [float("nan")])
        out.append(
            f"job wall <= {limit:.2f} x raw build ({kind} mode, {fmt_count(result['n'])} x "
            f"{result['dim']}): {ratio:.3f} (median of repeat-paired ratios {paired:.3f}; "
            f"outside the build {row['outside_build_ratio']:.3f}) -> {status}"
        )
    return out


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
