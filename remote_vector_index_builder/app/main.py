"""The app factory. Its lifespan owns every long-lived object; nothing starts at import.

The mode is chosen once (``make_backend``): one process (``local.LocalBackend``) or a
fleet replica (``fleet.Fleet``); both have the same shape, so the lifespan wires either
without asking which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import faiss
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline

from remote_vector_index_builder import __version__
from remote_vector_index_builder.app import routes
from remote_vector_index_builder.app.admission import Admission
from remote_vector_index_builder.app.jobs import Clock, JobLedger, JobService
from remote_vector_index_builder.app.local import LocalBackend
from remote_vector_index_builder.app.metrics import HttpMetricsMiddleware, Metrics, Nvml
from remote_vector_index_builder.app.runner import Runner, RunnerConfig
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core import gpu_probe, memory
from remote_vector_index_builder.core.builder_choice import choose_builder
from remote_vector_index_builder.core.errors import GpuUnavailableError, RvibError
from remote_vector_index_builder.core.index_builder import IndexBuilder
from remote_vector_index_builder.core.multipart import UploadPlan
from remote_vector_index_builder.core.object_store import ObjectStore, S3ObjectStore
from remote_vector_index_builder.core.options import Device
from remote_vector_index_builder.core.s3_calls import S3Access, make_s3_client, s3_access

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)


@dataclass
class Overrides:
    """Seams for tests and embedding: replace a component, keep the rest real."""

    object_store: ObjectStore | None = None
    builder: IndexBuilder | None = None
    clock: Clock = time.time


def default_workers(builder: IndexBuilder) -> int:
    # One GPU build saturates the GPU; on the CPU, Faiss's OpenMP already uses
    # every core, so a second concurrent build only overlaps its S3 transfers.
    return 1 if builder.name == "gpu" else 2


def gpu_memory_bytes(probe: gpu_probe.GpuProbe) -> int:
    """The GPU's memory as the start-up probe read it (NVML); unknown stops the start-up,
    since a 0 limit would answer every build with 507."""
    if probe.memory_total_bytes is None:
        raise GpuUnavailableError(
            f"cannot read GPU {probe.device}'s memory through NVML (nvidia-ml-py, gpu extra): "
            "set GPU_MEMORY_LIMIT to the bytes GPU builds may use"
        )
    return probe.memory_total_bytes


class Backend(Protocol):
    """Where jobs live and how they reach this runner: one process or a fleet replica."""

    @property
    def service(self) -> JobService:
        """For the endpoints."""
        ...

    @property
    def ledger(self) -> JobLedger:
        """For the runner."""
        ...

    def start(self, runner: Runner) -> None: ...

    def slot_free(self) -> None:
        """A build thread is free, or a build got stuck: place queued jobs again."""
        ...

    def stop(self) -> None:
        """Take no more jobs (before the runner shuts down)."""
        ...

    async def close(self) -> None: ...

    def summary(self) -> dict[str, Any]:
        """The keys this backend adds to ``/_heart_beat``."""
        ...


def make_backend(
    settings: Settings, admission: Admission, metrics: Metrics, clock: Clock
) -> Backend:
    if settings.redis_url is None:
        return LocalBackend(settings, admission, metrics, clock)
    # Only here: one process never imports redis.
    from remote_vector_index_builder.app.fleet import Fleet

    return Fleet(settings, settings.redis_url.get_secret_value(), admission, metrics, clock)


def create_app(settings: Settings, overrides: Overrides | None = None) -> FastAPI:
    seams = overrides or Overrides()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        faiss.omp_set_num_threads(settings.effective_omp_threads())
        probe = gpu_probe.skipped() if settings.device is Device.CPU else gpu_probe.probe_gpu()
        builder = seams.builder or choose_builder(settings.builder_options(), probe)
        workers = settings.max_workers or default_workers(builder)
        s3_config = settings.s3_config()
        store = seams.object_store or S3ObjectStore(
            make_s3_client(s3_config, concurrent_jobs=workers), s3_config
        )
        on_gpu = builder.name == "gpu"
        estimate = memory.EstimateOptions(
            upload=UploadPlan.of(s3_config),
            add_batch_rows=settings.add_batch_rows,
            gpu=on_gpu,
            cpu_build=settings.cpu_build.value,
            gpu_layout=settings.gpu_index_layout.value,
        )
        admission = Admission(
            settings.effective_cpu_memory_limit(),
            settings.gpu_memory_limit or (gpu_memory_bytes(probe) if on_gpu else 0),
            estimate.estimate,
        )
        metrics = Metrics()
        backend = make_backend(settings, admission, metrics, seams.clock)
        runner = Runner(
            RunnerConfig(
                max_workers=workers,
                mode=settings.index_serialization_mode,
                tmp_dir=str(settings.tmp_dir) if settings.tmp_dir else None,
                estimate=estimate,
                time_limit_s=settings.job_time_limit_seconds,
                build_nice=settings.build_nice,
                omp_threads=settings.effective_omp_threads(),
            ),
            backend.ledger,
            store,
            builder,
            admission,
            seams.clock,
            metrics,
            on_slot_free=backend.slot_free,
        )
        nvml = Nvml() if on_gpu else None
        metrics.watch(runner.state, nvml.sample if nvml is not None else None)
        metrics.report_gpu_probe(probe)
        app.state.gpu_probe = probe
        app.state.metrics = metrics
        app.state.settings = settings
        app.state.admission = admission
        app.state.backend = backend
        app.state.runner = runner
        app.state.credentials = settings.basic_credentials()
        # A replica that cannot sign S3 requests would accept jobs that all fail.
        s3 = S3Access("given", None) if seams.object_store else s3_access(s3_config)
        if s3.problem is not None:
            admission.refuse(s3.problem)
        log.info(
            "starting: %s",
            settings.summary(
                device=builder.name,
                workers=runner.config.max_workers,
                host_memory=f"{admission.host_limit / 2**30:.1f}GiB",
                gpu_memory=f"{admission.gpu_limit / 2**30:.1f}GiB",
                s3_credentials=s3.source or "none",
            ),
        )
        backend.start(runner)
        try:
            yield
        finally:
            log.info("shutting down: %d builds in flight", runner.busy())
            backend.stop()
            runner.shutdown(settings.shutdown_grace_seconds)
            await backend.close()
            if nvml is not None:
                nvml.close()

    # /docs and /redoc from the static files fastapi-offline installs, not a CDN: they
    # work on an air-gapped GPU host.
    app = FastAPIOffline(
        title="Remote Vector Index Builder",
        version=__version__,
        description="Builds Faiss indexes for OpenSearch k-NN from vectors in S3.",
        lifespan=lifespan,
    )
    app.include_router(routes.router)
    app.add_middleware(HttpMetricsMiddleware)
    app.add_exception_handler(RvibError, routes.error_response)
    app.add_exception_handler(405, routes.method_not_allowed)

    app.add_exception_handler(RequestValidationError, routes.validation_error)
    app.add_middleware(routes.CollapseSlashes)
    return app


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How ``serve`` runs ``app`` under uvicorn (the demo and tests use the same)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
        # Idle keep-alive connections outlive the client's 5 s poll (core/options.py).
        timeout_keep_alive=settings.keep_alive_seconds,
    )


def serve(settings: Settings) -> bool:
    """Run the service until it is stopped; False if it never started (its lifespan failed)."""
    import uvicorn

    server = uvicorn.Server(server_config(create_app(settings), settings))
    with suppress(KeyboardInterrupt):
        server.run()
    return server.started
