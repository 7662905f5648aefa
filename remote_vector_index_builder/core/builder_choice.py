"""Choosing the index builder: a CPU and a GPU implementation of ``core.index_builder``.

The top of the builders' import graph: it imports both implementations, which
import only what lies below them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.errors import GpuUnavailableError
from remote_vector_index_builder.core.gpu_builder import GpuBuilder
from remote_vector_index_builder.core.gpu_probe import GpuProbe, ProbeState, probe_gpu
from remote_vector_index_builder.core.index_builder import IndexBuilder
from remote_vector_index_builder.core.options import CpuBuildMode, Device, GpuLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuilderOptions:
    device: Device = Device.AUTO
    # Rows per add() call on the CPU: how often progress and cancellation are
    # checked and how much of the downloaded blob is handed back at a time. At
    # 100k x 768 float on 2 cores, 32k-row adds built 7% faster than 8k-row ones
    # and as fast as one add of every row (which frees nothing until the end:
    # +75 MB), at the same job peak in memory mode, where the upload's buffers
    # dominate (benchmarks/README.md, section 4). int8 rows are converted to
    # fp32 8k rows at a time whatever this is (cpu_builder.CONVERT_ROWS).
    add_batch_rows: int = 32768
    # How the CPU builds the graph; see benchmarks/README.md ("build modes") for the default.
    cpu_build: CpuBuildMode = CpuBuildMode.STANDARD
    # GPU only: fall back to the CPU builder when the GPU build raises.
    gpu_fallback_to_cpu: bool = True
    # GPU only: a full HNSW assembled on the host, or the reference's level-0-only layout.
    gpu_layout: GpuLayout = GpuLayout.HNSW


def choose_builder(options: BuilderOptions, probe: GpuProbe | None = None) -> IndexBuilder:
    """Pick the builder for ``options.device``; ``auto`` means GPU when the probe says usable.

    ``probe`` is the start-up probe's verdict; without one it is taken here.
    """
    cpu = CpuBuilder(add_batch_rows=options.add_batch_rows, mode=options.cpu_build)
    if options.device is Device.CPU:
        return cpu
    probe = probe or probe_gpu()
    if not probe.usable:
        if options.device is Device.GPU:
            raise GpuUnavailableError(
                f"device gpu was requested but no GPU with CAGRA support is usable: "
                f"{probe.reason}; install the gpu extra on a CUDA host or use device cpu/auto"
            )
        if probe.state is ProbeState.NO_CAGRA:
            # faiss-cpu is the ordinary CPU install: a fact, not something left to do.
            log.info("building on the CPU: this Faiss (faiss-cpu) has no GPU classes")
        else:  # a GPU host whose GPU cannot be used
            log.warning("building on the CPU: %s", probe.reason)
        return cpu
    return GpuBuilder(
        fallback=cpu if options.gpu_fallback_to_cpu else None, layout=options.gpu_layout
    )
