"""One build, start to end: download -> parse -> build -> serialize -> upload.

``run`` is the library entry point; the CLI and the service both call it.
Memory: the vector blob is downloaded into one buffer, viewed without a copy,
and released as soon as the index holds its own copy of the vectors. In
``memory`` mode the serialized index is streamed into a multipart upload, so
it never exists whole a second time; in ``disk`` mode it goes to a private
temporary file and the index is freed before the upload starts.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from remote_vector_index_builder.core import dataset as dataset_stage
from remote_vector_index_builder.core import index_io, memory, quality
from remote_vector_index_builder.core.dataset import Dataset, ids_as_int64
from remote_vector_index_builder.core.errors import ObjectStoreError
from remote_vector_index_builder.core.index_builder import IndexBuilder, PreparedIndex
from remote_vector_index_builder.core.object_store import NumberedUploads, ObjectStore
from remote_vector_index_builder.core.options import SerializationMode
from remote_vector_index_builder.core.overlapped_upload import OverlappedWrite
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.quality import QualityReport

log = logging.getLogger(__name__)


class Stage(StrEnum):
    DOWNLOAD = "download"
    PARSE = "parse"
    BUILD = "build"
    SERIALIZE = "serialize"
    UPLOAD = "upload"


def stage_unit(stage: Stage) -> str:
    """What a stage's progress counts: vectors for parse and build, bytes otherwise."""
    return "vectors" if stage in (Stage.PARSE, Stage.BUILD) else "bytes"


@dataclass
class StageTiming:
    stage: str
    seconds: float
    nbytes: int
    peak_rss_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class Tracker:
    """Receives stage changes and progress; the service and the CLI subclass it.

    ``advance`` is called from worker threads (transfers) and may raise
    ``CancelledError`` to stop the job at the next batch or part boundary.
    """

    def stage(self, stage: Stage, total: int) -> None:
        """``stage`` starts; ``total`` units (bytes or vectors) are expected.

        The total of the serialized index is an estimate (its size is known only
        once written); ``stage_finished`` follows with the real byte count.
        """

    def advance(self, amount: int) -> None:
        """``amount`` more units of the current stage are done."""

    def stage_finished(self, stage: Stage, timing: StageTiming) -> None:
        """``stage`` completed (not called when it raised)."""

    def commit_check(self) -> None:
        """Called right before any request that makes the index visible in S3; may raise
        to stop the upload; default no-op.

        Every path calls it: the CompleteMultipartUpload of the streamed, the
        overlapped and the disk-mode upload, and the single PutObject of a small
        index. If it raises, the upload is aborted and nothing is visible.
        """


@dataclass(frozen=True)
class StageProgress:
    """Where a stage stands, for progress displays; ``total`` may be an estimate."""

    stage: Stage
    done: int
    total: int
    elapsed_s: float

    @property
    def unit(self) -> str:
        return stage_unit(self.stage)

    @property
    def percent(self) -> float | None:
        """Capped at 100: an estimated total may be passed before the stage ends."""
        if self.total <= 0:
            return None
        return min(100.0, 100.0 * self.done / self.total)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the stage's average rate so far; None before the first unit."""
        if self.total <= 0 or self.done <= 0 or self.elapsed_s <= 0:
            return None
        return max(0, self.total - self.done) * self.elapsed_s / self.done


def serialized_bytes_estimate(request: BuildRequest) -> int:
    """About the size of the index file: the total of the serialize/upload progress."""
    return memory.serialized_bytes(request)


class _ReportingSink:
    """A sink that reports each write's size: serialization progress (and a cancel point)."""

    def __init__(self, sink: index_io.Sink, progress: Callable[[int], None]) -> None:
        self.sink = sink
        self.progress = progress

    def write(self, data: bytes) -> int:
        written = self.sink.write(data)
        self.progress(len(data))
        return written


@dataclass
class BuildResult:
    index_key: str
    file_name: str
    index_bytes: int
    builder: str
    stages: list[StageTiming] = field(default_factory=list)
    # Recall of the finished index on a sample of its own vectors (``core.quality``).
    quality: QualityReport | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


@dataclass
class _StoredRows(Dataset):
    """The dataset, telling an overlapped upload which rows the index holds for good.

    The builder calls ``release`` for rows its index has copied (``Dataset.release``).
    """

    on_stored: Callable[[int, int], None] = field(default=lambda start, stop: None)

    @classmethod
    def watching(cls, data: Dataset, on_stored: Callable[[int, int], None]) -> _StoredRows:
        values = {f.name: getattr(data, f.name) for f in fields(data) if f.init}
        return cls(**values, on_stored=on_stored)

    def release(self, start: int, stop: int) -> None:
        super().release(start, stop)
        self.on_stored(start, stop)


