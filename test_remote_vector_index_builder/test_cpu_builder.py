"""Real faiss-cpu builds for every data type and metric: layout, ids, recall."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import textwrap
from typing import Any

import faiss
import numpy as np
import pytest

from remote_vector_index_builder.core import blocked_knn, dataset, index_io
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.errors import CancelledError
from remote_vector_index_builder.core.knn_graph import of_one_length
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.quality import BuildPath
from testbed.data import (
    BINARY_ID_MAP_HEADER,
    FLOAT_FAMILY_LAYOUTS,
    ID_MAP_HEADER,
    clustered,
    cohere_sample,
    doc_id_blob,
    make_dataset,
    make_request,
    normalized,
    recall_at_k,
    rows_for,
    sparse_ids,
    to_binary,
    to_int8,
    vector_blob,
)

# Every way the CPU builds a graph: HNSW insertion, (segments up to
# knn_graph.EXACT_KNN_MAX_ROWS) the exact kNN graph assembled into an HNSW, and
# (segments its rule admits) the blocked kNN graph, here with clusters of 100 rows
# so that a small test set has several. Every layout, id and recall check below
# runs on each (binary vectors are never admitted to the blocked path).
FORCED_BLOCKED = dataclasses.replace(blocked_knn.DEFAULT_RULE, min_rows=0, cluster_rows=100)
GRAPH_PATHS: dict[str, dict[str, Any]] = {
    "insertion": {"knn_graph_max_rows": 0},
    "exact-knn": {"knn_graph_max_rows": 10**9},
    "blocked-knn": {"knn_graph_max_rows": 0, "blocked": FORCED_BLOCKED},
}

EXPECTED_BUILD_PATH = {
    "insertion": BuildPath.INSERTION,
    "exact-knn": BuildPath.EXACT_KNN,
    "blocked-knn": BuildPath.BLOCKED_KNN,
}


@pytest.fixture(params=list(GRAPH_PATHS))
def graph_path(request: Any) -> str:
    return str(request.param)


def build_and_read(
    request: BuildRequest, blob: bytes, ids: np.ndarray, batch: int = 300, path: str = "insertion"
) -> Any:
    data = dataset.parse(
        request,
        np.frombuffer(bytearray(blob), dtype=np.uint8),
        np.frombuffer(bytearray(doc_id_blob(ids)), dtype=np.uint8),
    )
    builder = CpuBuilder(add_batch_rows=batch, **GRAPH_PATHS[path])
    prepared = builder.prepare(request)
    index = builder.build(request, data, prepared=prepared)
    expected = EXPECTED_BUILD_PATH[path]
    # The blocked path's rule: no binary vectors, and inner product only over rows of
    # one length (byte rows of normalized vectors are not, after rounding).
    unequal = request.space_type.value == "innerproduct" and not of_one_length([data.vectors])
    if path == "blocked-knn" and (request.data_type.value == "binary" or unequal):
        expected = BuildPath.INSERTION
    assert prepared.notes.path == expected
    out = io.BytesIO()
    written = index_io.write(index, out, skip_storage=request.skip_stored_vectors)
    raw = out.getvalue()
    assert written == len(raw)
    return raw


@pytest.mark.parametrize(("data_type", "space", "hnsw_tag", "storage_tag"), FLOAT_FAMILY_LAYOUTS)
def test_float_family_layout_ids_and_recall(
    data_type: str, space: str, hnsw_tag: bytes, storage_tag: bytes, graph_path: str
) -> None:
    vectors, _ = cohere_sample()
    if space == "innerproduct":
        vectors = normalized(vectors)
    base, queries = vectors[:900], vectors[900:]
    if data_type == "byte":
        both = to_int8(vectors)
        base, queries = both[:900], both[900:]
    ids = sparse_ids(len(base))
    request = make_request(data_type, space, 768, len(base))
    raw = build_and_read(request, vector_blob(base), ids, path=graph_path)

    assert raw[:4] == b"IxMp"
    assert raw[ID_MAP_HEADER : ID_MAP_HEADER + 4] == hnsw_tag
    assert storage_tag in raw
    index = index_io.read(raw)
    expected_metric = faiss.METRIC_L2 if space == "l2" else faiss.METRIC_INNER_PRODUCT
    assert index.metric_type == expected_metric and index.ntotal == len(base)
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), ids)
    inner = faiss.downcast_index(index.index)
    assert inner.hnsw.efSearch == 100 and inner.hnsw.efConstruction == 100
    assert recall_at_k(index, base.astype(np.float32), ids, queries, space) >= 0.95


def test_binary_layout_ids_and_recall(graph_path: str) -> None:
    vectors = clustered(3000, 256, seed=5)
    bits = to_binary(vectors)
    base, queries = bits[:2800], bits[2800:]
    ids = sparse_ids(len(base))
    request = make_request("binary", "hamming", 256, len(base))
    raw = build_and_read(request, base.tobytes(), ids, path=graph_path)
    assert raw[:4] == b"IBMp"
    assert raw[BINARY_ID_MAP_HEADER : BINARY_ID_MAP_HEADER + 4] == b"IBHf"
    assert b"IBxF" in raw
    index = index_io.read(raw)
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), ids)
    assert recall_at_k(index, base, ids, queries, "hamming") >= 0.9


@pytest.mark.parametrize("space", ["l2", "innerproduct"])
def test_skip_stored_vectors_writes_cagra_hnsw_without_storage(space: str, graph_path: str) -> None:
    vectors = clustered(1200, 64, seed=9)
    if space == "innerproduct":
        vectors = normalized(vectors)
    ids = sparse_ids(1200)
    request = make_request("float", space, 64, 1200, skip_stored_vectors=True)
    raw = build_and_read(request, vector_blob(vectors), ids, path=graph_path)
    assert raw[:4] == b"IxMp"
    assert raw[ID_MAP_HEADER : ID_MAP_HEADER + 4] == b"IHc2"
    assert b"null" in raw and b"IxF2" not in raw and b"IxFI" not in raw
    # Without storage the file is much smaller than the vectors it indexes.
    assert len(raw) < vectors.nbytes
    index = index_io.read(raw)
    inner = faiss.downcast_index(index.index)
    assert isinstance(inner, faiss.IndexHNSWCagra) and inner.storage is None
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), ids)
    # The data node attaches its own storage; attach a flat one to prove the graph works.
    flat = faiss.IndexFlat(64, index.metric_type)
    flat.add(vectors)
    inner.storage = flat
    inner.own_fields = False
    assert recall_at_k(index, vectors, ids, vectors[:100], space) >= 0.95


def test_composed_id_map_stream_is_byte_identical_to_faiss() -> None:
    """Our skip-storage composition reproduces faiss.write_index when storage is kept."""
    vectors = clustered(300, 32, seed=2)
    inner = faiss.IndexHNSWCagra(32, 8, faiss.METRIC_INNER_PRODUCT)
    inner.base_level_only = False
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(vectors, sparse_ids(300).astype(np.int64))
    ours = io.BytesIO()
    ours.write(index_io.id_map_header(index))
    index_io.write_faiss(inner, ours.write)
    ids = faiss.vector_to_array(index.id_map)
    ours.write(np.uint64(ids.size).tobytes() + ids.astype("<i8").tobytes())
    assert ours.getvalue() == faiss.serialize_index(index).tobytes()


def test_progress_counts_every_vector_and_can_cancel() -> None:
    vectors = clustered(1000, 16)
    request = make_request("float", "l2", 16, 1000)
    data = dataset.parse(
        request,
        np.frombuffer(bytearray(vector_blob(vectors)), dtype=np.uint8),
        np.frombuffer(bytearray(doc_id_blob(np.arange(1000))), dtype=np.uint8),
    )
    seen: list[int] = []
    CpuBuilder(add_batch_rows=256, knn_graph_max_rows=0).build(request, data, progress=seen.append)
    assert sum(seen) == 1000 and len(seen) == 4  # one report per 256-row add

    def cancel(_: int) -> None:
        raise CancelledError("cancelled by operator")

    with pytest.raises(CancelledError):
        CpuBuilder(add_batch_rows=256, knn_graph_max_rows=0).build(request, data, progress=cancel)


def test_insertion_progress_is_weighted_by_the_cost_of_each_insertion() -> None:
    """Issue 19: equal batches reported equal progress though later insertions search a
    larger graph, so the ETA grew as the build went on."""
    from remote_vector_index_builder.core.cpu_builder import insertion_share

    n = 8000
    vectors = clustered(n, 8)
    request = make_request("float", "l2", 8, n, ef_construction=16)
    data = make_dataset(request, vectors, np.arange(n))
    seen: list[int] = []
    CpuBuilder(add_batch_rows=2000, knn_graph_max_rows=0).build(request, data, progress=seen.append)
    assert sum(seen) == n and len(seen) == 4
    assert seen == sorted(seen) and seen[0] < seen[-1]  # later batches count more
    shares = [insertion_share(i, n) for i in range(0, n + 1, n // 4)]
    assert shares[0] == 0.0 and shares[-1] == 1.0 and (np.diff(np.diff(shares)) > 0).all()


def test_the_exact_knn_build_reports_progress_in_small_steps_and_can_cancel() -> None:
    n = 3000
    vectors = clustered(n, 16)
    request = make_request("float", "l2", 16, n)
    data = make_dataset(request, vectors, np.arange(n))
    seen: list[int] = []
    CpuBuilder(add_batch_rows=1024).build(request, data, progress=seen.append)
    # The kNN graph's blocks, then the assembly's steps (a small build: a few of each).
    assert sum(seen) == n and len(seen) >= 6 and max(seen) <= n // 4

    calls: list[int] = []

    def cancel_late(amount: int) -> None:
        calls.append(amount)
        if sum(calls) > n // 2:  # in the middle of the kNN graph or the assembly
            raise CancelledError("cancelled by operator")

    data = make_dataset(request, vectors, np.arange(n))
    with pytest.raises(CancelledError):
        CpuBuilder(add_batch_rows=1024).build(request, data, progress=cancel_late)


@pytest.mark.parametrize("data_type", ["float", "half_float", "byte", "binary"])
def test_storage_is_allocated_once_for_batched_adds(data_type: str) -> None:
    from remote_vector_index_builder.core.cpu_builder import _inner_index, reserve_storage

    dim = 64
    space = "hamming" if data_type == "binary" else "l2"
    request = make_request(data_type, space, dim, 1000)
    inner = _inner_index(request)
    reserve_storage(inner, 1000)
    binary = data_type == "binary"
    storage = (
        faiss.downcast_IndexBinary(inner.storage) if binary else faiss.downcast_index(inner.storage)
    )
    codes = storage.xb if binary else storage.codes
    vectors = clustered(1000, dim)
    rows = to_binary(vectors) if binary else vectors
    inner.add(rows[:10])
    first = codes.data()
    for start in range(10, 1000, 330):
        inner.add(rows[start : start + 330])
    assert inner.ntotal == 1000 and codes.data() == first  # never reallocated


def _with_m(request: BuildRequest, m: int) -> BuildRequest:
    """``request`` with ``m`` set after validation (params.py may refuse it at the door)."""
    changed = request.model_copy(deep=True)
    changed.index_parameters.algorithm_parameters.m = m
    return changed


@pytest.mark.parametrize(
    ("data_type", "space", "skip"),
    [
        ("float", "l2", False),
        ("float", "innerproduct", True),
        ("half_float", "l2", False),
        ("byte", "l2", False),
        ("binary", "hamming", False),
    ],
)
def test_every_hnsw_constructor_refuses_m_below_2(data_type: str, space: str, skip: bool) -> None:
    """Faiss's HNSW with M=1 divides by log(1) and its first add writes out of bounds."""
    from remote_vector_index_builder.core.cpu_builder import _inner_index
    from remote_vector_index_builder.core.errors import InvalidRequestError
    from remote_vector_index_builder.core.gpu_builder import _hnsw_target, cagra_params
    from remote_vector_index_builder.core.projected_graph import Projection, graph_index

    request = _with_m(make_request(data_type, space, 64, 1000, skip_stored_vectors=skip), 1)
    with pytest.raises(InvalidRequestError, match="m must be at least 2"):
        _inner_index(request)
    if data_type != "binary":
        with pytest.raises(InvalidRequestError, match="m must be at least 2"):
            graph_index(request, Projection(None, 1.0, 64), clustered(100, 64))
    params = cagra_params(_with_m(request, 2))
    with pytest.raises(InvalidRequestError, match="m must be at least 2"):
        _hnsw_target(dataclasses.replace(params, graph_degree=3))


