"""Section ``graph``: graph-first builds against Faiss HNSW, per data set, in the same run.

Each set is split into base rows and held-out queries (exact ground truth, recall@10 at
ef 50 / 100 / 200). Every repeat runs each method once in a fresh child
(``benchmarks/graph_job.py``), methods interleaved; tables show medians and the
speed-up against the ``faiss`` build of the same repeat (median of per-repeat ratios).
The ``gpu-replay`` method's exact ``4 m``-NN graph (the stand-in for CAGRA's) is
computed once per set here, outside the timed build, as a GPU would hand it over.

A second table, ``crossover``, builds growing prefixes of one set by insertion
(``standard``) and from the exact kNN graph (``exact-knn``) to place
``knn_graph.EXACT_KNN_MAX_ROWS``.

Sets (``--graph-sets``): ``cohere-1k-l2`` / ``cohere-1k-ip`` (the shipped sample),
``minilm-<rows>-ip`` / ``minilm-<rows>-l2`` (all-MiniLM-L6-v2 over man-page paragraphs,
``benchmarks/minilm.py``; needs ``make text-bench-deps``; ``byte-minilm-<rows>``: those
rows as int8, ``binary-minilm-<rows>``: their sign bits), ``lsa-<rows>`` (man-page LSA,
256-d, a decaying spectrum of real text), ``clustered-<rows>`` (Gaussian mixture, 768-d),
``tight-<rows>`` (300 clusters far tighter than their spacing: a plain kNN graph falls
apart), ``decay-<rows>`` (synthetic decaying spectrum, variance of axis i ~ 1/i, 256-d).
``<rows>`` counts base rows (``20k``); 1000 more are made for the held-out queries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Context, median, run_child, say

METHODS = ("faiss", "default", "fast", "blocked", "gpu-replay")
QUERIES = 1000
CROSSOVER_SIZES = (1000, 2000, 4000, 8000, 16000)


def _split(rows: np.ndarray, queries: int) -> tuple[np.ndarray, np.ndarray]:
    held = min(queries, max(1, len(rows) // 10))
    return rows[:-held], rows[-held:]


def _tight(n: int, dim: int = 128, clusters: int = 300) -> np.ndarray:
    rng = np.random.default_rng(5)
    centres = rng.normal(0.0, 10.0, (clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + rng.normal(0.0, 0.05, (n, dim))).astype(np.float32)


def _decay(n: int, dim: int = 256) -> np.ndarray:
    rng = np.random.default_rng(6)
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    return (rng.standard_normal((n, dim)).astype(np.float32) * scale).astype(np.float32)


MINILM_ROWS = 101_000  # 100k base rows + 1000 held-out queries
# Where the MiniLM vectors are read from (``--minilm-cache``; default: the work directory).
MINILM_CACHE: Path | None = None


def _minilm(work: Path, n: int) -> np.ndarray:
    """The first ``n`` MiniLM rows of the cache that ``python -m benchmarks.minilm 101000
    <cache>`` writes (an hour or more; its saved rows may be read while it runs).

    Never encodes here: a second encoder beside a running one would write the same file.
    """
    cache = MINILM_CACHE or work / f"minilm-{MINILM_ROWS}.npy"
    rows: np.ndarray = np.load(cache, mmap_mode="r") if cache.exists() else np.zeros((0, 384))
    if len(rows) < n:
        raise SystemExit(
            f"{cache} holds {len(rows)} MiniLM rows, {n} needed: run "
            f"python -m benchmarks.minilm {MINILM_ROWS} {cache} (it resumes) and wait"
        )
    return np.ascontiguousarray(rows[:n])


def _count(text: str) -> int:
    return int(text[:-1]) * 1000 + QUERIES if text.endswith("k") else int(text) + QUERIES


def _normalized(rows: np.ndarray) -> np.ndarray:
    out: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out.astype(np.float32)


def _maker(name: str, work: Path) -> tuple[Callable[[], np.ndarray], str, str]:
    """(rows, space type, data type) of a set name."""
    from benchmarks.text_embeddings import lsa_embeddings
    from testbed.data import clustered, cohere_sample, to_int8

    parts = name.split("-")
    if parts[0] == "minilm":  # minilm-<rows>-ip / -l2
        n = _count(parts[1])
        space = "innerproduct" if parts[2] == "ip" else "l2"
        return (lambda: _minilm(work, n)), space, "float"
    if parts[1:2] == ["minilm"]:  # byte-minilm-<rows>, binary-minilm-<rows>
        n = _count(parts[2])
        if parts[0] == "byte":
            return (lambda: to_int8(_minilm(work, n))), "l2", "byte"
        return (lambda: np.packbits(_minilm(work, n) > 0, axis=1)), "hamming", "binary"
    generated: dict[str, Callable[[int], np.ndarray]] = {
        "lsa": lsa_embeddings,
        "clustered": lambda n: clustered(n, 768, seed=7),
        "tight": _tight,
        "decay": _decay,
    }
    if parts[0] in generated:  # <kind>-<rows>
        n = _count(parts[1])
        return (lambda: generated[parts[0]](n)), "l2", "float"
    table: dict[str, tuple[Callable[[], np.ndarray], str, str]] = {
        "cohere-1k-l2": (lambda: cohere_sample()[0], "l2", "float"),
        "cohere-1k-ip": (lambda: _normalized(cohere_sample()[0]), "innerproduct", "float"),
    }
    return table[name]


def prepare(work: Path, name: str, with_graph: bool = True) -> dict[str, Any]:
    """Base rows, queries, exact truth and (``with_graph``) the exact 4m-NN graph of a set,
    as .npy files."""
    import faiss

    make, space, data_type = _maker(name, work)
    stem = work / f"graph-{name}"
    parts = ("rows", "queries", "truth", "truthd", "graph")
    files = {part: Path(f"{stem}-{part}.npy") for part in parts}
    if not all(path.exists() for part, path in files.items() if part != "graph"):
        say(f"  data: making {name}")
        base, queries = _split(np.ascontiguousarray(make()), QUERIES)
        np.save(files["rows"], base)
        np.save(files["queries"], queries)
        if data_type == "binary":
            distances, truth = faiss.knn_hamming(queries, base, 10)
        else:
            metric = faiss.METRIC_INNER_PRODUCT if space == "innerproduct" else faiss.METRIC_L2
            distances, truth = faiss.knn(
                queries.astype(np.float32), base.astype(np.float32), 10, metric
            )
        np.save(files["truth"], np.asarray(truth))
        np.save(files["truthd"], np.asarray(distances))
    if with_graph and not files["graph"].exists():
        say(f"  data: the exact {name} graph (the stand-in for CAGRA's)")
        base = np.load(files["rows"])
        np.save(files["graph"], _exact_graph(base, space, data_type))
    return {"files": files, "space": space, "data_type": data_type}


def _exact_graph(base: np.ndarray, space: str, data_type: str) -> np.ndarray:
    """The 4m-NN graph (m 16) the GPU replay assembles, through the builder's own code."""
    from benchmarks.graph_job import _request
    from remote_vector_index_builder.core.dataset import parse
    from remote_vector_index_builder.core.index_builder import fill_storage, new_inner_index
    from remote_vector_index_builder.core.knn_graph import StoredRows, exact_knn

    request = _request(len(base), base.shape[1], data_type, space)
    blob = np.frombuffer(bytearray(np.ascontiguousarray(base).tobytes()), dtype=np.uint8)
    ids = np.arange(len(base), dtype="<i4").view(np.uint8)
    scratch = new_inner_index(request)
    fill_storage(scratch, parse(request, blob, ids), 32768)
    return exact_knn(StoredRows(scratch), 4 * request.m).ids