def _start_overlap(
    request: BuildRequest,
    store: ObjectStore,
    prepared: PreparedIndex | None,
    data: Dataset,
    sse: str | None,
) -> OverlappedWrite | None:
    if request.skip_stored_vectors or prepared is None or prepared.inner is None:
        return None
    if not isinstance(store, NumberedUploads):
        return None
    return OverlappedWrite.start(
        store,
        request.container_name,
        request.index_key,
        inner=prepared.inner,
        ids=ids_as_int64(data.doc_ids),
        sse_kms_key_id=sse,
    )


def _abort_earlier_uploads(store: ObjectStore, bucket: str, key: str) -> None:
    """Abort what an earlier attempt killed mid-upload left under the index key.

    Every attempt starts with it, before its own upload opens, so it works the
    same in one process and in a fleet (where another replica may have run the
    attempt before); and ends with it once its index is in place: a stale attempt
    (a paused replica resumed, fenced at its commit check) may have opened one
    since, and be killed before it aborts it. A clean-up: a failure is logged, the
    build goes on, and the bucket's lifecycle rule (README) is the backstop.
    """
    try:
        aborted = store.abort_incomplete_uploads(bucket, key)
    except ObjectStoreError as exc:
        log.warning("%s; incomplete uploads of an earlier attempt may remain", exc)
        return
    if aborted:
        log.info("aborted %d incomplete multipart upload(s) of an earlier attempt", aborted)


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory.

    Linux's ``VmHWM`` starts afresh at exec; ``ru_maxrss`` does not (a child
    started by a large parent reports the parent's peak), so it is only the
    fallback where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Timer:
    def __init__(self, result: BuildResult, tracker: Tracker) -> None:
        self.result = result
        self.tracker = tracker

    def measure(self, stage: Stage, total: int, label: str | None = None) -> _Span:
        self.tracker.stage(stage, total)
        log.info("stage %s started (%d %s)", stage.value, total, stage_unit(stage))
        return _Span(self, stage, label or stage.value)


class _Span:
    def __init__(self, timer: _Timer, stage: Stage, label: str) -> None:
        self.timer = timer
        self.stage = stage
        self.label = label
        self.nbytes = 0

    def __enter__(self) -> _Span:
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            return
        timing = StageTiming(
            self.label, time.perf_counter() - self.start, self.nbytes, peak_rss_bytes()
        )
        self.timer.result.stages.append(timing)
        log.info(
            "stage %s done in %.3fs (%d bytes)",
            timing.stage,
            timing.seconds,
            timing.nbytes,
            extra={"duration_s": round(timing.seconds, 6)},
        )
        self.timer.tracker.stage_finished(self.stage, timing)


def check_quality(
    request: BuildRequest,
    index: object,
    sample: quality.QuerySample,
    builder: IndexBuilder,
    prepared: PreparedIndex | None,
    checkpoint: quality.Checkpoint | None = None,
) -> QualityReport | None:
    """The quality report, while the index still holds its vectors (before the upload).

    The builder says in ``prepared.notes`` how it built (mode, device, path);
    a builder that prepared nothing is reported under its name. The check is a
    measurement, not part of the index: if it fails (a bug), the job still
    delivers the index; ``checkpoint`` (cancel, time limit) stops it.
    """
    if prepared is not None:
        notes = prepared.notes
    else:
        notes = quality.BuildNotes(
            requested_mode=builder.name, mode=builder.name, device=builder.name
        )
    try:
        return quality.check(request, index, sample, notes, checkpoint=checkpoint)
    except (RuntimeError, ValueError, AttributeError):
        log.exception("index quality check failed; the index is uploaded without a report")
        return None


