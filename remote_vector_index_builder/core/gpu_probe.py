"""Whether the GPU path can run here, asked once at start-up where an abort cannot hurt.

Some Faiss GPU calls abort the process instead of raising: ``GpuIndexBinaryCagra`` on a
device CUDA cannot use (its constructor enters the device before any check), and
``get_num_gpus`` on unusual CUDA errors. So the probe runs them in a short child process
(``python -m remote_vector_index_builder.core.gpu_probe``) that prints one JSON line per step
it passed; the parent reads how far it got, and a signal or a timeout becomes a state instead
of a dead service. A Faiss without the CAGRA classes (faiss-cpu) is recognised in-process,
with no child, since nothing there touches CUDA.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# A first CUDA initialisation with a cold driver and a large wheel takes seconds; a hung
# driver takes forever.
PROBE_TIMEOUT_S = 120.0


class ProbeState(StrEnum):
    USABLE = "usable"
    SKIPPED = "skipped"  # RVIB_DEVICE=cpu: nothing probed
    NO_CAGRA = "no_cagra"  # this Faiss has no GPU CAGRA classes (faiss-cpu)
    NO_GPU = "no_gpu"  # Faiss counts fewer GPUs than the device index
    FAILED = "failed"  # a step raised
    ABORTED = "aborted"  # the child died of a signal (SIGABRT from Faiss/CUDA)
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class GpuProbe:
    state: ProbeState
    reason: str  # what an operator reads in the log, /_heart_beat and the builder's error
    device: int = 0
    gpus: int = 0  # GPUs Faiss counted (0 when it could not count)
    faiss_version: str | None = None
    memory_total_bytes: int | None = None  # the device's memory (NVML), when it could be read
    steps: tuple[str, ...] = ()  # steps the child passed, in order

    @property
    def usable(self) -> bool:
        return self.state is ProbeState.USABLE

    def summary(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "usable": self.usable,
            "reason": self.reason,
            "device": self.device,
            "gpus": self.gpus,
            "faiss_version": self.faiss_version,
            "memory_total_bytes": self.memory_total_bytes,
        }


def skipped(reason: str = "RVIB_DEVICE is cpu") -> GpuProbe:
    return GpuProbe(ProbeState.SKIPPED, reason)


def probe_gpu(
    device: int = 0, *, timeout_s: float = PROBE_TIMEOUT_S, construct_without_gpus: bool = False
) -> GpuProbe:
    """Probe ``device``. ``construct_without_gpus`` constructs the GPU indexes even where
    Faiss counts no GPU: only for checking, on a host without one, that their aborts are
    contained (``make gpu-wheel-check``)."""
    import faiss

    version = str(getattr(faiss, "__version__", "")) or None
    if not hasattr(faiss, "GpuIndexCagra") or not hasattr(faiss, "get_num_gpus"):
        return GpuProbe(
            ProbeState.NO_CAGRA,
            "this Faiss has no GPU CAGRA classes (faiss-cpu): install the gpu extra",
            device,
            faiss_version=version,
        )
    command = [sys.executable, "-m", __name__, str(device)]
    if construct_without_gpus:
        command.append("--construct-without-gpus")
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            preexec_fn=_no_core_dumps,  # a contained abort should not leave a core file
        )
    except subprocess.TimeoutExpired:
        return GpuProbe(
            ProbeState.TIMED_OUT,
            f"probing GPU {device} took more than {timeout_s:.0f} s (a hung driver?)",
            device,
            faiss_version=version,
        )
    return _verdict(device, version, done.returncode, done.stdout, done.stderr)


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _verdict(device: int, version: str | None, code: int, out: str, err: str) -> GpuProbe:
    facts: dict[str, Any] = {}
    steps: list[str] = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # Faiss and CUDA print to stdout too
        if isinstance(record, dict) and "step" in record:
            steps.append(str(record["step"]))
            facts.update(record)
    gpus = int(facts.get("gpus", 0))
    memory = facts.get("memory_total_bytes")
    common: dict[str, Any] = {
        "device": device,
        "gpus": gpus,
        "faiss_version": facts.get("faiss_version", version),
        "memory_total_bytes": int(memory) if memory is not None else None,
        "steps": tuple(steps),
    }
    tail = " ".join(err.strip().splitlines()[-3:])[-400:]
    last = steps[-1] if steps else "start"
    if code < 0:
        name = signal.Signals(-code).name
        return GpuProbe(
            ProbeState.ABORTED,
            f"the GPU probe died of {name} after step {last!r}: {tail or 'no message'}",
            **common,
        )
    if "error" in facts:
        return GpuProbe(ProbeState.FAILED, f"after step {last!r}: {facts['error']}", **common)
    if code != 0:
        return GpuProbe(
            ProbeState.FAILED, f"the GPU probe exited {code} after step {last!r}: {tail}", **common
        )
    if facts.get("step") == "no_gpu" or gpus <= device:
        nvml = facts.get("nvml_gpus")
        why = (
            f"NVML sees {nvml} GPU(s) but Faiss sees {gpus}: the driver is likely older than "
            "the CUDA runtime of the installed faiss-gpu-cuvs"
            if nvml
            else f"Faiss sees {gpus} GPU(s)"
        )
        return GpuProbe(ProbeState.NO_GPU, f"GPU {device} is not usable: {why}", **common)
    return GpuProbe(ProbeState.USABLE, "", **common)


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def _child(device: int, construct_without_gpus: bool) -> None:
    """The child's steps; each printed line is a step that completed."""
    import faiss

    _emit(step="import", faiss_version=str(faiss.__version__))
    nvml_gpus, memory = _nvml(device)
    _emit(step="nvml", nvml_gpus=nvml_gpus, memory_total_bytes=memory)
    gpus = int(faiss.get_num_gpus())
    _emit(step="count", gpus=gpus)
    if gpus <= device and not construct_without_gpus:
        _emit(step="no_gpu")
        return
    failed = False
    resources = faiss.StandardGpuResources()
    resources.noTempMemory()
    resources.setPinnedMemory(0)
    config = faiss.GpuIndexCagraConfig()
    config.device = device
    constructors: list[tuple[str, Callable[[], object]]] = [
        ("GpuIndexCagra", lambda: faiss.GpuIndexCagra(resources, 8, faiss.METRIC_L2, config)),
        # Aborts the process on a device CUDA cannot use, rather than raising.
        ("GpuIndexBinaryCagra", lambda: faiss.GpuIndexBinaryCagra(resources, 64, config)),
    ]
    for name, construct in constructors:
        try:
            construct()
        except RuntimeError as exc:  # the first error is the verdict; go on to what aborts
            message = (str(exc).strip().splitlines() or [""])[-1][:400]
            _emit(step=f"{name} raised", **({} if failed else {"error": message}))
            failed = True
            continue
        _emit(step=name)


def _nvml(device: int) -> tuple[int | None, int | None]:
    """GPUs NVML sees and ``device``'s memory; (None, None) without NVML or a driver.

    NVML numbers GPUs in PCI bus order, CUDA fastest first unless CUDA_DEVICE_ORDER is
    PCI_BUS_ID: the same on one-GPU hosts and containers given one GPU.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError without a driver
        return None, None
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        if device >= count:
            return count, None
        handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        return count, int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except pynvml.NVMLError:
        return None, None
    finally:
        pynvml.nvmlShutdown()


if __name__ == "__main__":
    _child(int(sys.argv[1]), "--construct-without-gpus" in sys.argv[2:])
