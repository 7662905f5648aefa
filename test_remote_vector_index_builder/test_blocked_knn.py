"""The blocked kNN graph (core.blocked_knn) and the CPU builds that use it, with real faiss-cpu."""

from __future__ import annotations

import dataclasses
from typing import Any

import faiss
import numpy as np
import pytest

from remote_vector_index_builder.core import blocked_knn, graph_assembly
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.errors import CancelledError
from remote_vector_index_builder.core.index_builder import fill_storage, new_inner_index
from remote_vector_index_builder.core.knn_graph import StoredRows
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.quality import BuildPath
from testbed.data import (
    clustered,
    make_dataset,
    make_request,
    normalized,
    recall_at_k,
    sparse_ids,
    to_int8,
)

FORCED = dataclasses.replace(blocked_knn.DEFAULT_RULE, min_rows=0, cluster_rows=200)


def _stored(request: BuildRequest, rows: np.ndarray) -> tuple[Any, StoredRows]:
    """An index holding ``rows`` and its stored rows (a view: keep the index alive)."""
    inner = new_inner_index(request)
    fill_storage(inner, make_dataset(request, rows, np.arange(len(rows))), 4096)
    return inner, StoredRows(inner)


def _list_recall(rows: np.ndarray, ids: np.ndarray, space: str, k: int = 10) -> float:
    metric = faiss.METRIC_INNER_PRODUCT if space == "innerproduct" else faiss.METRIC_L2
    _, exact = faiss.knn(rows, rows, k + 1, metric)
    hits = 0
    for node, (truth, found) in enumerate(zip(exact.tolist(), ids.tolist(), strict=True)):
        hits += len(({t for t in truth if t != node} - {-1}) & set(found))
    return hits / (k * len(rows))


