"""The GPU module against the real faiss-gpu-cuvs wheel, on a host without a GPU.

Runs in ``make gpu-wheel-check``'s own venv (the gpu extra, no faiss-cpu) and is skipped
elsewhere. What cannot exist here is the device: where a test needs Faiss to believe in one,
``gpu_available`` is pretended True and says so; every Faiss call after that is real.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from typing import Any

import faiss
import numpy as np
import pytest

from remote_vector_index_builder.core import gpu_builder
from remote_vector_index_builder.core.builder_choice import BuilderOptions, choose_builder
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.data_types import NumericType
from remote_vector_index_builder.core.errors import BuildError, GpuUnavailableError
from remote_vector_index_builder.core.gpu_builder import (
    GpuBuilder,
    _CagraSession,
    _set,
    cagra_params,
)
from remote_vector_index_builder.core.gpu_probe import ProbeState, probe_gpu
from remote_vector_index_builder.core.options import Device
from testbed.data import (
    doc_ids,
    make_dataset,
    make_request,
    recall_at_k,
    rows_for,
)

pytestmark = pytest.mark.skipif(
    not hasattr(faiss, "GpuIndexCagra"), reason="needs the faiss-gpu-cuvs wheel (gpu extra)"
)
no_gpu = pytest.mark.skipif(
    hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0, reason="this host has a GPU"
)
untyped_faiss: Any = faiss

KINDS = [("float", "l2"), ("half_float", "innerproduct"), ("byte", "l2"), ("binary", "hamming")]


@pytest.mark.parametrize(("data_type", "space"), KINDS)
def test_every_config_field_the_builder_sets_exists_and_reads_back(
    data_type: str, space: str
) -> None:
    params = cagra_params(make_request(data_type, space, dim=64, n=10_000, m=16))
    config = _CagraSession(device=0).config(params)
    assert isinstance(config, untyped_faiss.GpuIndexCagraConfig)
    assert (config.device, config.graph_degree, config.intermediate_graph_degree) == (0, 64, 64)
    assert config.build_algo == getattr(faiss, params.build_algo.value)
    assert (config.nn_descent_niter, config.store_dataset) == (20, False)
    if params.ivf_pq is None:
        assert config.ivf_pq_params is None and config.ivf_pq_search_params is None
        return
    build, search = config.ivf_pq_params, config.ivf_pq_search_params
    assert (build.n_lists, build.pq_dim, build.pq_bits) == (100, 16, 8)
    assert (build.kmeans_n_iters, build.kmeans_trainset_fraction) == (20, 0.1)
    assert build.force_random_rotation and build.conservative_memory_allocation
    assert (search.n_probes, config.refine_rate) == (5, 1.0)


def test_set_refuses_unknown_fields_and_values_the_field_cannot_hold() -> None:
    for struct in ("GpuIndexCagraConfig", "IVFPQBuildCagraConfig", "IVFPQSearchCagraConfig"):
        config = getattr(faiss, struct)()
        config.n_prbes = 3  # Faiss itself takes the typo silently
        with pytest.raises(BuildError, match=f"{struct} has no field 'n_prbes'"):
            _set(config, n_prbes=3)
    with pytest.raises(BuildError, match=r"IVFPQBuildCagraConfig.n_lists cannot hold -1"):
        _set(faiss.IVFPQBuildCagraConfig(), n_lists=-1)  # uint32_t


def test_the_hnsw_targets_match_the_numeric_types() -> None:
    for data_type, numeric in [("half_float", "Float16"), ("byte", "Int8")]:
        params = cagra_params(make_request(data_type, "l2", dim=32, n=1000, m=8))
        assert params.numeric_type is NumericType(numeric)
        assert isinstance(getattr(faiss, numeric), int)


@no_gpu
def test_the_probe_counts_no_gpu_in_its_child() -> None:
    probe = probe_gpu()
    assert probe.state is ProbeState.NO_GPU and probe.gpus == 0
    assert probe.steps == ("import", "nvml", "count", "no_gpu")
    assert probe.faiss_version == faiss.__version__
    assert "Faiss sees 0 GPU(s)" in probe.reason


@no_gpu
def test_the_binary_constructor_aborts_and_the_probe_contains_it() -> None:
    # The fact that makes a child process necessary: this aborts instead of raising.
    code = (
        "import faiss; r = faiss.StandardGpuResources(); "
        "faiss.GpuIndexBinaryCagra(r, 64, faiss.GpuIndexCagraConfig())"
    )
    died = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert died.returncode == -signal.SIGABRT
    probe = probe_gpu(construct_without_gpus=True)
    assert probe.state is ProbeState.ABORTED, probe
    assert "SIGABRT" in probe.reason
    assert probe.steps[-1] == "GpuIndexCagra raised"  # cleanly, then the binary one aborted


@no_gpu
def test_auto_builds_on_the_cpu_and_gpu_refuses_with_the_probe_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert isinstance(choose_builder(BuilderOptions(device=Device.AUTO)), CpuBuilder)
    assert "building on the CPU: GPU 0 is not usable" in caplog.text
    with pytest.raises(GpuUnavailableError, match="Faiss sees 0 GPU"):
        choose_builder(BuilderOptions(device=Device.GPU))


@no_gpu
@pytest.mark.parametrize(("data_type", "space"), KINDS)
def test_with_a_pretended_device_the_real_constructors_fail_cleanly_into_the_cpu_fallback(
    data_type: str, space: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretended: the in-process GPU check (no device exists here). Everything after is real:
    # StandardGpuResources, noTempMemory, the configs, GpuIndexCagra's constructor raising
    # "Invalid GPU device 0"; for binary, the device check that keeps GpuIndexBinaryCagra's
    # constructor from aborting.
    monkeypatch.setattr(gpu_builder, "gpu_available", lambda: True)
    n, dim = 1000, 64 if data_type == "binary" else 32
    request = make_request(data_type, space, dim=dim, n=n, m=8)
    rows, ids = rows_for(data_type, space, n, dim), doc_ids(n)
    with caplog.at_level(logging.WARNING):
        index = GpuBuilder(fallback=CpuBuilder()).build(request, make_dataset(request, rows, ids))
    assert "GPU build failed, using the cpu builder instead" in caplog.text
    assert "Invalid GPU device 0" in caplog.text
    assert index.ntotal == n
    queries = rows[:40] if data_type == "binary" else rows[:40].astype(np.float32) + 0.01
    assert recall_at_k(index, rows, ids, queries, space) >= 0.8


def test_a_probe_that_does_not_answer_in_time_is_a_state_not_a_hang() -> None:
    # Importing the GPU wheel alone takes over a second: 50 ms cannot be met.
    probe = probe_gpu(timeout_s=0.05)
    assert probe.state is ProbeState.TIMED_OUT and not probe.usable
    assert "took more than" in probe.reason
