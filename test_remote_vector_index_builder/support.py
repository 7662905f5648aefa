"""What the tests share to drive the service: settings, a clock, request bodies, uploads,
waits, gated components, and the fleet's stores on a real Redis in this process. Test
modules import from here (and from ``data.py`` for seeded blobs, ``faultproxy.py`` for the
fault proxy), never from each other or conftest.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from remote_vector_index_builder.app.admission import Admission
from remote_vector_index_builder.app.fleet_health import FleetMetrics, Health
from remote_vector_index_builder.app.fleet_service import FleetJobService
from remote_vector_index_builder.app.fleet_store import (
    LEASES,
    FleetConfig,
    FleetStore,
    StatusCache,
)
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core import memory
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.dataset import Dataset
from remote_vector_index_builder.core.index_builder import FaissIndex, Progress
from remote_vector_index_builder.core.multipart import UploadPlan
from remote_vector_index_builder.core.object_store import S3ObjectStore, Upload
from remote_vector_index_builder.core.options import MIN_PART_SIZE
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.s3_calls import ObjectInfo, S3Config
from testbed.data import doc_id_blob, vector_blob

T = TypeVar("T")
STATUS_KEYS = {"task_status", "file_name", "error_message"}
# Small graphs build fast on a busy 2-core machine; the code paths are the same.
FAST = {"space_type": "l2", "algorithm_parameters": {"m": 8, "ef_construction": 16}}
# Polls of 10 ms: a generous bound for a small build on a loaded 2-core machine.
POLLS = 3000
TICK_S = 0.01


class Clock:
    """A clock that moves only when a test sets ``now``."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ``GET /metrics`` samples by (name, labels).
MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> MetricSamples:
    """The Prometheus text exposition format, parsed by prometheus_client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_value(samples: MetricSamples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; 0 when absent (a counter never bumped)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


# conftest's ``service`` in both modes: one process, and a fleet replica (on a Redis of its
# own) that renews its lease and publishes progress every 0.1 s.
both_modes = pytest.mark.parametrize("service", ["local", "fleet"], indirect=True)
FLEET_SETTINGS: dict[str, Any] = {
    "replica_id": "solo",
    "lease_seconds": 10,
    "heartbeat_seconds": 0.1,
}


def make_settings(s3_config: S3Config, **overrides: Any) -> Settings:
    """Settings for a service on the test S3 server (no .env file, CPU, 2 workers)."""
    values: dict[str, Any] = {
        "s3_endpoint_url": s3_config.endpoint_url,
        "s3_path_style": True,
        "s3_part_size": s3_config.part_size,
        "device": "cpu",
        "max_workers": 2,
        "shutdown_grace_seconds": 5,
        "omp_threads": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def build_body(
    bucket: str, stem: str, dim: int, n: int, *, fast: bool = False, **kw: Any
) -> dict[str, Any]:
    """A ``POST /_build`` body as the k-NN client sends it; ``fast``: a small graph."""
    body: dict[str, Any] = {
        "repository_type": "s3",
        "container_name": bucket,
        "vector_path": f"{stem}.knnvec",
        "doc_id_path": f"{stem}.knndid",
        "tenant_id": "cluster-a",
        "dimension": dim,
        "doc_count": n,
        "data_type": "float",
        "engine": "faiss",
        "index_parameters": (
            FAST
            if fast
            else {
                "space_type": "l2",
                "algorithm": "hnsw",
                "algorithm_parameters": {"ef_construction": 100, "m": 16, "ef_search": 100},
            }
        ),
    }
    body.update(kw)
    return body


# The keys the k-NN client's contract requires; the rest have defaults.
REQUIRED_KEYS = (
    "repository_type",
    "container_name",
    "vector_path",
    "doc_id_path",
    "dimension",
    "doc_count",
)


def required_body(bucket: str, stem: str, dim: int, n: int, **kw: Any) -> dict[str, Any]:
    """``build_body`` with only the required keys (defaults apply to the rest), plus ``kw``."""
    full = build_body(bucket, stem, dim, n)
    return {**{key: full[key] for key in REQUIRED_KEYS}, **kw}


def request_for(bucket: str, stem: str, dim: int, n: int, **kw: Any) -> BuildRequest:
    """The parsed ``required_body``: what a minimal client request becomes."""
    return BuildRequest.model_validate(required_body(bucket, stem, dim, n, **kw))


def fast_body(bucket: str, stem: str, dim: int, n: int, **kw: Any) -> dict[str, Any]:
    return build_body(bucket, stem, dim, n, fast=True, **kw)


def upload(s3_client: Any, bucket: str, stem: str, vectors: np.ndarray) -> None:
    """Both blobs of ``stem`` (doc ids 1, 3, 5, ...: not the row numbers)."""
    ids = np.arange(len(vectors), dtype=np.int32) * 2 + 1
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knndid", Body=doc_id_blob(ids))


def wait_terminal(client: TestClient, job_id: str, polls: int = POLLS) -> dict[str, Any]:
    """Polls ``/_status`` (checking its keys) until the job is no longer running."""
    ticker = threading.Event()
    for _ in range(polls):
        response = client.get(f"/_status/{job_id}")
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        assert set(status) == STATUS_KEYS
        if status["task_status"] != "RUNNING_INDEX_BUILD":
            return status
        ticker.wait(TICK_S)
    raise AssertionError(f"job {job_id} did not finish")


def wait_idle(service: TestClient | FastAPI, polls: int = POLLS) -> None:
    """Until no build thread is left: the worker recorded the outcome and released its
    memory (a cancelled build ends at its next batch). ``service``: a TestClient or an app."""
    app: Any = service.app if isinstance(service, TestClient) else service
    runner = app.state.runner
    tick = threading.Event()
    for _ in range(polls):
        if runner.busy() == 0:
            return
        tick.wait(TICK_S)
    raise AssertionError("a build thread is still running")


class GatedStore:
    """The real S3 store, with a gate that holds downloads until a test opens it."""

    def __init__(self, inner: S3ObjectStore) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.waiting = threading.Semaphore(0)

    def download(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.waiting.release()
        assert self.gate.wait(timeout=30), "test never opened the gate"
        return self.inner.download(*args, **kwargs)

    def head(self, bucket: str, key: str) -> ObjectInfo:
        return self.inner.head(bucket, key)

    def open_upload(self, *args: Any, **kwargs: Any) -> Upload:
        return self.inner.open_upload(*args, **kwargs)

    def upload_file(self, *args: Any, **kwargs: Any) -> int:
        return self.inner.upload_file(*args, **kwargs)

    def abort_incomplete_uploads(self, bucket: str, key: str) -> int:
        return self.inner.abort_incomplete_uploads(bucket, key)


class GatedBuilder:
    """The real CPU builder, paused after ``pause_after`` batches until a test resumes it.

    It builds by insertion whatever the segment's size (its pauses count ``add`` batches).
    """

    name = "cpu"

    def __init__(self, add_batch_rows: int = 1000, pause_after: int = 2) -> None:
        self.inner = CpuBuilder(add_batch_rows=add_batch_rows, knn_graph_max_rows=0)
        self.pause_after = pause_after
        self.paused = threading.Event()
        self.resume = threading.Event()

    def prepare(self, request: BuildRequest) -> Any:
        return self.inner.prepare(request)

    def build(
        self,
        request: BuildRequest,
        dataset: Dataset,
        progress: Progress | None = None,
        prepared: Any = None,
    ) -> FaissIndex:
        batches = 0

        def report(added: int) -> None:
            nonlocal batches
            batches += 1
            if batches == self.pause_after + 1:
                self.paused.set()
                assert self.resume.wait(timeout=30), "test never resumed the build"
            if progress is not None:
                progress(added)

        return self.inner.build(request, dataset, report, prepared)


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_variables() -> set[str]:
    """Every variable name in the first column of the README's settings table."""
    text = README.read_text()
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*\*?)`", line.split("|")[1]))
    return names


def estimate(request: BuildRequest) -> memory.MemoryEstimate:
    """The admission estimate with small upload parts and batches (real formula)."""
    return memory.estimate(request, upload=UploadPlan(MIN_PART_SIZE, 2), add_batch_rows=10_000)


def admission(host_bytes: int = 2**50, gpu_bytes: int = 0) -> Admission:
    """Admission with ``estimate`` and these limits (by default, everything fits)."""
    return Admission(host_bytes, gpu_bytes, estimate)


# --------------------------------------------------------------------------------------
# The fleet's stores in this process, on a real redis-server (conftest's ``redis_server``)
# --------------------------------------------------------------------------------------


def fleet_config(url: str, replica: str = "r1", **kw: Any) -> FleetConfig:
    values: dict[str, Any] = {
        "url": url,
        "replica_id": replica,
        "lease_s": 0.3,
        "heartbeat_s": 0.05,
        "max_attempts": 3,
        "retry_after_s": 7,
        "ttl_s": 60.0,
        "max_active": 100,
    }
    values.update(kw)
    return FleetConfig(**values)


def sync_store(url: str, replica: str = "r1", **kw: Any) -> FleetStore:
    config = fleet_config(url, replica, **kw)
    health = Health(FleetMetrics(CollectorRegistry()), config.retry_after_s)
    return FleetStore(redis.Redis.from_url(url, decode_responses=True), config, health)


def with_service(
    url: str,
    body: Callable[[FleetJobService], Awaitable[T]],
    cache: StatusCache | None = None,
    intake: Admission | None = None,
    **config: Any,
) -> T:
    """Run ``body`` on a fresh service in its own event loop (the client belongs to it);
    ``intake``: its admission (by default, everything fits)."""

    async def main() -> T:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        settings = fleet_config(url, **config)
        service = FleetJobService(
            client,
            settings,
            cache or StatusCache(),
            Health(FleetMetrics(CollectorRegistry()), settings.retry_after_s),
            time.time,
            intake or admission(),
        )
        try:
            return await body(service)
        finally:
            await service.close()

    return asyncio.run(main())


def fleet_submit(url: str, request: BuildRequest, intake: Admission | None = None) -> str:
    return with_service(url, lambda s: s.submit(request), intake=intake)


def fleet_status(url: str, job_id: str) -> dict[str, Any]:
    return with_service(url, lambda s: s.status(job_id))


def run_out_lease(url: str, job_id: str) -> None:
    """The owner stopped renewing: its lease's expiry (Redis's clock, ms) lies in the past."""
    r: Any = redis.Redis.from_url(url, decode_responses=True)
    assert r.zadd(LEASES, {job_id: 0}, xx=True, ch=True) == 1


@contextmanager
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards (``configure_logging``
    replaces them); handlers added meanwhile are closed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