def test_a_build_with_m_1_fails_with_a_typed_error_instead_of_crashing() -> None:
    """In a child: before the guard this build killed the process (SIGSEGV)."""
    code = textwrap.dedent("""
        import numpy as np
        from remote_vector_index_builder.core.cpu_builder import CpuBuilder
        from remote_vector_index_builder.core.errors import InvalidRequestError
        from testbed.data import clustered, make_dataset, make_request

        request = make_request("float", "l2", 16, 3000)
        request.index_parameters.algorithm_parameters.m = 1
        rows = clustered(3000, 16)
        try:
            CpuBuilder(knn_graph_max_rows=0).build(
                request, make_dataset(request, rows, np.arange(3000))
            )
        except InvalidRequestError as exc:
            print("refused:", exc)
        """)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused:" in done.stdout and "m must be at least 2" in done.stdout


@pytest.mark.parametrize("n", [5, 17, 40])
@pytest.mark.parametrize(("data_type", "space"), [("float", "innerproduct"), ("binary", "hamming")])
def test_tiny_segments_build_from_their_exact_knn_graph(data_type: str, space: str, n: int) -> None:
    dim = 64
    rows = rows_for(data_type, space, n, dim)
    request = make_request(data_type, space, dim, n)
    index = CpuBuilder().build(request, make_dataset(request, rows, sparse_ids(n)))
    assert index.ntotal == n
    queries = rows if data_type == "binary" else rows.astype(np.float32)
    # ef_search 100 > n: every vector is visited, so only ties (integer Hamming
    # distances) can make a result differ from the exact ids.
    expected = 0.95 if data_type == "binary" else 1.0
    assert recall_at_k(index, rows, sparse_ids(n), queries, space, k=min(10, n)) >= expected


def test_the_exact_knn_build_links_every_cluster_of_clustered_data() -> None:
    # 32 clusters far apart at m 8: the exact kNN graph splits into them, and the
    # repair once linked unreached parts to each other (the search it asks descends
    # through upper levels into them): 1 of 6000 vectors stayed unreachable and the
    # build failed (6000 x 768 in the fault tests: 181).
    n, dim = 6000, 64
    vectors = clustered(n, dim, seed=n)
    request = make_request("float", "l2", dim, n, m=8, ef_construction=16)
    index = CpuBuilder().build(request, make_dataset(request, vectors, sparse_ids(n)))
    assert index.ntotal == n
    queries = vectors[::20]
    assert recall_at_k(index, vectors, sparse_ids(n), queries, "l2") >= 0.9
