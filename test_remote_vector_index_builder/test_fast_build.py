"""The fast CPU build mode and ``auto``'s pilot, with real faiss-cpu (small sets, no timing)."""

from __future__ import annotations

import io
from typing import Any

import faiss
import numpy as np
import pytest

from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core import dataset, index_io, projected_graph, quality
from remote_vector_index_builder.core.builder_choice import BuilderOptions, choose_builder
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.errors import CancelledError
from remote_vector_index_builder.core.options import CpuBuildMode
from remote_vector_index_builder.core.params import SpaceType
from testbed.data import (
    FLOAT_FAMILY_LAYOUTS,
    ID_MAP_HEADER,
    clustered,
    doc_id_blob,
    make_request,
    normalized,
    recall_at_k,
    sparse_ids,
    to_binary,
    to_int8,
    vector_blob,
)


def decaying(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows whose variance falls off by axis, in a random basis (like learned embeddings)."""
    rng = np.random.default_rng(seed)
    scales = (np.arange(1, dim + 1) ** -1.0).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    centres = rng.standard_normal((20, dim)).astype(np.float32) * scales * 3
    rows = (
        centres[rng.integers(0, 20, n)] + rng.standard_normal((n, dim)).astype(np.float32) * scales
    )
    return np.ascontiguousarray(rows @ basis.astype(np.float32).T, dtype=np.float32)


def build(
    request: Any, rows: np.ndarray, ids: np.ndarray, mode: CpuBuildMode, **kw: Any
) -> tuple[Any, quality.QualityReport, Any]:
    data = dataset.parse(
        request,
        np.frombuffer(bytearray(vector_blob(rows)), dtype=np.uint8),
        np.frombuffer(bytearray(doc_id_blob(ids)), dtype=np.uint8),
    )
    # Small sets: auto's size floor off, so its pilot runs.
    builder = CpuBuilder(add_batch_rows=kw.pop("batch", 1000), mode=mode, auto_min_rows=0)
    prepared = builder.prepare(request)
    sample = quality.QuerySample.take(data.vectors, 200)
    index = builder.build(request, data, prepared=prepared, **kw)
    return index, quality.check(request, index, sample, prepared.notes), prepared


def typed(rows: np.ndarray, data_type: str, space: str) -> np.ndarray:
    if space == "innerproduct":
        rows = normalized(rows)
    return to_int8(rows) if data_type == "byte" else rows


@pytest.mark.parametrize(("data_type", "space", "hnsw_tag", "storage_tag"), FLOAT_FAMILY_LAYOUTS)
def test_fast_index_layout_and_recall_per_data_type(
    data_type: str, space: str, hnsw_tag: bytes, storage_tag: bytes
) -> None:
    rows = typed(decaying(4000, 96, seed=1), data_type, space)
    base, queries = rows[:3800], rows[3800:]
    ids = sparse_ids(len(base))
    request = make_request(data_type, space, 96, len(base))
    index, report, prepared = build(request, base, ids, CpuBuildMode.FAST)
    assert report.build_mode == "fast" and not report.fallback
    assert prepared.notes.pilot["projected_dim"] < 96  # the graph really was built projected

    out = io.BytesIO()
    index_io.write(index, out)
    raw = out.getvalue()
    # The data node's layout: the same section tags as the standard build.
    assert raw[:4] == b"IxMp"
    assert raw[ID_MAP_HEADER : ID_MAP_HEADER + 4] == hnsw_tag
    assert storage_tag in raw
    loaded = index_io.read(raw)
    np.testing.assert_array_equal(faiss.vector_to_array(loaded.id_map), ids)
    inner = faiss.downcast_index(loaded.index)
    assert inner.hnsw.efSearch == 100 and inner.hnsw.efConstruction == 100
    # Upper levels came along: the entry point sits on the top level, which has links.
    levels = faiss.vector_to_array(inner.hnsw.levels)
    assert inner.hnsw.max_level >= 1 and levels[inner.hnsw.entry_point] == inner.hnsw.max_level + 1
    # Held-out queries against exact search over the stored rows; the reloaded
    # index answers exactly as the built one.
    stored = base.astype(np.float32)
    assert recall_at_k(loaded, stored, ids, queries, space) >= 0.95
    q = queries.astype(np.float32)
    np.testing.assert_array_equal(loaded.search(q, 10)[1], index.search(q, 10)[1])
    assert report.recall >= 0.95


@pytest.mark.parametrize("space", ["l2", "innerproduct"])
def test_fast_graph_is_as_good_as_the_standard_one_on_decaying_data(space: str) -> None:
    rows = typed(decaying(5000, 128, seed=2), "float", space)
    request = make_request("float", space, 128, len(rows))
    ids = np.arange(len(rows))
    _, standard, _ = build(request, rows, ids, CpuBuildMode.STANDARD)
    _, fast, _ = build(request, rows, ids, CpuBuildMode.FAST)
    assert fast.recall >= standard.recall - 0.01


def outliers(n: int = 3000, dim: int = 32) -> np.ndarray:
    """Gaussian rows plus 1 % of rows 1000x larger: their range leaves 8-bit codes useless."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    rows[rng.choice(n, n // 100, replace=False)] *= 1000
    return rows


def tight_clusters(n: int = 3000, dim: int = 32) -> np.ndarray:
    """300 clusters of spread 0.05, 10 apart: an 8-bit step is wider than a cluster."""
    rng = np.random.default_rng(5)
    centres = rng.normal(0.0, 10.0, (300, dim)).astype(np.float32)
    return (centres[rng.integers(0, 300, n)] + rng.normal(0.0, 0.05, (n, dim))).astype(np.float32)


@pytest.mark.parametrize("make", [outliers, tight_clusters])
def test_both_modes_refuse_codes_too_coarse_for_near_neighbours_and_say_so(make: Any) -> None:
    rows = make()
    request = make_request("float", "l2", 32, len(rows))
    ids = np.arange(len(rows))
    _, standard, _ = build(request, rows, ids, CpuBuildMode.STANDARD)
    for mode in (CpuBuildMode.FAST, CpuBuildMode.AUTO):
        _, report, _ = build(request, rows, ids, mode)
        assert report.build_mode == "standard" and report.fallback
        assert report.mode_reason is not None and "8-bit codes" in report.mode_reason
        assert report.pilot is not None and report.pilot["code_noise"] > 0.01
        assert "tried" not in report.pilot  # refused before any pilot was built
        assert report.recall == standard.recall


def test_auto_falls_back_where_the_fast_graph_is_poor_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The code check off, so that the constructed set reaches the pilot.
    monkeypatch.setattr(projected_graph, "MAX_CODE_NOISE", float("inf"))
    rows = outliers()
    request = make_request("float", "l2", 32, len(rows))
    ids = np.arange(len(rows))
    _, forced, _ = build(request, rows, ids, CpuBuildMode.FAST)
    _, standard, _ = build(request, rows, ids, CpuBuildMode.STANDARD)
    _, auto, _ = build(request, rows, ids, CpuBuildMode.AUTO)
    assert forced.recall < 0.5 <= standard.recall  # the constructed set defeats the recipe
    assert auto.build_mode == "standard" and auto.requested_mode == "auto" and auto.fallback
    assert auto.mode_reason is not None and "pilot" in auto.mode_reason
    assert auto.pilot is not None
    tried = auto.pilot["tried"]
    assert tried and not any(t["ok"] for t in tried)
    assert tried[-1]["projected_dim"] == 32  # the last candidate keeps every axis
    assert all(min(t["recall_fast"]) < min(auto.pilot["recall_standard"]) for t in tried)
    assert auto.recall == standard.recall  # the standard build, untouched by the pilot
    assert "fell back" in auto.summary()


def test_auto_keeps_the_fast_graph_where_the_pilot_shows_it_as_good() -> None:
    rows = decaying(5000, 128, seed=3)
    request = make_request("float", "l2", 128, len(rows))
    _, auto, _ = build(request, rows, np.arange(len(rows)), CpuBuildMode.AUTO)
    assert auto.build_mode == "fast" and not auto.fallback
    assert auto.pilot is not None and auto.pilot["rows"] == projected_graph.pilot_rows(5000)
    # The first candidate the pilot accepted is the one built, with fewer axes than rows have.
    assert auto.pilot["tried"][-1]["ok"] and auto.pilot["projected_dim"] < 128


def test_projection_keeps_every_axis_without_spectral_decay_between_neighbours() -> None:
    # Isotropic noise around cluster centres: the centres hold most of the global
    # variance, but neighbours differ in every axis alike.
    flat = projected_graph.fit_projection(clustered(4000, 128, seed=1), SpaceType.L2)
    assert flat.matrix is None and flat.dim == 128
    steep = projected_graph.fit_projection(decaying(4000, 128), SpaceType.L2)
    assert steep.matrix is not None and steep.dim < 96
    assert steep.retained >= projected_graph.RETAINED_VARIANCE


def test_auto_builds_small_segments_the_standard_way() -> None:
    rows = decaying(1000, 32)
    request = make_request("float", "l2", 32, len(rows))
    data = dataset.Dataset(rows, np.arange(1000, dtype=np.int32), request.data_type)
    builder = CpuBuilder(mode=CpuBuildMode.AUTO)
    prepared = builder.prepare(request)
    builder.build(request, data, prepared=prepared)
    notes = prepared.notes
    assert notes.mode == "standard" and not notes.fallback and notes.pilot is None
    assert notes.reason is not None and "fewer than" in notes.reason


def test_binary_stays_standard_in_every_mode() -> None:
    bits = to_binary(clustered(1500, 128, seed=5))
    request = make_request("binary", "hamming", 128, len(bits))
    index, report, _ = build(request, bits, np.arange(len(bits)), CpuBuildMode.FAST)
    assert report.build_mode == "standard" and report.requested_mode == "fast"
    assert isinstance(index, faiss.IndexBinaryIDMap) and report.recall >= 0.9


def test_fast_build_fills_the_reserved_storage_without_reallocating() -> None:
    rows = decaying(3000, 64)
    request = make_request("float", "l2", 64, len(rows))
    builder = CpuBuilder(add_batch_rows=700, mode=CpuBuildMode.FAST)
    prepared = builder.prepare(request)
    codes = faiss.downcast_index(prepared.inner.storage).codes
    buffer = codes.data()  # reserved, so it stays where it is while filled
    data = dataset.Dataset(rows.copy(), np.arange(3000, dtype=np.int32), request.data_type)
    builder.build(request, data, prepared=prepared)
    assert codes.size() == rows.nbytes and codes.data() == buffer


def test_fast_build_reports_progress_and_can_be_cancelled() -> None:
    rows = decaying(3000, 64)
    request = make_request("float", "l2", 64, len(rows))
    data = dataset.Dataset(rows, np.arange(3000, dtype=np.int32), request.data_type)
    seen: list[int] = []
    CpuBuilder(mode=CpuBuildMode.FAST).build(request, data, progress=seen.append)
    assert sum(seen) == 3000

    def cancel(_: int) -> None:
        raise CancelledError("cancelled by operator")

    with pytest.raises(CancelledError):
        CpuBuilder(mode=CpuBuildMode.FAST).build(request, data, progress=cancel)


def test_setting_reaches_the_cpu_builder() -> None:
    settings = Settings(cpu_build="auto")
    options = settings.builder_options()
    assert options.cpu_build is CpuBuildMode.AUTO
    builder = choose_builder(BuilderOptions(device=options.device, cpu_build=CpuBuildMode.FAST))
    assert isinstance(builder, CpuBuilder) and builder.mode is CpuBuildMode.FAST
    assert Settings().cpu_build is CpuBuildMode.STANDARD
