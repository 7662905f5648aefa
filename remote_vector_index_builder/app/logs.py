"""Logging set-up: level, per-logger debug filter, hourly log files, JSON lines.

``RVIB_DEBUG_LOGS=debug,botocore=warning`` sets the root level to debug and
botocore's to warning: the first bare level applies to the root logger, each
``name=level`` to that logger. ``RVIB_LOGS_DIR_PATH`` adds hourly files, named
as the S3 connector names its own: ``remote-vector-index-builder.log.2026-12-01-15``
holds the lines of that hour (UTC). Each record carries the job id and stage of
the build that the logging thread is running (set by the runner through
``job_context``).
"""

from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from remote_vector_index_builder.app.settings import Settings, parse_level, parse_levels

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("stage", default=None)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def set_stage(stage: str | None) -> None:
    _stage.set(stage)


class ContextFilter(logging.Filter):
    """Adds the job id and stage of the build the logging thread runs; for any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _job_id.get()
        record.stage = _stage.get()
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job_id", None)
        return f"{line} [job {job}]" if job else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "stage": getattr(record, "stage", None),
        }
        duration = getattr(record, "duration_s", None)
        if duration is not None:
            entry["duration_s"] = duration
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


LOG_FILE_STEM = "remote-vector-index-builder.log"

# Polled endpoints: the client polls /_status every 5 s per build and orchestrators probe
# every few seconds, so an INFO access line each would bury everything else.
POLLED_PATHS = ("/_status/", "/_heart_beat", "/_ready")


class QuietPolls(logging.Filter):
    """Moves uvicorn's access lines of answered polls to DEBUG.

    ``RVIB_DEBUG_LOGS=uvicorn.access=debug`` shows them again; a poll answered
    with an error code stays at INFO.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client, method, path with query, HTTP version, status)
        if not (isinstance(args, tuple) and len(args) == 5):
            return True
        path, status = str(args[2]), args[4]
        if not (path.startswith(POLLED_PATHS) and isinstance(status, int) and status < 400):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class HourlyFileHandler(logging.StreamHandler[TextIO]):
    """Appends each record to the file of its hour: ``<stem>.<YYYY-MM-DD-HH>`` (UTC).

    A restart within the hour appends to that hour's file. Processes sharing the
    directory (replicas on one volume) never write the same file: each holds an
    exclusive ``flock`` on the file it writes, and one that finds a file locked
    takes the next free name of that hour (``<stem>.<hour>.1``, ``.2``, ...). The
    kernel drops the lock when its process dies, so a crash leaves no stale lock
    to clear (a lock *file* created with O_EXCL would) and the restarted process
    gets its file back; a pid or host name in the name could not be found again
    by the restarted process.
    """

    def __init__(
        self, directory: Path, stem: str = LOG_FILE_STEM, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self.stem = stem
        self.clock = clock
        directory.mkdir(parents=True, exist_ok=True)
        self.hour = self._hour(clock())
        self.path, stream = self._open(self.hour)
        super().__init__(stream)

    @staticmethod
    def _hour(timestamp: float) -> str:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d-%H")

    def _open(self, hour: str) -> tuple[Path, TextIO]:
        n = 0
        while True:
            path = self.directory / f"{self.stem}.{hour}{f'.{n}' if n else ''}"
            stream = path.open("a", encoding="utf-8")
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                stream.close()  # another process writes this one
                n += 1
                continue
            return path, stream

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock around emit: one thread rolls over.
        hour = self._hour(self.clock())
        if hour != self.hour:
            self.stream.close()
            self.hour = hour
            self.path, self.stream = self._open(hour)
        super().emit(record)

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()  # releases the flock
        finally:
            self.release()
            super().close()


def configure_logging(settings: Settings) -> None:
    levels = {
        "": parse_level("LOG_LEVEL", settings.log_level),
        # boto's INFO lines (credential discovery per client) drown the job lines.
        "botocore": logging.WARNING,
        "boto3": logging.WARNING,
    }
    if settings.debug_logs:
        levels.update(parse_levels(settings.debug_logs))
    formatter: logging.Formatter = (
        JsonFormatter()
        if settings.log_format == "json"
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if settings.logs_dir_path is not None:
        handlers.append(HourlyFileHandler(settings.logs_dir_path))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    access = logging.getLogger("uvicorn.access")
    for old_filter in [f for f in access.filters if isinstance(f, QuietPolls)]:
        access.removeFilter(old_filter)
    access.addFilter(QuietPolls())
