"""CAGRA parameters, constraints, the CPU fallback and the conversion target, on real Faiss.

Everything but ``TestOnGpu`` runs on faiss-cpu: the GPU attempt fails there for real (no
GpuIndexCagra) and the fallback builds a real CPU index.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any

import faiss
import numpy as np
import pytest

from remote_vector_index_builder.core import dataset, index_io, workflow
from remote_vector_index_builder.core.builder_choice import BuilderOptions, choose_builder
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.data_types import NumericType
from remote_vector_index_builder.core.errors import BuildError, CancelledError, GpuUnavailableError
from remote_vector_index_builder.core.gpu_builder import (
    CagraParams,
    GpuBuilder,
    GraphBuildAlgo,
    _attach_ids,
    _hnsw_target,
    _host_rows,
    _id_map,
    _set,
    cagra_params,
)
from remote_vector_index_builder.core.index_builder import gpu_available
from remote_vector_index_builder.core.options import Device
from remote_vector_index_builder.core.params import BuildRequest
from test_remote_vector_index_builder.support import request_for
from testbed.data import (
    BINARY_ID_MAP_HEADER,
    ID_MAP_HEADER,
    clustered,
    doc_id_blob,
    doc_ids,
    make_dataset,
    make_request,
    recall_at_k,
    rows_for,
    to_binary,
    to_int8,
    vector_blob,
)

# Faiss's bundled stubs (1.15) lack IndexHNSWCagra and IndexBinaryHNSWCagra's fields.
untyped_faiss: Any = faiss


def serialized(index: Any) -> bytes:
    out = io.BytesIO()
    index_io.write(index, out)
    return out.getvalue()


# --- parameter derivation (docs/knn-contract.md, section 6) -------------------------------


def test_float_768_m16_derives_the_reference_parameters() -> None:
    p = cagra_params(make_request(dim=768, n=1_000_000, m=16, ef_construction=128, ef_search=77))
    assert (p.graph_degree, p.intermediate_graph_degree, p.hnsw_m) == (64, 64, 32)
    # What stock Faiss hands cuVS on the IVF-PQ path (see the comment in CagraParams).
    assert p.effective_intermediate_graph_degree == 96
    assert p.build_algo is GraphBuildAlgo.IVF_PQ
    assert p.ivf_pq is not None
    assert (p.ivf_pq.n_lists, p.ivf_pq.pq_dim, p.ivf_pq.pq_bits) == (1000, 192, 8)
    assert (p.ivf_pq.kmeans_n_iters, p.ivf_pq.kmeans_trainset_fraction) == (20, 0.1)
    assert (p.ivf_pq.n_probes, p.ivf_pq.refine_rate) == (5, 1.0)
    assert p.metric == faiss.METRIC_L2
    assert p.numeric_type is NumericType.FLOAT32
    assert (p.ef_construction, p.ef_search, p.base_level_only) == (128, 77, True)


@pytest.mark.parametrize(("n", "n_lists"), [(12_345, 111), (99, 9), (65, 8)])
def test_n_lists_is_the_integer_square_root(n: int, n_lists: int) -> None:
    p = cagra_params(make_request(n=n, m=16))
    assert p.ivf_pq is not None and p.ivf_pq.n_lists == n_lists


def test_tiny_segments_probe_at_most_every_list_and_small_dims_keep_one_subspace() -> None:
    p = cagra_params(make_request(dim=3, n=9, m=2))
    assert p.ivf_pq is not None
    assert (p.ivf_pq.n_lists, p.ivf_pq.n_probes, p.ivf_pq.pq_dim) == (3, 3, 1)


@pytest.mark.parametrize(
    ("data_type", "space", "numeric_type", "metric"),
    [
        ("float", "innerproduct", NumericType.FLOAT32, faiss.METRIC_INNER_PRODUCT),
        ("half_float", "l2", NumericType.FLOAT16, faiss.METRIC_L2),
        ("byte", "innerproduct", NumericType.INT8, faiss.METRIC_INNER_PRODUCT),
    ],
)
def test_float_family_numeric_types(
    data_type: str, space: str, numeric_type: NumericType, metric: int
) -> None:
    p = cagra_params(make_request(data_type, space, m=8))
    assert p.numeric_type is numeric_type
    assert p.metric == metric
    assert p.build_algo is GraphBuildAlgo.IVF_PQ
    assert p.graph_degree == p.intermediate_graph_degree == 32


def test_binary_uses_nn_descent_without_ivf_pq() -> None:
    p = cagra_params(make_request("binary", "hamming", dim=256, m=16))
    assert p.build_algo is GraphBuildAlgo.NN_DESCENT
    assert p.ivf_pq is None
    assert p.metric is None
    assert p.numeric_type is NumericType.UINT8_BITS
    assert p.effective_intermediate_graph_degree == p.graph_degree == 64
    assert p.dimension == 256  # bits, as GpuIndexBinaryCagra and IndexBinaryHNSWCagra take it


# --- constraints checked before the GPU is touched ----------------------------------------


@pytest.mark.parametrize(("n", "m"), [(64, 16), (5, 16), (5, 2)])
def test_segments_not_larger_than_the_graph_degree_are_rejected(n: int, m: int) -> None:
    with pytest.raises(BuildError, match=rf"graph degree {4 * m} \(4 x m\) is not below doc_count"):
        cagra_params(make_request(n=n, m=m))


def test_smallest_segment_above_the_graph_degree_is_accepted() -> None:
    assert cagra_params(make_request(n=65, m=16)).graph_degree == 64


def test_ivf_pq_limits_are_enforced_on_any_params() -> None:
    p = cagra_params(make_request(dim=768, n=1000, m=16))
    assert p.ivf_pq is not None
    with pytest.raises(BuildError, match=r"pq_dim 769 is not in \[1, dimension 768\]"):
        dataclasses.replace(p, ivf_pq=dataclasses.replace(p.ivf_pq, pq_dim=769))
    with pytest.raises(BuildError, match=r"n_lists 1001 is not in \[1, doc_count\]"):
        dataclasses.replace(p, ivf_pq=dataclasses.replace(p.ivf_pq, n_lists=1001))
    with pytest.raises(BuildError, match="pq_dim 0"):
        CagraParams(**{**dataclasses.asdict(p), "ivf_pq": dataclasses.replace(p.ivf_pq, pq_dim=0)})


# --- choosing a builder on this machine ---------------------------------------------------

no_gpu = pytest.mark.skipif(gpu_available(), reason="this host has a CAGRA-capable GPU")


@no_gpu
@pytest.mark.parametrize("device", [Device.AUTO, Device.CPU])
def test_auto_and_cpu_choose_the_cpu_builder_without_a_gpu(device: Device) -> None:
    builder = choose_builder(BuilderOptions(device=device))
    assert isinstance(builder, CpuBuilder)
    assert builder.name == "cpu"


@no_gpu
def test_device_gpu_without_a_gpu_says_why() -> None:
    with pytest.raises(GpuUnavailableError, match="no GPU with CAGRA support"):
        choose_builder(BuilderOptions(device=Device.GPU))


# --- fallback: the GPU attempt really fails here, the CPU really builds ---------------------


@no_gpu
@pytest.mark.parametrize(
    ("data_type", "space"), [("float", "l2"), ("half_float", "innerproduct"), ("byte", "l2")]
)
def test_failed_gpu_build_falls_back_to_a_real_cpu_index(
    data_type: str, space: str, caplog: pytest.LogCaptureFixture
) -> None:
    n, dim = 2000, 32
    request = make_request(data_type, space, dim=dim, n=n, m=16)
    rows, ids = rows_for(data_type, space, n, dim), doc_ids(n)
    calls: list[int] = []
    with caplog.at_level(logging.WARNING):
        index = GpuBuilder(fallback=CpuBuilder()).build(
            request, make_dataset(request, rows, ids), calls.append
        )
    assert "GPU build failed, using the cpu builder instead" in caplog.text
    assert "no CUDA GPU with CAGRA" in caplog.text
    assert calls[0] == 0 and sum(calls) == n  # cancellation point, then the CPU's batches
    assert isinstance(index, faiss.IndexIDMap) and index.ntotal == n
    queries = rows[:50].astype(np.float32) + 0.01
    assert recall_at_k(index, rows, ids, queries, space) >= 0.9
    assert serialized(index)[:4] == b"IxMp"


@no_gpu
def test_a_fallback_is_reported_as_the_cpu_build_it_was(
    s3_client: Any, bucket: str, object_store: Any
) -> None:
    """The quality report, ``BuildResult.builder`` and the build path name the CPU."""
    n, dim = 2000, 16
    rows = rows_for("float", "l2", n, dim)
    s3_client.put_object(Bucket=bucket, Key="g/fb.knnvec", Body=vector_blob(rows))
    s3_client.put_object(Bucket=bucket, Key="g/fb.knndid", Body=doc_id_blob(doc_ids(n)))
    request = request_for(bucket, "g/fb", dim, n)
    result = workflow.run(request, object_store, GpuBuilder(fallback=CpuBuilder()))
    report = result.quality
    assert report is not None
    assert report.device == "cpu" and result.builder == "cpu"
    assert report.fallback and report.requested_mode == "gpu"
    assert report.build_mode == "standard" and report.build_path == "exact-knn-assembly"
    assert report.mode_reason is not None and "GPU build failed" in report.mode_reason
    assert report.recall >= 0.95


@no_gpu
def test_binary_falls_back_to_a_binary_cpu_index() -> None:
    request = make_request("binary", "hamming", dim=64, n=500, m=8)
    rows, ids = rows_for("binary", "hamming", 500, 64), doc_ids(500)
    index = GpuBuilder(fallback=CpuBuilder()).build(request, make_dataset(request, rows, ids))
    assert isinstance(index, faiss.IndexBinaryIDMap) and index.ntotal == 500
    assert faiss.vector_to_array(index.id_map).tolist() == ids.tolist()


@no_gpu
def test_without_fallback_the_gpu_error_reaches_the_caller() -> None:
    request = make_request(n=200, m=4)
    data = make_dataset(request, rows_for("float", "l2", 200, 32), doc_ids(200))
    with pytest.raises(GpuUnavailableError, match="no CUDA GPU with CAGRA"):
        GpuBuilder().build(request, data)


def test_a_segment_too_small_for_cagra_is_built_by_the_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = make_request(n=40, m=16)  # graph degree 64 > 40 vectors: rejected before any GPU
    rows, ids = rows_for("float", "l2", 40, 32), doc_ids(40)
    with caplog.at_level(logging.WARNING):
        index = GpuBuilder(fallback=CpuBuilder()).build(request, make_dataset(request, rows, ids))
    assert "graph degree 64 (4 x m) is not below doc_count" in caplog.text
    assert index.ntotal == 40
    with pytest.raises(BuildError, match="graph degree 64"):
        GpuBuilder().build(request, make_dataset(request, rows, ids))


class RecordingBuilder:
    name = "recording"

    def __init__(self) -> None:
        self.calls = 0

    def prepare(self, request: BuildRequest) -> None:
        return None

    def build(
        self,
        request: BuildRequest,
        data: dataset.Dataset,
        progress: Any = None,
        prepared: Any = None,
    ) -> Any:
        self.calls += 1
        return None


def test_cancellation_before_the_gpu_starts_is_not_a_reason_to_fall_back() -> None:
    request = make_request(n=200, m=4)
    data = make_dataset(request, rows_for("float", "l2", 200, 32), doc_ids(200))
    fallback = RecordingBuilder()

    def cancel(_: int) -> None:
        raise CancelledError("cancelled by operator")

    with pytest.raises(CancelledError):
        GpuBuilder(fallback=fallback).build(request, data, cancel)
    assert fallback.calls == 0


# --- host-side pieces that need no GPU ----------------------------------------------------


def test_conversion_target_api_exists_in_faiss() -> None:
    """The CPU-side classes and fields the GPU path relies on; drift fails here, not on a GPU."""
    for name in ("Float32", "Float16", "Int8", "IndexIDMap", "IndexBinaryIDMap"):
        assert hasattr(faiss, name), name
    hnsw = untyped_faiss.IndexHNSWCagra(16, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.base_level_only = True
    hnsw.set_numeric_type(faiss.Float16)
    assert hnsw.get_numeric_type() == faiss.Float16
    hnsw.hnsw.efSearch, hnsw.hnsw.efConstruction = 77, 128
    assert hnsw.metric_type == faiss.METRIC_INNER_PRODUCT
    binary = untyped_faiss.IndexBinaryHNSWCagra(64, 32)
    assert binary.base_level_only is False
    # With the flag set, add() refuses: the binary copyTo (Faiss >= 1.12) then fills storage
    # and level 0 directly instead of adding, which is why the flag goes on before copyTo.
    binary.base_level_only = True
    with pytest.raises(RuntimeError, match="base_level_only"):
        binary.add(np.zeros((4, 8), dtype=np.uint8))
    # Why the ID map is made before copyTo fills the HNSW: Faiss wraps only empty indexes.
    hnsw.base_level_only = False
    hnsw.add(np.zeros((4, 16), dtype=np.float32))
    with pytest.raises(RuntimeError, match="index must be empty"):
        faiss.IndexIDMap(hnsw)


def test_set_refuses_a_field_the_faiss_struct_does_not_have() -> None:
    # SWIG proxies of plain structs accept any attribute as a Python-only one; the CAGRA
    # configs are such structs (checked on the real ones in test_gpu_wheel.py).
    params = faiss.SearchParametersHNSW()
    params.efSerch = 3  # the silent typo _set exists to catch
    with pytest.raises(BuildError, match="SearchParametersHNSW has no field 'efSerch'"):
        _set(params, efSerch=3)
    _set(params, efSearch=33, check_relative_distance=False)
    assert (params.efSearch, params.check_relative_distance) == (33, False)


@pytest.mark.parametrize(("data_type", "space"), [("float", "l2"), ("binary", "hamming")])
def test_conversion_target_has_base_level_only_before_copy_to(data_type: str, space: str) -> None:
    params = cagra_params(make_request(data_type, space, dim=64, n=1000, m=8))
    target = _hnsw_target(params)
    assert target.base_level_only and target.ntotal == 0
    assert target.hnsw.nb_neighbors(0) == 2 * params.hnsw_m == params.graph_degree


def test_id_map_made_empty_then_given_ids_serves_doc_ids_and_owns_its_inner_index() -> None:
    rows, ids = clustered(600, 16, seed=4), doc_ids(600)
    inner = untyped_faiss.IndexHNSWCagra(16, 16, faiss.METRIC_L2)
    inner.base_level_only = False  # stands in for copyTo, which needs a GPU
    index = _id_map(inner, binary=False)
    inner.add(rows)
    _attach_ids(index, ids.astype(np.int64))
    del inner  # the ID map owns it now
    assert index.ntotal == 600 and index.own_fields
    assert recall_at_k(index, rows, ids, rows[:30] + 0.01, "l2") >= 0.9
    raw = serialized(index)
    assert raw[:4] == b"IxMp" and raw[ID_MAP_HEADER : ID_MAP_HEADER + 4] == b"IHc2"
    back = index_io.read(raw)
    assert faiss.vector_to_array(back.id_map).tolist() == ids.tolist()


def test_binary_id_map_made_empty_then_given_ids() -> None:
    rows, ids = to_binary(clustered(300, 64, seed=5)), doc_ids(300)
    inner = untyped_faiss.IndexBinaryHNSWCagra(64, 8)
    index = _id_map(inner, binary=True)
    inner.add(rows)
    inner.base_level_only = True
    _attach_ids(index, ids.astype(np.int64))
    raw = io.BytesIO()
    index_io.write(index, raw)
    data = raw.getvalue()
    assert data[:4] == b"IBMp"
    assert data[BINARY_ID_MAP_HEADER : BINARY_ID_MAP_HEADER + 4] == b"IBHc"


def test_attach_ids_refuses_a_count_mismatch() -> None:
    inner = untyped_faiss.IndexHNSWCagra(8, 8, faiss.METRIC_L2)
    inner.base_level_only = False
    index = _id_map(inner, binary=False)
    inner.add(np.zeros((5, 8), dtype=np.float32))
    with pytest.raises(BuildError, match="holds 5 vectors but 4 doc ids"):
        _attach_ids(index, np.arange(4, dtype=np.int64))


def test_host_rows_are_handed_over_without_copies_except_where_faiss_needs_them() -> None:
    request = make_request("float", dim=8, n=100, m=4)
    data = make_dataset(request, clustered(100, 8), doc_ids(100))
    rows = _host_rows(cagra_params(request), data)
    assert rows.dtype == np.float32 and np.shares_memory(rows, data.vectors)
    half = make_request("half_float", dim=8, n=100, m=4)
    assert _host_rows(cagra_params(half), data).dtype == np.float16
    byte = make_request("byte", dim=8, n=100, m=4)
    int8 = to_int8(clustered(100, 8))
    writable = make_dataset(byte, int8, doc_ids(100))
    assert np.shares_memory(_host_rows(cagra_params(byte), writable), writable.vectors)
    frozen = dataset.Dataset(int8, doc_ids(100), writable.data_type)
    int8.flags.writeable = False  # copyTo shifts int8 rows in place: read-only memory is copied
    copied = _host_rows(cagra_params(byte), frozen)
    assert copied.flags.writeable and not np.shares_memory(copied, int8)


# --- the real thing, on a CUDA host with Faiss built with cuVS ----------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU and Faiss with CAGRA (cuVS)")
class TestOnGpu:
    @pytest.mark.parametrize(
        ("data_type", "space", "numeric_type"),
        [
            ("float", "l2", faiss.Float32),
            ("float", "innerproduct", faiss.Float32),
            ("half_float", "l2", faiss.Float16),
            ("byte", "l2", faiss.Int8),
        ],
    )
    def test_cagra_converts_to_a_base_level_hnsw_with_doc_ids(
        self, data_type: str, space: str, numeric_type: int
    ) -> None:
        n, dim = 5000, 64
        request = make_request(data_type, space, dim=dim, n=n, m=16, ef_search=128)
        rows, ids = rows_for(data_type, space, n, dim), doc_ids(n)
        calls: list[int] = []
        index = GpuBuilder().build(request, make_dataset(request, rows, ids), calls.append)
        assert calls == [0, n]
        inner = faiss.downcast_index(index.index)
        assert isinstance(inner, untyped_faiss.IndexHNSWCagra)
        assert inner.base_level_only and inner.get_numeric_type() == numeric_type
        assert (inner.hnsw.efSearch, inner.hnsw.efConstruction) == (128, 100)
        assert inner.hnsw.max_level == -1 and inner.hnsw.nb_neighbors(0) == 64  # level 0 only
        assert inner.num_base_level_search_entrypoints == 32
        queries = rows[:100].astype(np.float32) + 0.01
        assert recall_at_k(index, rows, ids, queries, space) >= 0.9
        raw = serialized(index)
        assert raw[:4] == b"IxMp" and raw[ID_MAP_HEADER : ID_MAP_HEADER + 4] == b"IHc2"

    def test_binary_cagra_converts_to_a_binary_cagra_hnsw(self) -> None:
        n = 5000
        request = make_request("binary", "hamming", dim=256, n=n, m=16)
        rows, ids = rows_for("binary", "hamming", n, 256), doc_ids(n)
        index = GpuBuilder().build(request, make_dataset(request, rows, ids))
        assert isinstance(index, faiss.IndexBinaryIDMap) and index.ntotal == n
        inner = faiss.downcast_IndexBinary(index.index)
        assert isinstance(inner, untyped_faiss.IndexBinaryHNSWCagra) and inner.base_level_only
        # The flag was set before copyTo: no upper levels were inserted on the CPU.
        assert inner.hnsw.max_level == -1 and inner.num_base_level_search_entrypoints == 32
        queries = rows[:50]  # one query per call (see test_gpu_replay.recall)
        hits = [recall_at_k(index, rows, ids, q[None], "hamming") for q in queries]
        assert float(np.mean(hits)) >= 0.9
        raw = io.BytesIO()
        index_io.write(index, raw)
        data = raw.getvalue()
        assert data[:4] == b"IBMp"
        assert data[BINARY_ID_MAP_HEADER : BINARY_ID_MAP_HEADER + 4] == b"IBHc"
        assert faiss.vector_to_array(index.id_map).tolist() == ids.tolist()
