"""Logging set-up: level, per-logger debug filter, hourly log files, JSON lines.

``RVIB_DEBUG_LOGS=debug,botocore=warning`` sets the root level to debug and
botocore's to warning: the first bare level applies to the root logger, each
``name=level`` to that logger. ``RVIB_LOGS_DIR_PATH`` adds a file handler that
rolls every hour. Each record carries the job id and stage of the build that
the logging thread is running (set by the runner through ``job_context``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from remote_vector_index_builder.app.settings import Settings

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


def parse_levels(spec: str) -> dict[str, int]:
    """``"debug,botocore=warning"`` -> ``{"": DEBUG, "botocore": WARNING}``."""
    levels: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, level = part.rpartition("=")
        value = logging.getLevelNamesMapping().get(level.strip().upper())
        if value is None:
            raise ValueError(
                f"unknown log level {level!r} in RVIB_DEBUG_LOGS={spec!r}; "
                "use debug, info, warning, error or critical"
            )
        levels[name.strip()] = value
    return levels


def configure_logging(settings: Settings) -> None:
    levels = {
        "": logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO),
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
        settings.logs_dir_path.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.TimedRotatingFileHandler(
                settings.logs_dir_path / "remote-vector-index-builder.log",
                when="H",
                utc=True,
                encoding="utf-8",
            )
        )
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