def _child(files: dict[str, Path], space: str, data_type: str, method: str) -> dict[str, Any]:
    args = [
        "graph",
        "--rows", str(files["rows"]),
        "--queries", str(files["queries"]),
        "--truth", str(files["truth"]),
        "--truth-distances", str(files["truthd"]),
        "--space", space,
        "--data-type", data_type,
        "--method", method,
    ]  # fmt: skip
    if method == "gpu-replay":
        args += ["--graph", str(files["graph"])]
    return run_child(args)


def run(ctx: Context, sets: list[str], methods: list[str], crossover: str | None) -> dict[str, Any]:
    replay = "gpu-replay" in methods
    prepared = {name: prepare(ctx.work_dir, name, replay) for name in sets}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for repeat in range(ctx.repeats):
        for name, info in prepared.items():
            for method in methods:
                if method in ("fast", "blocked") and info["data_type"] == "binary":
                    continue  # binary always takes the standard path
                result = _child(info["files"], info["space"], info["data_type"], method)
                runs.setdefault(name, {}).setdefault(method, []).append(result)
                say(
                    f"  graph {name} {method:<10} repeat {repeat + 1}: {result['wall_s']:.2f}s "
                    f"{result['cpu_s']:.1f} CPU-s ({result['build_path']}), recall@10 ef100 "
                    f"{result['recall']['100']:.4f} (ties {result['tie_recall']['100']:.4f}), "
                    f"ndis {result['ndis']['100']:.0f}, load {result['load_before']:.1f}"
                )
    out: dict[str, Any] = {"repeats": ctx.repeats, "runs": runs, "summary": summarize(runs)}
    if crossover:
        out["crossover"] = run_crossover(ctx, crossover)
    return out