def run(
    request: BuildRequest,
    store: ObjectStore,
    builder: IndexBuilder,
    *,
    mode: SerializationMode = SerializationMode.MEMORY,
    tmp_dir: str | Path | None = None,
    tracker: Tracker | None = None,
    overlap_upload: bool = True,
) -> BuildResult:
    """Build the index for ``request`` and upload it beside the vectors.

    ``overlap_upload`` (memory mode): send the index's storage section while
    the graph is built (``overlapped_upload.OverlappedWrite``), where the builder
    prepared a CPU HNSW index and the store takes numbered parts.
    """
    tracker = tracker or Tracker()
    bucket = request.container_name
    result = BuildResult(
        index_key=request.index_key,
        file_name=request.index_file_name,
        index_bytes=0,
        builder=builder.name,
    )
    timer = _Timer(result, tracker)
    advance: Callable[[int], None] = tracker.advance

    total_in = request.vector_blob_bytes + request.doc_id_blob_bytes
    with timer.measure(Stage.DOWNLOAD, total_in) as span:
        _abort_earlier_uploads(store, bucket, request.index_key)
        # Sizes are checked before any byte is fetched; the source object's
        # encryption key is reused for the index.
        vector_info = store.head(bucket, request.vector_path)
        doc_id_info = store.head(bucket, request.doc_id_path)
        dataset_stage.check_sizes(request, vector_info.size, doc_id_info.size)
        # Before the blobs arrive: the builder's set-up peak must not stack on them.
        prepared = builder.prepare(request)
        # One of the sizes check_sizes allows (half_float: fp32 or fp16 rows).
        vector_blob = store.download(
            bucket, request.vector_path, expected_size=vector_info.size, progress=advance
        )
        doc_id_blob = store.download(
            bucket, request.doc_id_path, expected_size=request.doc_id_blob_bytes, progress=advance
        )
        span.nbytes = vector_blob.nbytes + doc_id_blob.nbytes

    with timer.measure(Stage.PARSE, request.doc_count) as span:
        data = dataset_stage.parse(request, vector_blob, doc_id_blob)
        dataset_stage.check_values(data)
        span.nbytes = vector_blob.nbytes
        tracker.advance(request.doc_count)
    # ``data`` now holds the only references to the blobs.
    del vector_blob, doc_id_blob

    # Copied now: the build hands the blob's pages back batch by batch.
    sample = quality.QuerySample.take(data.vectors)
    sse_key = vector_info.sse_kms_key_id
    with contextlib.ExitStack() as stack:
        # Memory mode: the index's storage section goes up while the graph is built.
        overlap = None
        if overlap_upload and mode is SerializationMode.MEMORY:
            overlap = _start_overlap(request, store, prepared, data, sse_key)
        if overlap is not None:
            stack.enter_context(overlap)  # its parts are aborted on failure or cancel
            data = _StoredRows.watching(data, overlap.stored)

        with timer.measure(Stage.BUILD, request.doc_count) as span:
            span.nbytes = data.vectors.nbytes
            index = builder.build(request, data, progress=advance, prepared=prepared)
        result.quality = check_quality(
            request, index, sample, builder, prepared, lambda: tracker.advance(0)
        )
        if prepared is not None:
            result.builder = prepared.notes.device  # a GPU build that fell back ran on the CPU
        # The index owns a copy of the vectors: release the downloaded buffer now,
        # before serialization needs memory of its own.
        del data, prepared  # the index holds the prepared inner index now

        index_size = serialized_bytes_estimate(request)
        if mode is SerializationMode.MEMORY:
            with timer.measure(Stage.UPLOAD, index_size, "serialize+upload") as span:
                written = None
                if overlap is not None:
                    written = overlap.finish(index, advance, tracker.commit_check)
                if written is None:
                    upload = store.open_upload(
                        bucket,
                        request.index_key,
                        sse_kms_key_id=sse_key,
                        progress=advance,
                        size_hint=index_size,
                        commit_check=tracker.commit_check,
                    )
                    with upload:
                        written = index_io.write(
                            index, upload, skip_storage=request.skip_stored_vectors
                        )
                span.nbytes = written
            del index
        else:
            with index_io.temporary_index_file(tmp_dir) as path:
                with timer.measure(Stage.SERIALIZE, index_size) as span, path.open("wb") as file:
                    sink = _ReportingSink(file, advance)
                    skip = request.skip_stored_vectors
                    span.nbytes = index_io.write(index, sink, skip_storage=skip)
                del index
                with timer.measure(Stage.UPLOAD, span.nbytes) as span:
                    span.nbytes = store.upload_file(
                        bucket,
                        request.index_key,
                        path,
                        sse_kms_key_id=sse_key,
                        progress=advance,
                        commit_check=tracker.commit_check,
                    )
    result.index_bytes = span.nbytes
    _abort_earlier_uploads(store, bucket, request.index_key)
    return result
