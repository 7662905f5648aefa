"""Sampling profiles of benchmark children, and their summaries.

``python -m benchmarks.run --profile`` runs the first repeat of each measurement
under a sampling profiler and writes a summary per measurement
(``<name>.top.txt``) beside the raw samples:

* with Linux ``perf`` (``perf record -e cpu-clock``, which works without
  hardware counters): on-CPU samples only, native code included, summarized by
  shared object and by symbol - where the CPU seconds of a transfer or a build
  go (SHA-256 in libcrypto, copies in libc, page clearing in the kernel, Faiss's
  distance kernels);
* otherwise with ``py-spy record --native`` (``<name>.folded``, loadable in
  speedscope): its idle detection counts threads blocked in native calls as
  busy, so its shares overstate waiting threads.

The service section attaches ``py-spy --gil`` to the running service: samples
of whichever thread holds the GIL, i.e. what keeps the event loop from running.
Profiled runs are slower (the sampler takes CPU on the same cores): read their
numbers as profiles, the tables come from runs without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE_HZ = 250
# Frames whose inclusive share is printed when they appear: the stages and the
# per-byte work of the transfers.
WATCHED = (
    "download",
    "_send_part",
    "write",
    "write_from",
    "readinto",
    "recv_into",
    "sendall",
    "crc32",
    "sha256",
    "_page_buffer",
    "add",
    "add_with_ids",
    "convert",
    "serialize",
    "upload_file",
    "__memmove_avx_unaligned_erms",
    "clear_page_erms",
    "asm_exc_page_fault",
)
_FRAME = re.compile(r"^(?P<function>[^ ]+)(?: \((?P<where>[^)]*)\))?$")


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def perf() -> str | None:
    """``perf`` if it can sample this machine's CPU clock."""
    found = shutil.which("perf")
    if found is None:
        return None
    probe = subprocess.run(
        [found, "record", "-e", "cpu-clock", "-o", os.devnull, "--", "true"],
        capture_output=True,
        check=False,
    )
    return found if probe.returncode == 0 else None


def record_command(output: Path, command: list[str]) -> tuple[list[str], dict[str, str]]:
    """``command`` under perf (``output`` with ``.perf``) or py-spy (``.folded``), and env.

    perf starts paused and samples only while the child's measured work runs:
    ``benchmarks.job`` writes enable/disable to the control FIFO named in the env.
    """
    perf_path = perf()
    if perf_path is not None:
        data = output.with_suffix(".perf")
        control = output.with_suffix(".ctl")
        control.unlink(missing_ok=True)
        os.mkfifo(control)
        return [
            perf_path,
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "499",
            "-q",
            "-D",
            "-1",
            f"--control=fifo:{control}",
            "-o",
            str(data),
            "--",
            *command,
        ], {"BENCH_PERF_CONTROL": str(control)}
    return _py_spy_record(output, "--native", "--subprocesses", "--", *command), {}


def attach_command(output: Path, pid: int, seconds: float, gil: bool = False) -> list[str]:
    """py-spy sampling the running process ``pid`` for ``seconds``.

    With ``gil`` only the thread holding the GIL is sampled: what keeps the
    event loop from running Python.
    """
    duration = str(max(1, round(seconds)))
    # --nonblocking: otherwise py-spy stops the process for every sample and latencies balloon.
    options = ["--pid", str(pid), "--nonblocking", "--duration", duration]
    return _py_spy_record(output, *options, *(["--gil"] if gil else []))


def _py_spy_record(output: Path, *arguments: str) -> list[str]:
    """``py-spy record`` writing collapsed stacks to ``output``, then ``arguments``."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed; run `make bench` (it installs '.[dev]')")
    common = ["--format", "raw", "--rate", str(RATE_HZ), "--output", str(output)]
    return [spy, "record", *common, *arguments]


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    where = match.group("where") or ""
    name = Path(where.split(":")[0]).name if where else ""
    return f"{match.group('function')} ({name})" if name else match.group("function")


def summarize(folded: Path, top: int = 15) -> str:
    """A text summary of py-spy's collapsed stacks: self time and watched frames."""
    own: Counter[str] = Counter()
    below: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        # py-spy puts the process and thread first: "process 12:..." ; "thread (0x..)".
        threads[next((f for f in frames if f.startswith("thread")), "?")] += count
        own[frames[-1]] += count
        # "S3ObjectStore.download (object_store.py)" counts as "download".
        for name in {f.split(" ")[0].rsplit(".", 1)[-1] for f in frames}:
            if name in WATCHED:
                below[name] += count
    if total == 0:
        return f"{folded.name}: no samples\n"
    seconds = total / RATE_HZ
    lines = [
        f"{folded.name}: {total} samples at {RATE_HZ} Hz = {seconds:.1f} busy thread-seconds",
        "",
        "self time (where the samples end):",
    ]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines += ["", "time spent below (inclusive):"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in below.most_common()]
    return "\n".join(lines) + "\n"


def summarize_perf(data: Path, top: int = 15) -> str:
    """``perf report``'s on-CPU shares by shared object and by symbol."""
    lines = [f"{data.name}: on-CPU samples (perf cpu-clock)", ""]
    for sort, title in (("dso", "by shared object"), ("dso,sym", "by symbol")):
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        rows = [row.rstrip() for row in report.splitlines() if re.match(r"^\s+\d+\.\d+%", row)]
        lines += [f"{title}:", *rows[:top], ""]
    return "\n".join(lines)


def write_summary(output: Path) -> Path | None:
    """Summarize what ``record_command(output, ...)`` or ``attach_command`` recorded."""
    target = output.with_suffix(".top.txt")
    data = output.with_suffix(".perf")
    output.with_suffix(".ctl").unlink(missing_ok=True)
    if data.exists():
        target.write_text(summarize_perf(data))
        return target
    if not output.exists():
        return None
    target.write_text(summarize(output))
    return target
