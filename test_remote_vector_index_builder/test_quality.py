"""The quality report: recall@10 of a built index on a sample of its own vectors.

Each report is compared with an independent computation: numpy brute force over
the rows the index stores, the ID-mapped index searched for doc ids.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from remote_vector_index_builder import build_command
from remote_vector_index_builder.core import dataset, quality, workflow
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.errors import CancelledError
from test_remote_vector_index_builder.support import request_for
from testbed.data import (
    clustered,
    doc_id_blob,
    make_request,
    normalized,
    sparse_ids,
    to_binary,
    to_int8,
    vector_blob,
)


def parsed(request: Any, rows: np.ndarray, ids: np.ndarray) -> dataset.Dataset:
    return dataset.parse(
        request,
        np.frombuffer(bytearray(vector_blob(rows)), dtype=np.uint8),
        np.frombuffer(bytearray(doc_id_blob(ids)), dtype=np.uint8),
    )


def independent_recall(
    index: Any, stored: np.ndarray, ids: np.ndarray, sample: np.ndarray, metric: str, ef: int
) -> float:
    """Brute force in numpy; a result counts if no farther than the 10th true neighbour.

    ``index`` searches at its own ``efSearch`` (the request's), ``ef``.
    """
    queries = stored[sample]
    if metric == "hamming":
        bits = np.unpackbits(stored, axis=1).astype(np.int32)
        dist = (bits[sample][:, None, :] != bits[None, :, :]).sum(axis=2).astype(np.float64)
    elif metric == "innerproduct":
        dist = -(queries.astype(np.float64) @ stored.astype(np.float64).T)
    else:
        dist = (
            (queries[:, None, :].astype(np.float64) - stored[None].astype(np.float64)) ** 2
        ).sum(axis=2)
    dist[np.arange(len(sample)), sample] = np.inf  # a query is not its own neighbour
    kth = np.sort(dist, axis=1)[:, 9]
    _, found = index.search(queries if metric == "hamming" else queries.astype(np.float32), 11)
    position = {int(doc): row for row, doc in enumerate(ids)}
    hits = 0
    for q, row in enumerate(found):
        kept = [position[int(doc)] for doc in row if doc >= 0 and position[int(doc)] != sample[q]]
        hits += sum(dist[q, p] <= kth[q] + 1e-5 * abs(kth[q]) + 1e-6 for p in kept[:10])
    return hits / (10 * len(sample))


CASES = [
    ("float", "l2"),
    ("float", "innerproduct"),
    ("half_float", "l2"),
    ("byte", "l2"),
    ("binary", "hamming"),
]


@pytest.mark.parametrize(("data_type", "space"), CASES)
def test_report_equals_an_independent_recall_computation(data_type: str, space: str) -> None:
    dim = 256 if data_type == "binary" else 48
    rows = clustered(2500, dim, seed=4)
    if space == "innerproduct":
        rows = normalized(rows)
    if data_type == "byte":
        rows = to_int8(rows)
    if data_type == "binary":
        rows = to_binary(rows)
    ids = sparse_ids(len(rows))
    # A low ef_search so that the index misses some neighbours: the check must see them.
    request = make_request(
        data_type,
        space,
        dim,
        len(rows),
        index_parameters={
            "space_type": space,
            "algorithm_parameters": {"ef_construction": 16, "ef_search": 12},
        },
    )
    data = parsed(request, rows, ids)
    sample = quality.QuerySample.take(data.vectors, 200)
    index = CpuBuilder(add_batch_rows=700, knn_graph_max_rows=0).build(request, data)
    report = quality.check(request, index, sample)

    stored = rows.astype(np.float16).astype(np.float32) if data_type == "half_float" else rows
    expected = independent_recall(index, stored, ids, sample.positions, space, 12)
    assert report.recall == pytest.approx(expected, abs=1e-6)
    assert 0.5 < report.recall < 1.0  # the low ef really misses neighbours
    assert report.k == 10 and report.ef_search == 12 and report.sample_size == 200
    # The sample was copied before the build released the blob's pages.
    assert sample.rows.shape[0] == 200


def test_sample_is_seeded_and_independent_of_the_build() -> None:
    rows = clustered(1000, 16)
    a = quality.QuerySample.take(rows)
    b = quality.QuerySample.take(rows.copy())
    np.testing.assert_array_equal(a.positions, b.positions)
    assert len(a.positions) == quality.SAMPLE_SIZE and np.all(np.diff(a.positions) > 0)
    np.testing.assert_array_equal(a.rows, rows[a.positions])
    small = quality.QuerySample.take(rows[:50])
    assert len(small.positions) == 50  # every row of a small segment


def test_exact_search_over_storage_matches_brute_force_in_batches() -> None:
    import faiss

    rows = clustered(3000, 24, seed=8)
    inner = faiss.IndexHNSWSQ(24, faiss.ScalarQuantizer.QT_fp16, 8)
    inner.add(rows)
    queries = rows[:40]
    distances, labels = quality.exact_from_storage(inner, queries, 5, "l2", rows=700)
    stored = rows.astype(np.float16).astype(np.float32)
    truth = np.argsort(((queries[:, None] - stored[None]) ** 2).sum(axis=2), axis=1)[:, :5]
    np.testing.assert_array_equal(labels, truth)
    assert distances.shape == (40, 5)


def test_workflow_reports_quality_in_result_logs_and_cli(
    s3_client: Any, bucket: str, object_store: Any, caplog: Any
) -> None:
    rows = clustered(1500, 32, seed=3)
    stem = "q/seg"
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knnvec", Body=vector_blob(rows))
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knndid", Body=doc_id_blob(np.arange(1500)))
    request = request_for(bucket, stem, 32, 1500)
    with caplog.at_level(logging.INFO, logger="remote_vector_index_builder.core.quality"):
        result = workflow.run(request, object_store, CpuBuilder())
    report = result.quality
    assert report is not None
    assert report.build_mode == "standard" and not report.fallback
    assert report.recall >= 0.95 and report.sample_size == quality.SAMPLE_SIZE
    body = json.loads(json.dumps(report.as_dict()))
    for key in ("recall", "k", "ef_search", "sample_size", "seconds", "build_mode", "fallback"):
        assert key in body
    assert any("index quality: recall@10" in r.getMessage() for r in caplog.records)
    table = build_command.format_report(result)
    assert "quality check" in table and f"{report.recall:.4f}" in table
    # The report is a measurement of this index: the uploaded file is unchanged by it.
    raw = s3_client.get_object(Bucket=bucket, Key=result.index_key)["Body"].read()
    assert len(raw) == result.index_bytes


def test_report_summary_names_a_fallback() -> None:
    report = quality.QualityReport(
        recall=0.99,
        k=10,
        ef_search=100,
        sample_size=256,
        seconds=0.1,
        build_mode="standard",
        requested_mode="auto",
        fallback=True,
        mode_reason="pilot said no",
    )
    assert "requested auto, fell back: pilot said no" in report.summary()
    out = io.StringIO()
    out.write(json.dumps(report.as_dict()))
    assert json.loads(out.getvalue())["mode_reason"] == "pilot said no"


def test_a_huge_ef_search_is_searched_at_ntotal_with_identical_recall() -> None:
    """Faiss allocates ef-sized heaps per query: at ef 2**31 - 1 that is 16 GiB a thread.

    The check runs in a child limited to 3 GiB of address space, so a search at the
    request's ef fails there (``std::bad_alloc``) instead of swapping this machine.
    """
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import numpy as np
        from remote_vector_index_builder.core import dataset, quality
        from remote_vector_index_builder.core.cpu_builder import CpuBuilder
        from testbed.data import clustered, make_dataset, make_request

        rows = clustered(1500, 16, seed=4)
        huge = make_request("float", "l2", 16, 1500, ef_construction=16, ef_search=2**31 - 1)
        small = make_request("float", "l2", 16, 1500, ef_construction=16, ef_search=1500)
        index = CpuBuilder().build(huge, make_dataset(huge, rows, np.arange(1500)))
        sample = quality.QuerySample.take(rows, 64)
        a = quality.check(huge, index, sample).recall
        b = quality.check(small, index, sample).recall
        print(a, b)
        sys.exit(0 if a == b else 3)
        """)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_check_stops_at_its_next_batch_when_the_job_is_cancelled() -> None:
    rows = clustered(3000, 16, seed=4)
    request = make_request("float", "l2", 16, 3000, ef_construction=16, ef_search=32)
    index = CpuBuilder().build(request, parsed(request, rows, np.arange(3000)))
    sample = quality.QuerySample.take(rows, 256)
    calls: list[int] = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise CancelledError("cancelled by operator")

    with pytest.raises(CancelledError):
        quality.check(request, index, sample, checkpoint=checkpoint)
    assert len(calls) == 2  # it stopped at the batch boundary where the cancel came


