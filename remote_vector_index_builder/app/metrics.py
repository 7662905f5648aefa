"""Prometheus metrics: one registry per app, created by the lifespan (never at import).

Counters and histograms are updated where things happen: the runner (jobs
submitted and finished), its tracker (stage durations, bytes, vectors) and an
ASGI middleware (HTTP requests). Gauges (queue, memory, device, GPU) are read
at scrape time from the runner's one state snapshot, the same one
``/_heart_beat`` and ``/_ready`` answer from, so they cannot drift apart. This
module knows the runner only through ``RunnerView`` (the runner imports it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.gpu_probe import GpuProbe
from remote_vector_index_builder.core.workflow import Stage

log = logging.getLogger(__name__)

# From sub-second parses of small segments to builds of an hour and more.
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# Recall of built indexes: the interesting range is 0.8 to 1.
RECALL_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
# Every endpoint answers from memory: anything near a second is a problem.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Any other method string a client sends is counted as "other" (bounded label values).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class RunnerView(Protocol):
    """What the gauges read of ``runner.RunnerState``."""

    @property
    def ready(self) -> bool: ...
    @property
    def device(self) -> str: ...
    @property
    def workers(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def host_limit(self) -> int: ...
    @property
    def host_reserved(self) -> int: ...
    @property
    def gpu_limit(self) -> int: ...
    @property
    def gpu_reserved(self) -> int: ...


@dataclass(frozen=True)
class GpuSample:
    index: int
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float | None


GpuSampler = Callable[[], list[GpuSample]]


class Nvml:
    """NVML (``nvidia-ml-py``, in the gpu extra) when it loads and finds a driver.

    Without it ``sample`` returns nothing and the GPU gauges are simply absent.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, or NVMLError without a driver
            log.info("NVML unavailable (%s): no GPU device metrics", exc)
            return
        self._nvml = pynvml

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        if nvml is None:
            return []
        samples: list[GpuSample] = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    utilization: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                except nvml.NVMLError:
                    utilization = None
                samples.append(GpuSample(index, int(memory.used), int(memory.total), utilization))
        except nvml.NVMLError as exc:
            log.warning("NVML query failed: %s", exc)
        return samples

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("NVML shutdown failed: %s", exc)
            self._nvml = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter(
            "rvib_jobs_submitted",
            "Build jobs accepted (new jobs and new attempts)",
            ["data_type"],
            registry=r,
        )
        self.jobs_completed = Counter(
            "rvib_jobs_completed", "Builds whose index was uploaded", ["data_type"], registry=r
        )
        self.jobs_failed = Counter(
            "rvib_jobs_failed",
            "Builds that ended as FAILED_INDEX_BUILD, by error class (cancelled, time_limit, "
            "shutdown, an RvibError subclass, MemoryError or unexpected)",
            ["data_type", "reason"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "rvib_stage_duration_seconds",
            "Duration of completed build stages (in memory serialization mode, upload "
            "includes the serialization streamed into it)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.index_recall = Histogram(
            "rvib_index_recall",
            "recall@10 of each built index on a sample of its own vectors at the request's "
            "ef_search (core/quality.py), by data type",
            ["data_type"],
            buckets=RECALL_BUCKETS,
            registry=r,
        )
        self.downloaded_bytes = Counter(
            "rvib_downloaded_bytes", "Bytes of vector and doc id blobs downloaded", registry=r
        )
        self.uploaded_bytes = Counter(
            "rvib_uploaded_bytes", "Bytes of index files uploaded", registry=r
        )
        self.vectors_indexed = Counter(
            "rvib_vectors_indexed", "Vectors added to indexes", ["data_type"], registry=r
        )
        self.http_requests = Counter(
            "rvib_http_requests",
            "HTTP requests by method, route template and status code",
            ["method", "route", "code"],
            registry=r,
        )
        self.requests_refused = Counter(
            "rvib_requests_refused",
            "Requests refused with 400, 401, 403, 409, 422, 429, 503 or 507, by code and reason "
            "(the error class, invalid_json or invalid_request); each is logged at WARNING",
            ["code", "reason"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "rvib_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        # Series that exist from the start, so rates and dashboards see zeros, not gaps.
        for data_type in DataType:
            for counter in (self.jobs_submitted, self.jobs_completed, self.vectors_indexed):
                counter.labels(data_type.value)
            self.index_recall.labels(data_type.value)
        for stage in Stage:
            self.stage_seconds.labels(stage.value)
        ProcessCollector(registry=r)

    def watch(self, state: Callable[[], RunnerView], gpu: GpuSampler | None = None) -> None:
        """Export the runner's queue, memory budget and device (and GPUs) at scrape time."""
        self.registry.register(_StateCollector(state, gpu))

    def report_gpu_probe(self, probe: GpuProbe) -> None:
        """The start-up GPU probe's verdict (core/gpu_probe.py); fixed for the process."""
        state = Gauge(
            "rvib_device_probe_info",
            "The start-up GPU probe's state (usable, no_gpu, aborted, ...)",
            ["state"],
            registry=self.registry,
        )
        state.labels(probe.state.value).set(1)
        Gauge(
            "rvib_device_probe_gpus", "GPUs Faiss counted at start-up", registry=self.registry
        ).set(probe.gpus)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    def observe_http(self, method: str, route: str, code: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.http_requests.labels(method, route, str(code)).inc()
        self.http_seconds.labels(method, route).observe(seconds)


class _StateCollector:
    def __init__(self, state: Callable[[], RunnerView], gpu: GpuSampler | None) -> None:
        self.state = state
        self.gpu = gpu

    def collect(self) -> Iterable[Metric]:
        state = self.state()
        yield _gauge("rvib_jobs_queued", "Jobs waiting for a worker or for memory", state.queued)
        yield _gauge(
            "rvib_jobs_running", "Jobs in a build stage (downloading ... uploading)", state.running
        )
        yield _gauge("rvib_workers", "Concurrent builds allowed (MAX_WORKERS)", state.workers)
        yield _gauge("rvib_ready", "1 when builds are accepted (as GET /_ready)", int(state.ready))
        device = GaugeMetricFamily(
            "rvib_build_device_info", "The device builds run on", labels=["device"]
        )
        device.add_metric([state.device], 1)
        yield device
        reserved = GaugeMetricFamily(
            "rvib_memory_reserved_bytes",
            "Memory reserved by admitted builds (admission control)",
            labels=["memory"],
        )
        reserved.add_metric(["host"], state.host_reserved)
        reserved.add_metric(["gpu"], state.gpu_reserved)
        yield reserved
        limit = GaugeMetricFamily(
            "rvib_memory_limit_bytes",
            "Memory builds may reserve (CPU_MEMORY_LIMIT, GPU_MEMORY_LIMIT)",
            labels=["memory"],
        )
        limit.add_metric(["host"], state.host_limit)
        limit.add_metric(["gpu"], state.gpu_limit)
        yield limit
        samples = self.gpu() if self.gpu is not None else []
        if samples:
            yield from _gpu_families(samples)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _gpu_families(samples: list[GpuSample]) -> Iterable[Metric]:
    used = GaugeMetricFamily(
        "rvib_gpu_memory_used_bytes", "GPU memory in use (NVML), all processes", labels=["gpu"]
    )
    total = GaugeMetricFamily("rvib_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["gpu"])
    utilization = GaugeMetricFamily(
        "rvib_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample", labels=["gpu"]
    )
    for sample in samples:
        used.add_metric([str(sample.index)], sample.memory_used_bytes)
        total.add_metric([str(sample.index)], sample.memory_total_bytes)
        if sample.utilization_ratio is not None:
            utilization.add_metric([str(sample.index)], sample.utilization_ratio)
    return [used, total, utilization]


class HttpMetricsMiddleware:
    """Counts requests and their latency by route template (``/_status/{job_id}``) and code.

    Pure ASGI, so it sees the router's matched route in the scope after the call;
    unmatched paths share one label value to keep the series bounded.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = 500  # an exception escaping the app becomes a 500

        async def send_and_note(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.observe_http(scope["method"], route, code, time.perf_counter() - start)
