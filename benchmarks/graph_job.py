"""The child of section ``graph``: one build by one method, then its search measurements.

``python -m benchmarks.job graph --rows X.npy --queries Q.npy --truth T.npy --method M ...``
prints one JSON line. Methods:

* ``faiss``: plain Faiss HNSW of the data type (``IndexHNSWFlat`` / ``IndexHNSWSQ`` 8-bit
  direct signed / ``IndexBinaryHNSW``), every row in one ``add``: the yardstick;
* ``standard``: the service's CPU builder by insertion (batched adds, reserved storage);
* ``default``: the CPU builder with its defaults (exact kNN graph up to
  ``knn_graph.EXACT_KNN_MAX_ROWS`` rows, insertion above);
* ``exact-knn``: the CPU builder forced onto its exact-kNN-graph path;
* ``fast``: ``RVIB_CPU_BUILD=fast``;
* ``blocked``: the CPU builder forced onto its blocked-kNN-graph path
  (``blocked_knn.DEFAULT_RULE``'s parameters, any size; insertion where the rule's
  data type and metric conditions refuse the set);
* ``gpu-replay``: the GPU path's host half, ``gpu_builder.assemble_from_graph``, fed the
  exact ``4 m``-NN graph (``--graph``, computed once by the parent) in place of CAGRA's.

Rows are copied into anonymous memory first, as a download leaves them, and the
builder hands their pages back batch by batch: peak RSS over the baseline is the
service's. Recall@10 is measured on held-out queries against exact ground truth,
with the distances each query computed (``faiss.cvar.hnsw_stats.ndis``) and
single-thread QPS at ef 100. ``tie_recall`` also counts a result as found when it
is as near as the true 10th neighbour (``--truth-distances``): sets with many
equidistant rows (duplicate paragraphs, zero rows) make the ids of exact search
an arbitrary pick among ties. ``hits`` holds each query's hits per ef, for the
parent's paired confidence intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import time
from typing import Any

import numpy as np

EFS = (50, 100, 200)


def _request(n: int, d: int, data_type: str, space: str) -> Any:
    from remote_vector_index_builder.core.params import parse_request

    bits = d * 8 if data_type == "binary" else d
    return parse_request(
        {
            "repository_type": "s3",
            "container_name": "bench",
            "vector_path": "graph/x.knnvec",
            "doc_id_path": "graph/x.knndid",
            "dimension": bits,
            "doc_count": n,
            "data_type": data_type,
            "index_parameters": {
                "space_type": space,
                "algorithm_parameters": {"m": 16, "ef_construction": 100, "ef_search": 100},
            },
        }
    )


def _faiss_index(request: Any, rows: np.ndarray) -> Any:
    """Plain Faiss: the data type's HNSW, every row in one ``add``."""
    from remote_vector_index_builder.core.index_builder import new_inner_index

    inner = new_inner_index(request)
    inner.add(rows.astype(np.float32) if request.data_type.value == "byte" else rows)
    return inner


def _search(inner: Any, queries: np.ndarray, ef: int) -> np.ndarray:
    import faiss

    inner.hnsw.efSearch = ef
    if isinstance(inner, faiss.IndexBinary):
        return np.asarray(inner.search(queries, 10)[1])
    params = faiss.SearchParametersHNSW()
    params.efSearch = ef
    return np.asarray(inner.search(queries.astype(np.float32), 10, params=params)[1])


def _search_with_distances(inner: Any, queries: np.ndarray, ef: int) -> tuple[Any, Any]:
    import faiss

    inner.hnsw.efSearch = ef
    if isinstance(inner, faiss.IndexBinary):
        distances, found = inner.search(queries, 10)
        return np.asarray(distances, dtype=np.float64), np.asarray(found)
    params = faiss.SearchParametersHNSW()
    params.efSearch = ef
    distances, found = inner.search(queries.astype(np.float32), 10, params=params)
    return np.asarray(distances, dtype=np.float64), np.asarray(found)


def _tied_hits(distances: np.ndarray, tenth: np.ndarray, similarity: bool) -> np.ndarray:
    """Per query, results at least as near as the true 10th neighbour (float tolerance)."""
    slack = 1e-5 * np.abs(tenth) + 1e-6
    near = (
        distances >= (tenth - slack)[:, None]
        if similarity
        else distances <= (tenth + slack)[:, None]
    )
    return np.asarray(near.sum(axis=1))


