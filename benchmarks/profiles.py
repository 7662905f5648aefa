"""Sampling profiles of benchmark children with py-spy, and their summaries.

``python -m benchmarks.run --profile`` runs the first repeat of each measurement
under ``py-spy record --native`` and writes, per measurement, the raw collapsed
stacks (``<name>.folded``, loadable in speedscope or flamegraph.pl) and a summary
(``<name>.top.txt``): where the samples end (self time, by function), and how
much of the time is spent below a few functions that matter to the targets.

py-spy samples every thread that is running (not idle) a fixed number of times
per second, so a function's share of samples is its share of the process's
busy thread time. Profiled runs are slower (the sampler takes CPU on the same
cores): read their numbers as profiles, the tables come from runs without it.
"""

from __future__ import annotations

import re
import shutil
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


def record_command(output: Path, command: list[str]) -> list[str]:
    """``command`` run under py-spy, writing collapsed stacks to ``output``."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed; run `make bench` (it installs '.[dev]')")
    return [
        spy,
        "record",
        "--native",
        "--subprocesses",
        "--format",
        "raw",
        "--rate",
        str(RATE_HZ),
        "--output",
        str(output),
        "--",
        *command,
    ]


def attach_command(output: Path, pid: int, seconds: float, gil: bool = False) -> list[str]:
    """py-spy sampling the running process ``pid`` for ``seconds``.

    With ``gil`` only the thread holding the GIL is sampled: what keeps the
    event loop from running Python.
    """
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed; run `make bench` (it installs '.[dev]')")
    return [
        spy,
        "record",
        "--pid",
        str(pid),
        # Without it py-spy stops the process for every sample: latencies balloon.
        "--nonblocking",
        "--duration",
        str(max(1, round(seconds))),
        "--format",
        "raw",
        "--rate",
        str(RATE_HZ),
        "--output",
        str(output),
        *(["--gil"] if gil else []),
    ]


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
        for name in {f.split(" ")[0] for f in frames}:
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


def write_summary(folded: Path) -> Path | None:
    if not folded.exists():
        return None
    target = folded.with_suffix(".top.txt")
    target.write_text(summarize(folded))
    return target