def test_a_cancel_after_the_build_stops_the_job_in_its_quality_check(
    s3_client: Any, bucket: str, object_store: Any
) -> None:
    """The runner cancels (or a time limit fails) a job through its tracker: the quality
    check must see it between its batches, not run on to the upload."""
    rows = clustered(3000, 16, seed=5)
    stem = "q/cancel"
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knnvec", Body=vector_blob(rows))
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knndid", Body=doc_id_blob(np.arange(3000)))
    request = request_for(bucket, stem, 16, 3000)

    class CancelAfterBuild(workflow.Tracker):
        def __init__(self) -> None:
            self.cancelled = False
            self.stages: list[str] = []

        def stage(self, stage: workflow.Stage, total: int) -> None:
            self.stages.append(stage.value)

        def stage_finished(self, stage: workflow.Stage, timing: workflow.StageTiming) -> None:
            self.cancelled = self.cancelled or stage is workflow.Stage.BUILD

        def advance(self, amount: int) -> None:
            if self.cancelled:
                raise CancelledError("cancelled by operator")

    tracker = CancelAfterBuild()
    with pytest.raises(CancelledError):
        workflow.run(request, object_store, CpuBuilder(), tracker=tracker)
    assert tracker.stages == ["download", "parse", "build"]  # never reached the upload
