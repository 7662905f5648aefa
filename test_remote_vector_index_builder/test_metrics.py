"""``GET /metrics``: scraped before, during and after real builds through the app."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from remote_vector_index_builder.app.metrics import GpuSample, Metrics, Nvml
from test_remote_vector_index_builder.support import (
    GatedStore,
    both_modes,
    fast_body,
    upload,
    wait_terminal,
)
from test_remote_vector_index_builder.support import MetricSamples as Samples
from test_remote_vector_index_builder.support import metric_value as value
from test_remote_vector_index_builder.support import parse_metrics as parse
from testbed.data import clustered


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def test_metrics_follow_a_real_job(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    store = GatedStore(object_store)
    client = service(store=store, max_workers=1, cpu_memory_limit=8 * 1024**3)
    n, dim = 3000, 32
    upload(s3_client, bucket, "idx/a", clustered(n, dim))
    upload(s3_client, bucket, "idx/b", clustered(n, dim, seed=1))
    before = scrape(client)
    assert value(before, "rvib_jobs_submitted_total", data_type="float") == 0
    assert value(before, "rvib_build_device_info", device="cpu") == 1
    assert value(before, "rvib_memory_limit_bytes", memory="host") == 8 * 1024**3
    assert value(before, "rvib_workers") == 1 and value(before, "rvib_ready") == 1
    assert value(before, "process_resident_memory_bytes") > 0

    first = client.post("/_build", json=fast_body(bucket, "idx/a", dim, n)).json()["job_id"]
    second = client.post("/_build", json=fast_body(bucket, "idx/b", dim, n)).json()["job_id"]
    assert store.waiting.acquire(timeout=10)  # the first job is downloading, held at the gate
    during = scrape(client)
    assert value(during, "rvib_jobs_running") == 1 and value(during, "rvib_jobs_queued") == 1
    assert value(during, "rvib_jobs_submitted_total", data_type="float") == 2
    assert value(during, "rvib_memory_reserved_bytes", memory="host") > 0

    store.gate.set()
    for job_id in (first, second):
        assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    after = scrape(client)
    assert value(after, "rvib_jobs_completed_total", data_type="float") == 2
    assert value(after, "rvib_jobs_running") == 0 and value(after, "rvib_jobs_queued") == 0
    assert value(after, "rvib_memory_reserved_bytes", memory="host") == 0
    assert value(after, "rvib_vectors_indexed_total", data_type="float") == 2 * n
    blobs = n * dim * 4 + n * 4
    assert value(after, "rvib_downloaded_bytes_total") == 2 * blobs
    index_sizes = [
        s3_client.head_object(Bucket=bucket, Key=f"idx/{s}.faiss")["ContentLength"] for s in "ab"
    ]
    assert value(after, "rvib_uploaded_bytes_total") == sum(index_sizes)
    for stage in ("download", "parse", "build", "upload"):
        assert value(after, "rvib_stage_duration_seconds_count", stage=stage) == 2, stage
        assert value(after, "rvib_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert value(after, "rvib_stage_duration_seconds_count", stage="serialize") == 0
    # Each index's recall on a sample of its own vectors (core/quality.py), in /_jobs/{id} too.
    assert value(after, "rvib_index_recall_count", data_type="float") == 2
    for job_id in (first, second):
        report = client.get(f"/_jobs/{job_id}").json()["quality"]
        assert report["k"] == 10 and report["build_mode"] == "standard"
        assert 0.9 <= report["recall"] <= 1.0
    recalls = value(after, "rvib_index_recall_sum", data_type="float")
    assert recalls == sum(
        client.get(f"/_jobs/{j}").json()["quality"]["recall"] for j in (first, second)
    )

    # HTTP requests by route template, not by raw path.
    posted = value(after, "rvib_http_requests_total", method="POST", route="/_build", code="200")
    assert posted == 2
    status_route = "/_status/{job_id}"
    polls = value(after, "rvib_http_requests_total", method="GET", route=status_route, code="200")
    assert polls >= 2
    latency = "rvib_http_request_duration_seconds_count"
    assert value(after, latency, method="POST", route="/_build") == 2


@both_modes
def test_failures_are_counted_by_error_class(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    client = service()
    job_id = client.post("/_build", json=fast_body(bucket, "idx/none", 16, 300)).json()["job_id"]
    assert wait_terminal(client, job_id)["task_status"] == "FAILED_INDEX_BUILD"
    assert client.get("/no/such/path").status_code == 404
    assert client.request("BREW", "/_jobs").status_code == 405
    samples = scrape(client)
    failed = ("rvib_jobs_failed_total", "float", "ObjectNotFoundError")
    assert value(samples, failed[0], data_type=failed[1], reason=failed[2]) == 1
    assert value(samples, "rvib_jobs_completed_total", data_type="float") == 0
    # Unknown paths and methods share label values: the series stay bounded.
    assert value(samples, "rvib_http_requests_total", method="GET", route="unmatched", code="404")
    assert value(samples, "rvib_http_requests_total", method="other", route="/_jobs", code="405")


def test_metrics_need_auth_unless_exempted(service: Callable[..., TestClient]) -> None:
    good = {"Authorization": "Basic " + base64.b64encode(b"ops:pw").decode()}
    guarded = service(auth_username="ops", auth_password="pw")
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers=good).status_code == 200

    exempt = service(auth_username="ops", auth_password="pw", metrics_require_auth=False)
    assert exempt.get("/metrics").status_code == 200
    assert exempt.get("/_jobs").status_code == 401


def test_openmetrics_when_the_scraper_asks(service: Callable[..., TestClient]) -> None:
    client = service()
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_gpu_gauges_come_from_nvml_samples(service: Callable[..., TestClient]) -> None:
    # No GPU here: NVML (nvidia-ml-py, the gpu extra) is absent or finds no driver.
    nvml = Nvml()
    assert nvml.sample() == []
    nvml.close()
    # What a GPU host exports, from samples shaped like NVML's answers.
    client = service()
    metrics = Metrics()
    metrics.watch(
        client.app.state.runner.state,  # type: ignore[attr-defined]
        lambda: [
            GpuSample(0, 3 * 1024**3, 16 * 1024**3, 0.75),
            GpuSample(1, 0, 16 * 1024**3, None),
        ],
    )
    body, content_type = metrics.exposition(None)
    assert content_type.startswith("text/plain")
    samples = parse(body.decode())
    assert value(samples, "rvib_gpu_memory_used_bytes", gpu="0") == 3 * 1024**3
    assert value(samples, "rvib_gpu_memory_total_bytes", gpu="1") == 16 * 1024**3
    assert value(samples, "rvib_gpu_utilization_ratio", gpu="0") == 0.75
    assert ("rvib_gpu_utilization_ratio", frozenset({("gpu", "1")})) not in samples
    # Without a GPU the app exports no GPU series at all.
    assert not any(name.startswith("rvib_gpu_") for name, _ in scrape(client))
