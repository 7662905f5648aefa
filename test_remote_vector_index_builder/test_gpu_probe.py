"""The start-up GPU probe as the service uses it, on this host (faiss-cpu, no GPU).

The child-process probe itself needs the faiss-gpu-cuvs wheel: test_gpu_wheel.py
(``make gpu-wheel-check``) runs it, including an abort it contains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.main import Overrides, create_app
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.errors import GpuUnavailableError
from remote_vector_index_builder.core.gpu_builder import GpuBuilder
from remote_vector_index_builder.core.gpu_probe import ProbeState, probe_gpu
from remote_vector_index_builder.core.s3_calls import S3Config
from test_remote_vector_index_builder.support import make_settings, metric_value, parse_metrics

faiss_cpu = pytest.mark.skipif(
    hasattr(faiss, "GpuIndexCagra"), reason="the GPU wheel is installed (test_gpu_wheel.py)"
)


@faiss_cpu
def test_faiss_cpu_is_recognised_without_a_child_process() -> None:
    probe = probe_gpu()
    assert probe.state is ProbeState.NO_CAGRA and not probe.usable
    assert "install the gpu extra" in probe.reason
    assert probe.steps == () and probe.faiss_version == faiss.__version__


@faiss_cpu
@pytest.mark.parametrize(("device", "state"), [("cpu", "skipped"), ("auto", "no_cagra")])
def test_heart_beat_and_metrics_report_the_probe(
    service: Callable[..., TestClient], device: str, state: str
) -> None:
    client = service(device=device)
    gpu = client.get("/_heart_beat").json()["gpu"]
    assert (gpu["state"], gpu["usable"], gpu["gpus"]) == (state, False, 0)
    response = client.get("/metrics")
    samples = parse_metrics(response.text)
    assert metric_value(samples, "rvib_device_probe_info", state=state) == 1
    assert ("rvib_device_probe_gpus", frozenset()) in samples


@faiss_cpu
def test_a_gpu_service_whose_gpu_memory_cannot_be_read_does_not_start(
    s3_config: S3Config, object_store: Any
) -> None:
    # A GPU builder stands in for a usable GPU (none here); NVML then has nothing to read.
    seams = Overrides(object_store=object_store, builder=GpuBuilder(fallback=CpuBuilder()))
    app = create_app(make_settings(s3_config, device="auto"), seams)
    with pytest.raises(GpuUnavailableError, match="set GPU_MEMORY_LIMIT"), TestClient(app):
        pass
    limited = create_app(make_settings(s3_config, device="auto", gpu_memory_limit=2**30), seams)
    with TestClient(limited) as client:
        memory = client.get("/_heart_beat").json()["memory"]
        assert memory["gpu_limit_bytes"] == 2**30
