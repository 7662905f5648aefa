"""Section 4: build variants, so the defaults are chosen by data.

* **Storage x OpenMP threads**: the service's ``CpuBuilder`` on in-memory rows,
  HNSW (m 16, ef_construction 100) with flat fp32 storage (``float``), fp16
  scalar-quantized storage (``half_float``) and 8-bit direct signed storage over
  int8-scaled rows (``byte``), with Faiss on 1 and on 2 OpenMP threads. Recall@10
  at ef_search 100 on held-out queries, against exact search over the rows the
  index was given and, for the quantized kinds, over the original float rows.
* **Rows per add** (``CpuBuilder(add_batch_rows=...)``): full jobs through the
  workflow, so the download buffer's pages are released batch by batch as in
  the service; build time and peak memory per batch size, float and byte.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.common import Context, fmt_count, median, run_child, say

STORAGE = {"float": "flat fp32", "half_float": "fp16 SQ", "byte": "int8 SQ (8bit_direct_signed)"}


def _variant(ctx: Context, data_type: str, n: int, dim: int, threads: int) -> dict[str, Any]:
    blobs = ctx.blobs(n, dim, "byte" if data_type == "byte" else "float")
    body = blobs.request_body(data_type=data_type)
    args = ["variant", "--request", json.dumps(body), "--vectors", str(blobs.vector_file)]
    args += ["--doc-ids", str(blobs.doc_id_file), "--queries", str(blobs.query_file)]
    args += ["--threads", str(threads), "--batch-rows", "0"]
    if data_type == "byte":
        # Quantization's end-to-end cost: recall against the float rows' true neighbours
        # (half_float rows are the float rows, so its recall already is that).
        folder = blobs.vector_file.parent
        args += ["--float-rows", str(folder / "float_rows.npy")]
        args += ["--float-queries", str(folder / "float_queries.npy")]
    return run_child(args)


def run(
    ctx: Context,
    n: int,
    dim: int,
    threads: list[int],
    batch_n: int,
    batches: list[int],
    reuse: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``reuse``: jobs already run elsewhere, by ``"<data type>/<rows per add>"``."""
    grid: dict[str, list[dict[str, Any]]] = {}
    batch_runs: dict[str, list[dict[str, Any]]] = {k: list(v) for k, v in (reuse or {}).items()}
    for repeat in range(ctx.repeats):
        for data_type in STORAGE:
            for count in threads:
                result = _variant(ctx, data_type, n, dim, count)
                grid.setdefault(f"{data_type}/{count}", []).append(result)
                say(
                    f"  variant {fmt_count(n)}x{dim} {data_type:<10} {count} thread(s) "
                    f"repeat {repeat + 1}: {result['wall_s']:.2f}s, recall {result['recall']:.3f}"
                )
        for data_type in ("float", "byte"):
            blobs = ctx.blobs(batch_n, dim, data_type)
            seen = set()
            for rows in batches:
                effective = min(rows or batch_n, batch_n)
                if effective in seen:
                    continue
                seen.add(effective)
                done = batch_runs.setdefault(f"{data_type}/{effective}", [])
                if len(done) > repeat:
                    continue  # measured by an earlier section
                result = ctx.workflow(blobs.request_body(), batch_rows=effective)
                done.append(result)
                say(
                    f"  batch {fmt_count(batch_n)}x{dim} {data_type:<6} {effective} rows "
                    f"repeat {repeat + 1}: build {result['stages']['build']:.2f}s, "
                    f"peak - baseline {(result['peak_rss'] - result['baseline_rss']) / 1e6:.0f} MB"
                )
    summary: dict[str, Any] = {}
    for name, results in grid.items():
        kind, thread_count = name.split("/")
        row = {
            "data_type": kind,
            "threads": int(thread_count),
            "build_s": median(r["wall_s"] for r in results),
            "cpu_s": median(r["cpu_s"] for r in results),
            "recall": median(r["recall"] for r in results),
            "peak_over_baseline": median(r["peak_rss"] - r["baseline_rss"] for r in results),
        }
        if any("recall_vs_float" in r for r in results):
            row["recall_vs_float"] = median(r["recall_vs_float"] for r in results)
        summary[name] = row
    for row in summary.values():
        one = summary.get(f"{row['data_type']}/1")
        row["speedup_vs_1_thread"] = one["build_s"] / row["build_s"] if one else None
    batch_summary: dict[str, Any] = {}
    for name, results in batch_runs.items():
        kind, batch_text = name.split("/")
        batch_summary[name] = {
            "data_type": kind,
            "batch_rows": int(batch_text),
            "adds": -(-batch_n // int(batch_text)),
            "build_s": median(r["stages"]["build"] for r in results),
            "wall_s": median(r["wall_s"] for r in results),
            "cpu_s": median(r["cpu_s"] for r in results),
            "peak_over_baseline": median(r["peak_rss"] - r["baseline_rss"] for r in results),
            "vector_blob_bytes": results[0]["vector_blob_bytes"],
            "index_bytes": results[0]["index_bytes"],
        }
    return {
        "n": n,
        "dim": dim,
        "batch_n": batch_n,
        "repeats": ctx.repeats,
        "summary": summary,
        "batches": batch_summary,
        "runs": {"grid": grid, "batches": batch_runs},
    }


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### 4. Build variants ({fmt_count(result['n'])} x {result['dim']}, m 16, "
        f"ef_construction 100, recall@10 at ef_search 100, median of {result['repeats']})",
        "",
        "| data type | storage | OpenMP threads | build s | CPU s | speed-up vs 1 thread "
        "| recall@10 | recall@10 vs float truth | peak - baseline MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["summary"].values():
        speedup = row.get("speedup_vs_1_thread")
        vs_float = row.get("recall_vs_float")
        lines.append(
            f"| {row['data_type']} | {STORAGE[row['data_type']]} | {row['threads']} "
            f"| {row['build_s']:.2f} | {row['cpu_s']:.1f} "
            f"| {'' if speedup is None else f'{speedup:.2f}'} | {row['recall']:.3f} "
            f"| {'' if vs_float is None else f'{vs_float:.3f}'} "
            f"| {row['peak_over_baseline'] / 1e6:.0f} |"
        )
    lines += [
        "",
        f"#### Rows per `add` call (full jobs, {fmt_count(result['batch_n'])} x "
        f"{result['dim']}, 2 threads, memory mode)",
        "",
        "| data type | rows per add | adds | build s | job wall s | CPU s | peak - baseline MB "
        "| (peak - baseline) / (blob + index) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["batches"].values():
        ratio = row["peak_over_baseline"] / (row["vector_blob_bytes"] + row["index_bytes"])
        lines.append(
            f"| {row['data_type']} | {row['batch_rows']} | {row['adds']} | {row['build_s']:.2f} "
            f"| {row['wall_s']:.2f} | {row['cpu_s']:.1f} "
            f"| {row['peak_over_baseline'] / 1e6:.0f} | {ratio:.2f} |"
        )
    return lines