def measure_search(
    inner: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    truth_distances: np.ndarray | None = None,
    similarity: bool = False,
) -> dict[str, Any]:
    import faiss

    out: dict[str, Any] = {"recall": {}, "ndis": {}, "tie_recall": {}, "hits": {}}
    stats = faiss.cvar.hnsw_stats
    for ef in EFS:
        stats.reset()
        distances, found = _search_with_distances(inner, queries, ef)
        per_query = [
            len(set(t) & set(f))
            for t, f in zip(truth[:, :10].tolist(), found.tolist(), strict=True)
        ]
        out["hits"][str(ef)] = per_query
        out["recall"][str(ef)] = sum(per_query) / (10 * len(queries))
        out["ndis"][str(ef)] = float(stats.ndis) / len(queries)
        if truth_distances is not None:
            tied = _tied_hits(distances, truth_distances[:, 9].astype(np.float64), similarity)
            out["tie_recall"][str(ef)] = float(tied.sum()) / (10 * len(queries))
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        began = time.perf_counter()
        _search(inner, queries, 100)
        out["qps_1_thread"] = len(queries) / (time.perf_counter() - began)
    finally:
        faiss.omp_set_num_threads(saved)
    return out


def cmd_graph(args: argparse.Namespace) -> None:
    from benchmarks.measurement import cpu_seconds, emit, measured, omp_threads, reset_peak
    from remote_vector_index_builder.core import blocked_knn, memory, quality
    from remote_vector_index_builder.core.cpu_builder import CpuBuilder
    from remote_vector_index_builder.core.dataset import parse
    from remote_vector_index_builder.core.gpu_builder import assemble_from_graph
    from remote_vector_index_builder.core.knn_graph import KnnGraph
    from remote_vector_index_builder.core.multipart import UploadPlan
    from remote_vector_index_builder.core.options import CpuBuildMode
    from remote_vector_index_builder.core.quality import BuildNotes
    from remote_vector_index_builder.core.s3_calls import S3Config

    threads = omp_threads(args.threads)
    source = np.load(args.rows, mmap_mode="r")
    n, width = int(source.shape[0]), int(source.shape[1])
    request = _request(n, width, args.data_type, args.space)
    queries = np.load(args.queries)
    truth = np.load(args.truth)
    graph = KnnGraph(np.load(args.graph)) if args.graph else None
    truth_distances = np.load(args.truth_distances) if args.truth_distances else None
    buffer = mmap.mmap(-1, source.nbytes)
    blob = np.frombuffer(buffer, dtype=np.uint8)
    blob[:] = np.ascontiguousarray(source).view(np.uint8).reshape(-1)
    rows_view = blob.view(source.dtype).reshape(n, width)
    del source
    id_blob = np.arange(n, dtype="<i4").view(np.uint8)
    data = parse(request, blob, id_blob)
    method = args.method
    builder: Any = None
    if method in ("standard", "default", "exact-knn", "fast", "blocked"):
        limit = {"standard": 0, "exact-knn": 10**9, "fast": 0, "blocked": 0}.get(method)
        kwargs: dict[str, Any] = {} if limit is None else {"knn_graph_max_rows": limit}
        if method == "standard":
            kwargs["blocked"] = dataclasses.replace(blocked_knn.DEFAULT_RULE, min_rows=None)
        if method == "blocked":
            kwargs["blocked"] = dataclasses.replace(blocked_knn.DEFAULT_RULE, min_rows=0)
        mode = CpuBuildMode.FAST if method == "fast" else CpuBuildMode.STANDARD
        builder = CpuBuilder(mode=mode, **kwargs)
    prepared = builder.prepare(request) if builder is not None else None
    notes = prepared.notes if prepared is not None else BuildNotes()
    baseline = reset_peak()
    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured():
        if method == "faiss":
            index = _faiss_index(request, rows_view)
        elif method == "gpu-replay":
            assert graph is not None, "gpu-replay needs --graph"
            index = assemble_from_graph(request, data, graph, notes)
        else:
            index = builder.build(request, data, prepared=prepared)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    peak = _peak()
    plan = UploadPlan.of(S3Config())
    cpu_build = "fast" if method == "fast" else "standard"
    estimate = memory.estimate(request, upload=plan, add_batch_rows=32768, cpu_build=cpu_build)
    if method == "gpu-replay":
        estimate = memory.gpu_estimate(request, upload=plan)
    inner = quality.inner_of(index)
    result = {
        "method": method,
        "n": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "threads": threads,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "estimate_host_bytes": estimate.host_bytes,
        "build_path": notes.path if method != "faiss" else "faiss-hnsw",
        "assembly": notes.assembly,
        "max_level": int(inner.hnsw.max_level),
        **measure_search(
            inner, queries, truth, truth_distances, similarity=args.space == "innerproduct"
        ),
    }
    emit(result)


def _peak() -> int:
    from benchmarks.common import vm_hwm_bytes

    return vm_hwm_bytes()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("graph")
    p.add_argument("--rows", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--graph", default="")
    p.add_argument("--truth-distances", default="")
    p.add_argument("--space", required=True)
    p.add_argument("--data-type", default="float")
    p.add_argument(
        "--method",
        choices=["faiss", "standard", "default", "exact-knn", "fast", "blocked", "gpu-replay"],
        required=True,
    )
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_graph)