def _tight(n: int, dim: int, clusters: int, seed: int = 5) -> np.ndarray:
    """Clusters far tighter than their spacing: a kNN graph of them falls apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 10.0, (clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + rng.normal(0.0, 0.05, (n, dim))).astype(np.float32)


@pytest.mark.parametrize("space", ["l2", "innerproduct"])
def test_blocked_lists_hold_most_true_neighbours_and_each_round_of_refinement_adds(
    space: str,
) -> None:
    # 256 small clusters: the k-means' 20 do not follow them, so a row's neighbours
    # often sit in clusters it does not probe, where neighbours of neighbours lead.
    rows = clustered(4000, 48, clusters=256, seed=3)
    if space == "innerproduct":
        rows = normalized(rows)
    _inner, stored = _stored(make_request("float", space, 48, len(rows)), rows)
    recalls = []
    for rounds in (0, 1, 2):
        params = blocked_knn.BlockedParams(32, 2, rounds, 8, cluster_rows=200)
        stats = blocked_knn.BlockedStats()
        knn = blocked_knn.blocked_knn(stored, params, stats=stats)
        assert knn.ids.shape == (4000, 32)
        assert not (knn.ids == np.arange(4000)[:, None]).any()  # a row is not its own neighbour
        recalls.append(_list_recall(rows, knn.ids, space))
    assert stats.clusters >= 15 and stats.dim % 16 == 0 and stats.dim <= 48
    assert recalls[0] >= 0.9
    assert recalls[0] < recalls[1] < recalls[2]


def test_a_cluster_far_larger_than_the_rest_is_split() -> None:
    rng = np.random.default_rng(2)
    dense = rng.normal(0.0, 0.1, (3000, 16)).astype(np.float32)
    spread = rng.normal(0.0, 5.0, (1000, 16)).astype(np.float32)
    rows = np.concatenate([dense, spread])
    centroids, split = blocked_knn.cluster_centres(rows, cluster_rows=200)
    assert split >= 1
    _, nearest = faiss.knn(rows, centroids, 1)
    sizes = np.bincount(nearest[:, 0], minlength=len(centroids))
    # Without the split the dense 3000 rows would share a handful of clusters.
    assert sizes.max() <= 4 * 200


def test_strongly_clustered_data_builds_a_graph_that_reaches_every_vector() -> None:
    """300 clusters far tighter than their spacing: every kNN list stays inside its
    cluster, so the blocked kNN graph has ~300 components; the assembly's repair
    joins them, and search finds what insertion finds."""
    n, dim = 6000, 32
    rows = _tight(n + 200, dim, 300)
    base, queries = rows[:n], rows[n:]
    ids = sparse_ids(n)
    request = make_request("float", "l2", dim, n)
    builder = CpuBuilder(knn_graph_max_rows=0, blocked=FORCED)
    prepared = builder.prepare(request)
    index = builder.build(request, make_dataset(request, base, ids), prepared=prepared)
    notes = prepared.notes
    assert notes.path == BuildPath.BLOCKED_KNN
    assert notes.assembly is not None and notes.assembly["repair_links"] > 0
    inner = faiss.downcast_index(index.index)
    graph = graph_assembly._Graph(inner.hnsw, n)
    assert len(graph_assembly.unreached(graph, int(inner.hnsw.entry_point))) == 0
    standard = CpuBuilder(knn_graph_max_rows=0).build(request, make_dataset(request, base, ids))
    ours = recall_at_k(index, base, ids, queries, "l2")
    theirs = recall_at_k(standard, base, ids, queries, "l2")
    assert ours >= theirs - 0.01 and ours >= 0.9


@pytest.mark.parametrize(
    ("data_type", "space", "expected"),
    [
        ("float", "l2", BuildPath.BLOCKED_KNN),
        ("float", "innerproduct", BuildPath.BLOCKED_KNN),  # normalized rows: cosine
        ("half_float", "l2", BuildPath.BLOCKED_KNN),
        ("byte", "l2", BuildPath.BLOCKED_KNN),
        ("binary", "hamming", BuildPath.INSERTION),
    ],
)
def test_the_rule_admits_the_float_family_and_refuses_binary(
    data_type: str, space: str, expected: str
) -> None:
    n, dim = 1500, 64
    rows = clustered(n, dim, seed=4)
    if space == "innerproduct":
        rows = normalized(rows)
    if data_type == "byte":
        rows = to_int8(rows)
    if data_type == "binary":
        rows = np.packbits(rows > 0, axis=1)
    request = make_request(data_type, space, dim, n)
    builder = CpuBuilder(knn_graph_max_rows=0, blocked=FORCED)
    prepared = builder.prepare(request)
    builder.build(request, make_dataset(request, rows, sparse_ids(n)), prepared=prepared)
    assert prepared.notes.path == expected


def test_inner_product_over_rows_of_different_lengths_is_built_by_insertion() -> None:
    """The build space ranks by L2, which ranks as inner product only over rows of one length."""
    n, dim = 1500, 32
    rows = clustered(n, dim, seed=6) * np.linspace(0.5, 2.0, n, dtype=np.float32)[:, None]
    request = make_request("float", "innerproduct", dim, n)
    builder = CpuBuilder(knn_graph_max_rows=0, blocked=FORCED)
    prepared = builder.prepare(request)
    builder.build(request, make_dataset(request, rows, sparse_ids(n)), prepared=prepared)
    assert prepared.notes.path == BuildPath.INSERTION


def test_segments_below_the_rules_minimum_are_built_by_insertion() -> None:
    n, dim = 1500, 32
    rows = clustered(n, dim, seed=6)
    request = make_request("float", "l2", dim, n)
    rule = dataclasses.replace(FORCED, min_rows=n + 1)
    builder = CpuBuilder(knn_graph_max_rows=0, blocked=rule)
    prepared = builder.prepare(request)
    builder.build(request, make_dataset(request, rows, sparse_ids(n)), prepared=prepared)
    assert prepared.notes.path == BuildPath.INSERTION
    never = dataclasses.replace(FORCED, min_rows=None)
    prepared = CpuBuilder(knn_graph_max_rows=0, blocked=never).prepare(request)
    CpuBuilder(knn_graph_max_rows=0, blocked=never).build(
        request, make_dataset(request, rows, sparse_ids(n)), prepared=prepared
    )
    assert prepared.notes.path == BuildPath.INSERTION


def test_the_blocked_build_reports_progress_in_steps_and_can_cancel() -> None:
    n, dim = 4000, 16
    rows = clustered(n, dim, seed=8)
    request = make_request("float", "l2", dim, n)
    builder = CpuBuilder(add_batch_rows=1024, knn_graph_max_rows=0, blocked=FORCED)
    seen: list[int] = []
    builder.build(request, make_dataset(request, rows, np.arange(n)), progress=seen.append)
    # Clusters of the kNN graph, then the assembly's steps.
    assert sum(seen) == n and len(seen) >= 10 and max(seen) <= n // 2

    calls: list[int] = []

    def cancel_in_the_knn_graph(amount: int) -> None:
        calls.append(amount)
        if sum(calls) > n // 4:
            raise CancelledError("cancelled by operator")

    with pytest.raises(CancelledError):
        builder.build(
            request, make_dataset(request, rows, np.arange(n)), progress=cancel_in_the_knn_graph
        )
    assert sum(calls) < n // 2  # stopped inside the kNN graph, not after it
