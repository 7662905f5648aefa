"""One short check of the GPU path on a GPU host (well under 5 minutes on one GPU).

    python -m benchmarks.gpu_check [--sizes 5000x64,200000x768] [--no-cpu]

For 5,000 x 64 and 200,000 x 768 per data type it builds with CAGRA on the GPU (the
builder's own code, no fallback) and with HNSW on the CPU, each in a fresh child process, and
prints build seconds, recall@10 against exact search, the peak host RSS over the child's
baseline and the peak GPU memory in use (NVML, sampled every 20 ms, over the baseline
before the build) next to the admission estimate (core/memory.py). Then it times the binary
``copyTo`` at the larger size with ``base_level_only`` set before it (what the builder does)
and after it (what it did before issue 12). Where the start-up probe finds no usable GPU it
prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from benchmarks.common import GIB, int8_scale, typed_rows, vm_hwm_bytes, vm_rss_bytes

DATA_TYPES = ("float", "half_float", "byte", "binary")
QUERIES = 200


def _request(n: int, dim: int, data_type: str) -> Any:
    from remote_vector_index_builder.core.params import BuildRequest

    return BuildRequest.model_validate(
        {
            "repository_type": "s3",
            "container_name": "gpu-check",
            "vector_path": "gpu-check/seg.knnvec",
            "doc_id_path": "gpu-check/seg.knndid",
            "dimension": dim,
            "doc_count": n,
            "data_type": data_type,
            "index_parameters": {
                "space_type": "hamming" if data_type == "binary" else "l2",
                "algorithm_parameters": {"m": 16, "ef_construction": 100, "ef_search": 100},
            },
        }
    )


def _data(n: int, dim: int, data_type: str) -> tuple[np.ndarray, np.ndarray]:
    from testbed.data import clustered

    rows = clustered(n + QUERIES, dim, seed=11)
    typed = typed_rows(rows, data_type, int8_scale(rows[:n]))
    return typed[:n], typed[n:]


def _blobs(n: int, dim: int, data_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k-NN blobs as downloaded (writable bytes) and held-out queries; nothing else kept."""
    rows, queries = _data(n, dim, data_type)
    vector_blob = np.empty(rows.nbytes, dtype=np.uint8)
    vector_blob[:] = np.ascontiguousarray(rows).view(np.uint8).ravel()
    id_blob = np.empty(n * 4, dtype=np.uint8)
    id_blob[:] = np.arange(n, dtype="<i4").view(np.uint8)
    return vector_blob, id_blob, queries.copy()


def _reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: 5 to clear_refs); without it the peak includes setup."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass


class _GpuPeak:
    """Peak NVML memory-in-use of GPU ``device`` while the block runs, over its start."""

    def __init__(self, device: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        self.baseline = self._used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> _GpuPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())
        self._nvml.nvmlShutdown()


def child_build(n: int, dim: int, data_type: str, device: str) -> dict[str, Any]:
    """One build in this (fresh) process; prints nothing but the result."""
    from remote_vector_index_builder.core import dataset, memory
    from remote_vector_index_builder.core.cpu_builder import CpuBuilder
    from remote_vector_index_builder.core.gpu_builder import GpuBuilder
    from remote_vector_index_builder.core.multipart import UploadPlan
    from remote_vector_index_builder.core.quality import recall_at_k
    from remote_vector_index_builder.core.s3_calls import S3Config

    request = _request(n, dim, data_type)
    vector_blob, id_blob, queries = _blobs(n, dim, data_type)
    data = dataset.parse(request, vector_blob, id_blob)
    rows = data.vectors  # a view of the blob, as the builder gets it
    _reset_peak_rss()  # data generation peaked higher than the service's download does
    baseline = vm_rss_bytes() - vector_blob.nbytes - id_blob.nbytes  # the blobs are counted
    need = memory.estimate(
        request, upload=UploadPlan.of(S3Config()), add_batch_rows=32768, gpu=True
    )
    builder: Any = GpuBuilder() if device == "gpu" else CpuBuilder()
    gpu_peak = 0
    start = time.perf_counter()
    if device == "gpu":
        with _GpuPeak() as peak:
            index = builder.build(request, data)
        gpu_peak = peak.peak - peak.baseline
    else:
        index = builder.build(request, data)
    seconds = time.perf_counter() - start
    space = "hamming" if data_type == "binary" else "l2"
    if space == "hamming":  # one query per call, as data nodes search (test_gpu_replay)
        recall = float(
            np.mean([recall_at_k(index, rows, np.arange(n), q[None], space) for q in queries])
        )
    else:
        recall = recall_at_k(index, rows, np.arange(n), queries.astype(np.float32), space)
    return {
        "seconds": seconds,
        "recall": recall,
        "host_peak": vm_hwm_bytes() - baseline,
        "gpu_peak": gpu_peak,
        "host_estimate": need.host_bytes,
        "gpu_estimate": need.gpu_bytes,
    }


