"""The ``build`` command: one build without the service, its progress bar and report."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.workflow import (
    BuildResult,
    Stage,
    StageProgress,
    StageTiming,
    Tracker,
)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ``/_build`` body the CLI arguments stand for (same defaults as HTTP)."""
    space = args.space_type or ("hamming" if args.data_type == "binary" else "l2")
    return {
        "repository_type": "s3",
        "container_name": args.bucket,
        "vector_path": args.vector_path,
        "doc_id_path": args.doc_id_path,
        "tenant_id": args.tenant_id,
        "dimension": args.dimension,
        "doc_count": args.doc_count,
        "data_type": args.data_type,
        "engine": "faiss",
        "index_parameters": {
            "space_type": space,
            "algorithm": "hnsw",
            "algorithm_parameters": {
                "m": args.m,
                "ef_construction": args.ef_construction,
                "ef_search": args.ef_search,
            },
        },
        "skip_stored_vectors": args.skip_stored_vectors,
    }


def format_report(result: BuildResult) -> str:
    lines = [
        f"{'stage':<18} {'seconds':>9} {'MB':>10} {'MB/s':>9} {'peak RSS MB':>12}",
    ]
    for s in result.stages:
        lines.append(
            f"{s.stage:<18} {s.seconds:>9.3f} {s.nbytes / 1e6:>10.1f} {s.mb_per_s:>9.1f} "
            f"{s.peak_rss_bytes / 1e6:>12.1f}"
        )
    lines.append(f"{'total':<18} {result.seconds:>9.3f}")
    if result.quality is not None:
        q = result.quality
        lines.append(f"{'quality check':<18} {q.seconds:>9.3f}  {q.summary()}")
    return "\n".join(lines)


def _amount(value: float, unit: str) -> str:
    return f"{value / 1e6:,.1f} MB" if unit == "bytes" else f"{value:,.0f} vectors"


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ProgressBar(Tracker):
    """The build's progress: a bar redrawn in place on a terminal, plain lines otherwise.

    Plain lines come at each tenth of a stage, so a log file gets a few lines per
    stage, not one per part or batch.
    """

    WIDTH = 28

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        redraw_interval_s: float = 0.1,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self.redraw_interval_s = redraw_interval_s
        self._lock = threading.Lock()
        self._view = StageProgress(Stage.DOWNLOAD, 0, 0, 0.0)
        self._started = 0.0
        self._drawn_at = float("-inf")
        self._tenths = -1

    def stage(self, stage: Stage, total: int) -> None:
        with self._lock:
            self._started = self.clock()
            self._view = StageProgress(stage, 0, total, 0.0)
            self._tenths = -1
            self._draw(force=True)

    def advance(self, amount: int) -> None:
        with self._lock:
            v = self._view
            self._view = StageProgress(
                v.stage, v.done + amount, v.total, self.clock() - self._started
            )
            self._draw(force=False)

    def stage_finished(self, stage: Stage, timing: StageTiming) -> None:
        with self._lock:
            v = self._view
            # An estimated total (the index file) becomes what was actually done.
            done = max(v.done, timing.nbytes) if v.unit == "bytes" else v.done
            total = done if done > 0 else v.total
            self._view = StageProgress(stage, total, total, timing.seconds)
            text = f"{self.line(eta=False)}  done in {timing.seconds:.2f} s"
            self.stream.write(f"\r{text}\x1b[K\n" if self.tty else f"{text}\n")
            self.stream.flush()

    def line(self, *, eta: bool = True) -> str:
        v = self._view
        percent = v.percent
        filled = round(self.WIDTH * (percent or 0.0) / 100)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        shown = "    ? %" if percent is None else f"{percent:5.1f} %"
        line = f"{v.stage.value:<9} [{bar}] {shown}  {_amount(v.done, v.unit)}"
        line += f" of {_amount(v.total, v.unit)}" if v.total > 0 else ""
        if eta and v.eta_s is not None:
            line += f"  ETA {_clock_time(v.eta_s)}"
        return line

    def _draw(self, *, force: bool) -> None:
        if self.tty:
            now = self.clock()
            if force or now - self._drawn_at >= self.redraw_interval_s:
                self._drawn_at = now
                # \r back to the line start; ESC[K clears what a longer line left.
                self.stream.write(f"\r{self.line()}\x1b[K")
                self.stream.flush()
            return
        tenths = min(int((self._view.percent or 0.0) // 10), 9)
        if force or tenths > self._tenths:
            self._tenths = tenths
            self.stream.write(self.line() + "\n")
            self.stream.flush()


def run(args: argparse.Namespace, settings: Settings) -> int:
    import faiss

    from remote_vector_index_builder.core import workflow
    from remote_vector_index_builder.core.builder_choice import choose_builder
    from remote_vector_index_builder.core.object_store import S3ObjectStore
    from remote_vector_index_builder.core.params import parse_request
    from remote_vector_index_builder.core.s3_calls import make_s3_client

    request = parse_request(request_body(args))
    faiss.omp_set_num_threads(settings.effective_omp_threads())
    config = settings.s3_config()
    store = S3ObjectStore(make_s3_client(config), config)
    builder = choose_builder(settings.builder_options())
    progress = ProgressBar(sys.stderr)
    if logging.getLogger().level >= logging.INFO:
        # The progress shows what the workflow's per-stage INFO lines say: with both, a
        # terminal's bar is broken up and a log file gets every stage twice.
        logging.getLogger(workflow.__name__).setLevel(logging.WARNING)
    result = workflow.run(
        request,
        store,
        builder,
        mode=settings.index_serialization_mode,
        tmp_dir=settings.tmp_dir,
        tracker=progress,
    )
    print(result.file_name)
    print(
        f"s3://{request.container_name}/{result.index_key} ({result.index_bytes} bytes, "
        f"built on {result.builder})"
    )
    print(format_report(result))
    return 0
