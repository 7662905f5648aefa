"""Section ``modes``: CPU build modes (standard / fast / auto) on three kinds of data.

Each build runs in a fresh ``benchmarks.job mode`` child over rows held in
anonymous memory (released batch by batch, as after a download), then the
job's own quality check. Recall@10 is measured per ``ef_search`` on a separate
seeded sample of 1000 of the segment's own rows (each row's own id excluded),
against exact search over the stored vectors. Repeats interleave the modes, so
each repeat's speed-up is a ratio of neighbouring runs; tables show medians.

Data sets:

* ``cohere-1k``: the shipped sample (1k x 768 real Cohere embeddings), l2.
* ``clustered``: a generated Gaussian mixture (32 centres, isotropic noise:
  a flat spectrum inside each cluster), ``--modes-size`` x 768, l2.
* ``man-lsa``: LSA vectors of this machine's man-page paragraphs
  (``benchmarks/text_embeddings.py``), ``--modes-size`` x 256, unit length, l2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Context, fmt_count, median, run_child, say

MODES = ("standard", "fast", "auto")
EFS = (10, 16, 24, 32, 48, 64, 100, 150, 200)


def _body(n: int, dim: int) -> dict[str, Any]:
    return {
        "repository_type": "s3",
        "container_name": "bench",
        "vector_path": "modes/x.knnvec",
        "doc_id_path": "modes/x.knndid",
        "dimension": dim,
        "doc_count": n,
        "data_type": "float",
        "index_parameters": {
            "space_type": "l2",
            "algorithm_parameters": {"m": 16, "ef_construction": 100, "ef_search": 100},
        },
    }


def data_sets(work: Path, n: int) -> dict[str, Path]:
    """Write (once) each set's rows as ``.npy`` under ``work``."""
    from benchmarks.text_embeddings import lsa_embeddings
    from testbed.data import clustered, cohere_sample

    out: dict[str, Path] = {}
    makers: dict[str, Callable[[], np.ndarray]] = {
        "cohere-1k": lambda: cohere_sample()[0],
        f"clustered-{fmt_count(n)}": lambda: clustered(n, 768, seed=7),
        f"man-lsa-{fmt_count(n)}": lambda: lsa_embeddings(n),
    }
    for name, make in makers.items():
        path = work / f"modes-{name}.npy"
        if not path.exists():
            say(f"  data: making {name}")
            np.save(path, np.ascontiguousarray(make(), dtype=np.float32))
        out[name] = path
    return out


def run(ctx: Context, n: int) -> dict[str, Any]:
    sets = data_sets(ctx.work_dir, n)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for repeat in range(ctx.repeats):
        for name, path in sets.items():
            rows = np.load(path, mmap_mode="r")
            body = _body(int(rows.shape[0]), int(rows.shape[1]))
            for mode in MODES:
                result = run_child(
                    ["mode", "--request", json.dumps(body), "--rows", str(path), "--mode", mode]
                )
                runs.setdefault(name, {}).setdefault(mode, []).append(result)
                say(
                    f"  modes {name} {mode:<8} repeat {repeat + 1}: build {result['wall_s']:.2f}s"
                    f", check {result['check_s']:.2f}s, recall@10 ef100 "
                    f"{result['recall_by_ef']['100']:.4f} (used {result['report']['build_mode']})"
                )
    return {"n": n, "repeats": ctx.repeats, "runs": runs, "summary": summarize(runs)}


def _ef_to_match(curve: dict[str, float], target: float) -> int | None:
    for ef in EFS:
        if curve[str(ef)] >= target - 1e-9:
            return ef
    return None


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, by_mode in runs.items():
        standard = by_mode["standard"]
        target = median(r["recall_by_ef"]["100"] for r in standard)
        for mode, results in by_mode.items():
            curve = {str(ef): median(r["recall_by_ef"][str(ef)] for r in results) for ef in EFS}
            paired = [s["wall_s"] / r["wall_s"] for s, r in zip(standard, results, strict=False)]
            used = sorted({r["report"]["build_mode"] for r in results})
            summary[f"{name}/{mode}"] = {
                "set": name,
                "mode": mode,
                "used": "/".join(used),
                "fallbacks": sum(bool(r["report"]["fallback"]) for r in results),
                "build_s": median(r["wall_s"] for r in results),
                "speedup": median(paired),
                "speedups": paired,
                "recall_ef100": curve["100"],
                "ef_to_match": _ef_to_match(curve, target),
                "report_recall": median(r["report"]["recall"] for r in results),
                "check_s": median(r["check_s"] for r in results),
                "check_share": median(r["check_s"] / r["wall_s"] for r in results),
                "peak_over_baseline": median(r["peak_rss"] - r["baseline_rss"] for r in results),
                "blob_plus_index": results[0]["vector_blob_bytes"] + results[0]["index_bytes"],
                "pilot": results[0]["report"].get("pilot"),
            }
    return summary


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### CPU build modes (m 16, ef_construction 100, recall@10 at ef_search 100 on 1000 "
        f"of the set's own rows, median of {result['repeats']})",
        "",
        "| data set | mode | graph built | build s | speed-up vs standard (paired) | recall@10 "
        "ef 100 | ef to match standard@100 | report recall (256 rows) | check s | check / build "
        "| (peak - baseline) / (blob + index) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["summary"].values():
        used = row["used"] + (f" ({row['fallbacks']} fallbacks)" if row["fallbacks"] else "")
        ef = row["ef_to_match"]
        lines.append(
            f"| {row['set']} | {row['mode']} | {used} | {row['build_s']:.2f} "
            f"| {row['speedup']:.2f} | {row['recall_ef100']:.4f} "
            f"| {'>200' if ef is None else ef} | {row['report_recall']:.4f} "
            f"| {row['check_s']:.2f} | {100 * row['check_share']:.1f} % "
            f"| {row['peak_over_baseline'] / row['blob_plus_index']:.2f} |"
        )
    return lines


def verdict(result: dict[str, Any]) -> list[str]:
    out = []
    for row in result["summary"].values():
        if row["mode"] == "standard":
            continue
        standard = result["summary"][f"{row['set']}/standard"]
        fast_enough = row["speedup"] >= 1.5
        as_good = row["recall_ef100"] >= standard["recall_ef100"]
        out.append(
            f"{row['set']} {row['mode']}: speed-up {row['speedup']:.2f} x (target 1.5), recall "
            f"{row['recall_ef100']:.4f} vs standard {standard['recall_ef100']:.4f} -> "
            f"{'MET' if fast_enough and as_good else 'MISSED'}"
        )
        out.append(
            f"{row['set']} {row['mode']}: quality check {100 * row['check_share']:.1f} % of the "
            f"build (target 5 %) -> {'MET' if row['check_share'] <= 0.05 else 'MISSED'}"
        )
    return out