def run_crossover(ctx: Context, name: str) -> dict[str, Any]:
    info = prepare(ctx.work_dir, name, with_graph=False)
    rows = np.load(info["files"]["rows"], mmap_mode="r")
    queries = info["files"]["queries"]
    times: dict[int, dict[str, list[float]]] = {}
    recalls: dict[int, dict[str, list[float]]] = {}
    for _ in range(ctx.repeats):
        for size in CROSSOVER_SIZES:
            if size > len(rows):
                continue
            files = _prefix(ctx.work_dir, name, rows, size, queries, info["space"])
            for method in ("standard", "exact-knn"):
                result = _child(files, info["space"], info["data_type"], method)
                times.setdefault(size, {}).setdefault(method, []).append(result["wall_s"])
                recalls.setdefault(size, {}).setdefault(method, []).append(result["recall"]["100"])
                say(f"  crossover {name} {size} {method}: {result['wall_s']:.2f}s")
    return {
        "set": name,
        "rows": {
            str(size): {
                method: {"build_s": median(values), "recall_ef100": median(recalls[size][method])}
                for method, values in by.items()
            }
            for size, by in times.items()
        },
    }


def _prefix(
    work: Path, name: str, rows: np.ndarray, size: int, queries: Path, space: str
) -> dict[str, Path]:
    import faiss

    stem = work / f"graph-{name}-prefix-{size}"
    files = {part: Path(f"{stem}-{part}.npy") for part in ("rows", "queries", "truth")}
    if not files["truth"].exists():
        base = np.ascontiguousarray(rows[:size])
        q = np.load(queries)
        metric = faiss.METRIC_INNER_PRODUCT if space == "innerproduct" else faiss.METRIC_L2
        _, truth = faiss.knn(q.astype(np.float32), base.astype(np.float32), 10, metric)
        np.save(files["rows"], base)
        np.save(files["queries"], q)
        np.save(files["truth"], np.asarray(truth))
    return files


EF_KEYS = ("50", "100", "200")


