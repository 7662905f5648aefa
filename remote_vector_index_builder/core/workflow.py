"""One build, start to end: download -> parse -> build -> serialize -> upload.

``run`` is the library entry point; the CLI and the service both call it.
Memory: the vector blob is downloaded into one buffer, viewed without a copy,
and released as soon as the index holds its own copy of the vectors. In
``memory`` mode the serialized index is streamed into a multipart upload, so
it never exists whole a second time; in ``disk`` mode it goes to a private
temporary file and the index is freed before the upload starts.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from remote_vector_index_builder.core import dataset as dataset_stage
from remote_vector_index_builder.core import index_io
from remote_vector_index_builder.core.builder import IndexBuilder
from remote_vector_index_builder.core.index_io import SerializationMode
from remote_vector_index_builder.core.object_store import ObjectStore
from remote_vector_index_builder.core.params import BuildRequest

log = logging.getLogger(__name__)


class Stage(StrEnum):
    DOWNLOAD = "download"
    PARSE = "parse"
    BUILD = "build"
    SERIALIZE = "serialize"
    UPLOAD = "upload"


class Tracker:
    """Receives stage changes and progress; the service subclasses it.

    ``advance`` is called from worker threads (transfers) and may raise
    ``CancelledError`` to stop the job at the next batch or part boundary.
    """

    def stage(self, stage: Stage, total: int) -> None:
        """``stage`` starts; ``total`` units (bytes or vectors) are expected."""

    def advance(self, amount: int) -> None:
        """``amount`` more units of the current stage are done."""


@dataclass
class StageTiming:
    stage: str
    seconds: float
    nbytes: int
    peak_rss_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BuildResult:
    index_key: str
    file_name: str
    index_bytes: int
    builder: str
    stages: list[StageTiming] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


def peak_rss_bytes() -> int:
    """Process-wide high-water mark of resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Timer:
    def __init__(self, result: BuildResult, tracker: Tracker) -> None:
        self.result = result
        self.tracker = tracker

    def measure(self, stage: Stage, total: int, label: str | None = None) -> _Span:
        self.tracker.stage(stage, total)
        log.info("stage %s started (%d units)", stage.value, total)
        return _Span(self, label or stage.value)


class _Span:
    def __init__(self, timer: _Timer, label: str) -> None:
        self.timer = timer
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
        log.info("stage %s done in %.3fs (%d bytes)", timing.stage, timing.seconds, timing.nbytes)


def run(
    request: BuildRequest,
    store: ObjectStore,
    builder: IndexBuilder,
    *,
    mode: SerializationMode = SerializationMode.MEMORY,
    tmp_dir: str | Path | None = None,
    tracker: Tracker | None = None,
    check_values: bool = True,
) -> BuildResult:
    """Build the index for ``request`` and upload it beside the vectors."""
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
        # Sizes are checked before any byte is fetched; the source object's
        # encryption key is reused for the index.
        vector_info = store.head(bucket, request.vector_path)
        doc_id_info = store.head(bucket, request.doc_id_path)
        dataset_stage.check_sizes(request, vector_info.size, doc_id_info.size)
        vector_blob = store.download(
            bucket, request.vector_path, expected_size=request.vector_blob_bytes, progress=advance
        )
        doc_id_blob = store.download(
            bucket, request.doc_id_path, expected_size=request.doc_id_blob_bytes, progress=advance
        )
        span.nbytes = vector_blob.nbytes + doc_id_blob.nbytes

    with timer.measure(Stage.PARSE, request.doc_count) as span:
        data = dataset_stage.parse(request, vector_blob, doc_id_blob)
        if check_values:
            dataset_stage.check_values(data)
        span.nbytes = vector_blob.nbytes
        tracker.advance(request.doc_count)
    # ``data`` now holds the only references to the blobs.
    del vector_blob, doc_id_blob

    with timer.measure(Stage.BUILD, request.doc_count) as span:
        span.nbytes = data.vectors.nbytes
        index = builder.build(request, data, progress=advance)
    # The index owns a copy of the vectors: release the downloaded buffer now,
    # before serialization needs memory of its own.
    del data

    sse_key = vector_info.sse_kms_key_id
    if mode is SerializationMode.MEMORY:
        with timer.measure(Stage.UPLOAD, 0, "serialize+upload") as span:
            upload = store.open_upload(
                bucket, request.index_key, sse_kms_key_id=sse_key, progress=advance
            )
            with upload:
                span.nbytes = index_io.write(
                    index, upload, skip_storage=request.skip_stored_vectors
                )
        del index
    else:
        with index_io.temporary_index_file(tmp_dir) as path:
            with timer.measure(Stage.SERIALIZE, 0) as span, path.open("wb") as file:
                span.nbytes = index_io.write(index, file, skip_storage=request.skip_stored_vectors)
            del index
            with timer.measure(Stage.UPLOAD, span.nbytes) as span:
                span.nbytes = store.upload_file(
                    bucket, request.index_key, path, sse_kms_key_id=sse_key, progress=advance
                )
    result.index_bytes = span.nbytes
    return result