def child_binary_copy_to(n: int, dim: int) -> dict[str, Any]:
    """Binary copyTo with base_level_only set before it and after it, same trained index."""
    from remote_vector_index_builder.core import dataset
    from remote_vector_index_builder.core.gpu_builder import (
        _CagraSession,
        _hnsw_target,
        _host_rows,
        cagra_params,
    )

    request = _request(n, dim, "binary")
    vector_blob, id_blob, _ = _blobs(n, dim, "binary")
    data = dataset.parse(request, vector_blob, id_blob)
    params = cagra_params(request)
    result: dict[str, Any] = {}
    with _CagraSession(0) as session:
        session.train(params, _host_rows(params, data))
        for label, flag_first in (("flag before", True), ("flag after", False)):
            target = _hnsw_target(params)
            target.base_level_only = flag_first
            start = time.perf_counter()
            session.copy_to(target)
            result[label] = time.perf_counter() - start
            result[label + " max_level"] = int(target.hnsw.max_level)
    return result


def _in_child(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--child", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _gib(value: int) -> str:
    return f"{value / GIB:6.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="5000x64,200000x768")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU builds")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "copy_to":
            out = child_binary_copy_to(int(rest[0]), int(rest[1]))
        else:
            out = child_build(int(rest[0]), int(rest[1]), rest[2], kind)
        print(json.dumps(out))
        return 0

    from remote_vector_index_builder.core.gpu_probe import probe_gpu

    probe = probe_gpu()
    if not probe.usable:
        print(f"gpu_check skipped: {probe.reason} (state {probe.state.value})")
        return 0
    memory_total = _gib(probe.memory_total_bytes or 0)
    print(f"faiss {probe.faiss_version}, {probe.gpus} GPU(s), GPU 0 {memory_total} GiB")
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    print(
        f"{'size':>12} {'type':>10} | {'gpu s':>7} {'cpu s':>7} {'speedup':>7} | "
        f"{'R@10 gpu':>8} {'cpu':>5} | {'host GiB':>8} {'est':>6} | {'gpu GiB':>7} {'est':>6}"
    )
    for n, dim in sizes:
        for data_type in DATA_TYPES:
            gpu = _in_child("gpu", str(n), str(dim), data_type)
            cpu = {} if args.no_cpu else _in_child("cpu", str(n), str(dim), data_type)
            label = f"{n}x{dim}"
            if "error" in gpu:
                print(f"{label:>12} {data_type:>10} | GPU build failed: {gpu['error']}")
                continue
            cpu_s = cpu.get("seconds", float("nan"))
            print(
                f"{label:>12} {data_type:>10} | {gpu['seconds']:7.2f} {cpu_s:7.2f} "
                f"{cpu_s / gpu['seconds']:7.1f} | {gpu['recall']:8.3f} "
                f"{cpu.get('recall', float('nan')):5.3f} | {_gib(gpu['host_peak']):>8} "
                f"{_gib(gpu['host_estimate'])} | {_gib(gpu['gpu_peak']):>7} "
                f"{_gib(gpu['gpu_estimate'])}"
            )
    n, dim = sizes[-1]
    copy = _in_child("copy_to", str(n), str(dim))
    if "error" in copy:
        print(f"binary copyTo at {n}x{dim}: failed: {copy['error']}")
    else:
        print(
            f"binary copyTo at {n}x{dim} bits: flag before {copy['flag before']:.2f} s "
            f"(max_level {copy['flag before max_level']}), flag after "
            f"{copy['flag after']:.2f} s (max_level {copy['flag after max_level']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
