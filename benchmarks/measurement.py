"""What every ``benchmarks.job`` child measures with: its peak RSS from a reset baseline,
its CPU time, the profiler's window, Faiss's threads, and the JSON line it prints."""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.common import vm_hwm_bytes, vm_rss_bytes


def reset_peak() -> int:
    """Resident memory now, with the peak reset to it: the peak then covers only what follows.

    Writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` (Linux 4.0+), so
    transients of imports and set-up (generating test data, warming caches)
    stay out of the measured peak.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass  # the peak then includes the set-up; still an upper bound
    return vm_rss_bytes()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def measured() -> Iterator[None]:
    """The measured work: a profiler started paused (``BENCH_PERF_CONTROL``) samples only it."""
    control = os.environ.get("BENCH_PERF_CONTROL")
    if not control:
        yield
        return
    with open(control, "w", encoding="ascii") as fifo:
        fifo.write("enable\n")
        fifo.flush()
        try:
            yield
        finally:
            fifo.write("disable\n")
            fifo.flush()


def emit(result: dict[str, Any]) -> None:
    result.setdefault("peak_rss", vm_hwm_bytes())
    print(json.dumps(result), flush=True)


def omp_threads(count: int) -> int:
    import faiss

    threads = count or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    return threads
