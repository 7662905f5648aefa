"""Section 2: peak memory of a job, per data type, and ``core.memory.estimate`` against it.

Each job runs in a fresh child (memory serialization mode, the service's
default). Two numbers per job:

* **absolute peak**: ``VmHWM`` of the child, interpreter and libraries included;
* **peak over baseline**: that minus the child's resident memory just before
  the job starts (Python, numpy, Faiss, boto3 and the S3 client loaded: about
  90 MB whatever the data).

The target (<= 1.15 x vector blob + index file) uses **peak over baseline**:
the baseline is paid once per service process, not per job, and it is what
admission control reserves per job (``core.memory.estimate``), so it is the
number the ratio must describe. The absolute ratio is printed beside it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import DATA_TYPES, Context, fmt_count, median, say

TARGET_RATIO = 1.15


def estimate_bytes(body: dict[str, Any], batch_rows: int = 0) -> int:
    """What admission control reserves for this request with the service's defaults."""
    from remote_vector_index_builder.core import memory
    from remote_vector_index_builder.core.builder_choice import BuilderOptions
    from remote_vector_index_builder.core.multipart import UploadPlan
    from remote_vector_index_builder.core.params import parse_request
    from remote_vector_index_builder.core.s3_calls import S3Config

    config = S3Config()
    need = memory.estimate(
        parse_request(body),
        upload=UploadPlan.of(config),
        add_batch_rows=batch_rows or BuilderOptions().add_batch_rows,
    )
    return need.host_bytes


def _measure(
    ctx: Context,
    n: int,
    dim: int,
    data_type: str,
    repeats: int,
    reuse: list[dict[str, Any]],
    mode: str = "memory",
) -> dict[str, Any]:
    blobs = ctx.blobs(n, dim, data_type)
    body = blobs.request_body()
    results = list(reuse[:repeats])
    while len(results) < repeats:
        results.append(ctx.workflow(body, mode=mode))
        r = results[-1]
        say(
            f"  memory {fmt_count(n)}x{dim} {data_type:<10} {mode:<6}: "
            f"peak {r['peak_rss'] / 1e6:.0f} MB, "
            f"over baseline {(r['peak_rss'] - r['baseline_rss']) / 1e6:.0f} MB"
        )
    vector, index = results[0]["vector_blob_bytes"], results[0]["index_bytes"]
    over = median(r["peak_rss"] - r["baseline_rss"] for r in results)
    peak = median(r["peak_rss"] for r in results)
    estimate = estimate_bytes(body)
    stage_over = {
        stage: median(r["stage_peak_rss"][stage] - r["baseline_rss"] for r in results)
        for stage in results[0]["stage_peak_rss"]
    }
    return {
        "n": n,
        "dim": dim,
        "data_type": data_type,
        "mode": mode,
        "runs": len(results),
        "vector_blob_bytes": vector,
        "index_bytes": index,
        "baseline_rss": median(r["baseline_rss"] for r in results),
        "peak_rss": peak,
        "peak_over_baseline": over,
        "stage_peak_over_baseline": stage_over,
        "ratio": over / (vector + index),
        "ratio_absolute": peak / (vector + index),
        "estimate_bytes": estimate,
        "estimate_over_measured": estimate / over,
        "spread_bytes": max(r["peak_rss"] - r["baseline_rss"] for r in results)
        - min(r["peak_rss"] - r["baseline_rss"] for r in results),
    }


def run(
    ctx: Context,
    n: int,
    dim: int,
    sweep: list[int],
    repeats: int,
    data_types: tuple[str, ...] = DATA_TYPES,
    reuse: dict[str, list[dict[str, Any]]] | None = None,
    modes: tuple[str, ...] = ("memory", "disk"),
) -> dict[str, Any]:
    """``reuse``: float jobs at ``n x dim`` already run by section 1, by mode."""
    per_type = [
        _measure(ctx, n, dim, t, repeats, (reuse or {}).get(m, []) if t == "float" else [], m)
        for m in modes
        for t in data_types
    ]
    by_size = []
    for size in sweep:
        earlier = [
            row
            for row in per_type
            if row["data_type"] == "float" and row["n"] == size and row["mode"] == "memory"
        ]
        by_size.append(earlier[0] if earlier else _measure(ctx, size, dim, "float", repeats, []))
    return {
        "n": n,
        "dim": dim,
        "repeats": repeats,
        "per_type": per_type,
        "by_size": by_size,
        "target": {"max_ratio": TARGET_RATIO},
    }


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### 2. Peak memory of a job per data type ({fmt_count(result['n'])} x "
        f"{result['dim']}; median over the runs column)",
        "",
        "| data type | serialization | runs | vector blob MB | index MB | baseline MB "
        "| peak MB "
        "| peak - baseline MB | (peak - baseline) / (blob + index) | peak / (blob + index) "
        "| estimate MB | estimate / measured |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["per_type"]:
        lines.append(_row(row, f"{row['data_type']} | {row['mode']}"))
    lines += [
        "",
        f"#### Measured vs estimated host memory (float, {result['dim']}-d, memory mode)",
        "",
        "| vectors | runs | vector blob MB | index MB | baseline MB | peak MB "
        "| peak - baseline MB | (peak - baseline) / (blob + index) | peak / (blob + index) "
        "| estimate MB | estimate / measured |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["by_size"]:
        lines.append(_row(row, fmt_count(row["n"])))
    return lines


def _row(row: dict[str, Any], label: str) -> str:
    return (
        f"| {label} | {row['runs']} | {row['vector_blob_bytes'] / 1e6:.1f} "
        f"| {row['index_bytes'] / 1e6:.1f} "
        f"| {row['baseline_rss'] / 1e6:.0f} | {row['peak_rss'] / 1e6:.0f} "
        f"| {row['peak_over_baseline'] / 1e6:.0f} | {row['ratio']:.2f} "
        f"| {row['ratio_absolute']:.2f} | {row['estimate_bytes'] / 1e6:.0f} "
        f"| {row['estimate_over_measured']:.2f} |"
    )


def verdict(result: dict[str, Any]) -> list[str]:
    limit = result["target"]["max_ratio"]
    out = []
    for row in result["per_type"]:
        ratio = row["ratio"]
        status = "MET" if ratio <= limit else f"MISSED by {100 * (ratio / limit - 1):.0f}%"
        out.append(
            f"peak - baseline <= {limit:.2f} x (blob + index), {row['data_type']}, "
            f"{row['mode']} mode: "
            f"{ratio:.2f} -> {status}"
        )
    under = [r for r in result["per_type"] + result["by_size"] if r["estimate_over_measured"] < 1]
    out.append(
        "memory estimate >= measured peak - baseline everywhere: "
        + ("yes" if not under else f"NO ({len(under)} under-estimates)")
    )
    return out