def paired_interval(
    ours: list[int], theirs: list[int], draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean per-query difference of recall@10 (ours - theirs) and its 95 % bootstrap
    interval over the queries: how far two builds' recalls may differ by which
    held-out queries were drawn alone."""
    diff = (np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)) / 10.0
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, by_method in runs.items():
        yardstick = by_method.get("faiss", [])
        for method, results in by_method.items():
            paired = [f["wall_s"] / r["wall_s"] for f, r in zip(yardstick, results, strict=False)]
            paired_cpu = [f["cpu_s"] / r["cpu_s"] for f, r in zip(yardstick, results, strict=False)]
            versus = {
                ef: paired_interval(results[0]["hits"][ef], yardstick[0]["hits"][ef])
                for ef in EF_KEYS
                if yardstick and "hits" in results[0]
            }
            summary[f"{name}/{method}"] = {
                "set": name,
                "method": method,
                "n": results[0]["n"],
                "path": "/".join(sorted({r["build_path"] for r in results})),
                "build_s": median(r["wall_s"] for r in results),
                "cpu_s": median(r["cpu_s"] for r in results),
                "speedup": median(paired) if paired else None,
                "cpu_speedup": median(paired_cpu) if paired_cpu else None,
                "recall": {ef: median(r["recall"][ef] for r in results) for ef in EF_KEYS},
                "tie_recall": {
                    ef: median(r["tie_recall"].get(ef, float("nan")) for r in results)
                    for ef in EF_KEYS
                },
                "versus_faiss": versus,
                "ndis": median(r["ndis"]["100"] for r in results),
                "ndis_by_ef": {ef: median(r["ndis"][ef] for r in results) for ef in EF_KEYS},
                "qps": median(r["qps_1_thread"] for r in results),
                "peak_over_baseline": median(r["peak_rss"] - r["baseline_rss"] for r in results),
                "estimate": results[0]["estimate_host_bytes"],
                "load": median(r["load_before"] for r in results),
            }
    return summary


def holds_recall(row: dict[str, Any]) -> bool:
    """Recall held against Faiss HNSW: at every ef, the 95 % paired interval of the
    difference reaches zero or above (the loss, if any, is within what the query
    sample alone can make)."""
    versus = row.get("versus_faiss") or {}
    return all(high >= 0.0 for _, _, high in versus.values())


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### Graph-first builds vs Faiss HNSW (m 16, ef_construction 100, recall@10 on "
        f"held-out queries, median of {result['repeats']})",
        "",
        "| data set | method | graph built by | rows | build s | CPU s | speed-up (wall) "
        "| speed-up (CPU) | recall@10 ef 50 / 100 / 200 | with ties | vs Faiss ef 100 "
        "[95 % CI] | holds | distances / query ef 50 / 100 / 200 | QPS 1 thread "
        "| peak - baseline MB | estimate MB | load |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | --- "
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in result["summary"].values():
        recall = " / ".join(f"{row['recall'][ef]:.4f}" for ef in EF_KEYS)
        ties = " / ".join(f"{row['tie_recall'][ef]:.4f}" for ef in EF_KEYS)
        ndis = " / ".join(f"{row['ndis_by_ef'][ef]:.0f}" for ef in EF_KEYS)
        speedup = "" if row["speedup"] is None else f"{row['speedup']:.2f}"
        cpu_speedup = "" if row["cpu_speedup"] is None else f"{row['cpu_speedup']:.2f}"
        versus, holds = "", ""
        if row["method"] != "faiss" and row.get("versus_faiss"):
            mean, low, high = row["versus_faiss"]["100"]
            versus = f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
            holds = "yes" if holds_recall(row) else "no"
        lines.append(
            f"| {row['set']} | {row['method']} | {row['path']} | {row['n']} "
            f"| {row['build_s']:.2f} | {row['cpu_s']:.1f} | {speedup} | {cpu_speedup} "
            f"| {recall} | {ties} | {versus} | {holds} | {ndis} | {row['qps']:.0f} "
            f"| {row['peak_over_baseline'] / 1e6:.0f} | {row['estimate'] / 1e6:.0f} "
            f"| {row['load']:.1f} |"
        )
    crossover = result.get("crossover")
    if crossover:
        lines += [
            "",
            f"#### Exact kNN graph vs insertion by segment size ({crossover['set']})",
            "",
            "| rows | insertion s | exact kNN + assembly s | ratio | recall@10 ef 100 "
            "insertion / exact |",
            "| ---: | ---: | ---: | ---: | --- |",
        ]
        for size, by in crossover["rows"].items():
            std, exact = by["standard"], by["exact-knn"]
            lines.append(
                f"| {size} | {std['build_s']:.2f} | {exact['build_s']:.2f} "
                f"| {std['build_s'] / exact['build_s']:.2f} "
                f"| {std['recall_ef100']:.4f} / {exact['recall_ef100']:.4f} |"
            )
    return lines


def verdict(result: dict[str, Any]) -> list[str]:
    out = []
    for row in result["summary"].values():
        if row["method"] == "faiss":
            continue
        faiss_row = result["summary"].get(f"{row['set']}/faiss")
        if faiss_row is None:
            continue
        losses = [ef for ef in EF_KEYS if row["recall"][ef] < faiss_row["recall"][ef] - 1e-9]
        out.append(
            f"{row['set']} {row['method']}: {row['speedup']:.2f} x Faiss HNSW "
            f"({row['cpu_speedup']:.2f} x in CPU-s), recall "
            + ("held at every ef" if not losses else f"lower at ef {', '.join(losses)}")
            + (" (within the query noise)" if losses and holds_recall(row) else "")
            + f", {row['ndis']:.0f} vs {faiss_row['ndis']:.0f} distances per query"
        )
    return out


def dump(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))
