"""Logs: JSON and text lines of a real job through the app; the hourly log files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.logs import (
    ContextFilter,
    HourlyFileHandler,
    JsonFormatter,
    TextFormatter,
)
from test_remote_vector_index_builder.support import (
    Clock,
    fast_body,
    root_logging,
    upload,
    wait_terminal,
)
from testbed.data import clustered

PACKAGE = "remote_vector_index_builder"


class Lines(logging.Handler):
    """The lines a handler set up by ``configure_logging`` would write, kept in a list."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(formatter)
        self.addFilter(ContextFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def capture() -> Iterator[Callable[[logging.Formatter], Lines]]:
    """Attach handlers to the package logger at INFO for one test."""
    logger = logging.getLogger(PACKAGE)
    saved = logger.level
    handlers: list[Lines] = []

    def attach(formatter: logging.Formatter) -> Lines:
        handler = Lines(formatter)
        logger.addHandler(handler)
        handlers.append(handler)
        return handler

    logger.setLevel(logging.INFO)
    try:
        yield attach
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(saved)


def run_job(service: Callable[..., TestClient], s3_client: Any, bucket: str, stem: str) -> str:
    client = service()
    upload(s3_client, bucket, stem, clustered(1000, 16))
    job_id: str = client.post("/_build", json=fast_body(bucket, stem, 16, 1000)).json()["job_id"]
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    return job_id


def test_json_lines_parse_and_carry_job_id_stage_and_duration(
    service: Callable[..., TestClient],
    s3_client: Any,
    bucket: str,
    capture: Callable[[logging.Formatter], Lines],
) -> None:
    lines = capture(JsonFormatter())
    job_id = run_job(service, s3_client, bucket, "idx/logs")
    entries = [json.loads(line) for line in lines.lines]
    ours = [e for e in entries if e["job_id"] == job_id]
    assert ours, entries
    for entry in ours:
        assert {"timestamp", "level", "logger", "message", "job_id", "stage"} <= set(entry)
        assert datetime.fromisoformat(entry["timestamp"]).tzinfo is not None
        assert entry["logger"].startswith(PACKAGE) and entry["level"] in ("info", "warning")
    done = {e["stage"]: e for e in ours if e["message"].startswith("stage ") and "duration_s" in e}
    assert set(done) == {"download", "parse", "build", "upload"}
    assert all(isinstance(e["duration_s"], float) and e["duration_s"] >= 0 for e in done.values())
    completed = next(e for e in ours if e["message"].startswith(f"job {job_id} completed"))
    assert completed["duration_s"] > 0 and completed["logger"] == f"{PACKAGE}.app.runner"
    # Records of the service outside any job carry no id.
    assert any(e["job_id"] is None for e in entries)


def test_text_lines_name_the_job(
    service: Callable[..., TestClient],
    s3_client: Any,
    bucket: str,
    capture: Callable[[logging.Formatter], Lines],
) -> None:
    lines = capture(TextFormatter("%(levelname)s %(name)s: %(message)s"))
    job_id = run_job(service, s3_client, bucket, "idx/text")
    build_done = [line for line in lines.lines if "stage build done" in line]
    assert build_done and all(line.endswith(f"[job {job_id}]") for line in build_done)


# --- hourly files (RVIB_LOGS_DIR_PATH) --------------------------------------------------

STEM = "remote-vector-index-builder.log"
# 2026-12-01 15:59:59 UTC: the next second is in the next hour.
BEFORE_HOUR = datetime(2026, 12, 1, 15, 59, 59, tzinfo=UTC).timestamp()


def write(handler: logging.Handler, message: str) -> None:
    handler.handle(logging.makeLogRecord({"msg": message, "levelno": logging.INFO}))
    handler.flush()


def test_each_hour_has_its_own_file_named_with_the_hour(tmp_path: Path) -> None:
    clock = Clock(BEFORE_HOUR)
    handler = HourlyFileHandler(tmp_path, clock=clock)
    try:
        write(handler, "last line of 15h")
        clock.now += 1
        write(handler, "first line of 16h")
        assert handler.path.name == f"{STEM}.2026-12-01-16"
    finally:
        handler.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{STEM}.2026-12-01-15",
        f"{STEM}.2026-12-01-16",
    ]
    assert (tmp_path / f"{STEM}.2026-12-01-15").read_text() == "last line of 15h\n"
    assert (tmp_path / f"{STEM}.2026-12-01-16").read_text() == "first line of 16h\n"


def test_a_restart_appends_to_the_file_of_the_hour(tmp_path: Path) -> None:
    for message in ("before the restart", "after the restart"):
        handler = HourlyFileHandler(tmp_path, clock=Clock(BEFORE_HOUR))
        write(handler, message)
        handler.close()
    assert [p.name for p in tmp_path.iterdir()] == [f"{STEM}.2026-12-01-15"]
    assert handler.path.read_text() == "before the restart\nafter the restart\n"


# A second process writing to the same directory, until its stdin closes.
OTHER_REPLICA = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from remote_vector_index_builder.app.logs import HourlyFileHandler
    handler = HourlyFileHandler(Path(sys.argv[1]), clock=lambda: float(sys.argv[2]))
    handler.handle(logging.makeLogRecord({"msg": "from the other replica"}))
    handler.flush()
    print(handler.path.name, flush=True)
    sys.stdin.read()
    handler.handle(logging.makeLogRecord({"msg": "other replica stops"}))
    handler.close()
    """)


def test_two_processes_sharing_the_directory_never_write_one_file(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", OTHER_REPLICA, str(tmp_path), str(BEFORE_HOUR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as other:
        try:
            assert other.stdout is not None and other.stdin is not None
            assert other.stdout.readline().strip() == f"{STEM}.2026-12-01-15"
            ours = HourlyFileHandler(tmp_path, clock=Clock(BEFORE_HOUR))
            write(ours, "from this replica")
            assert ours.path.name == f"{STEM}.2026-12-01-15.1"
            other.stdin.close()
            assert other.wait(timeout=60) == 0
            write(ours, "this replica again")
            ours.close()
        finally:
            if other.poll() is None:
                other.kill()
    assert (tmp_path / f"{STEM}.2026-12-01-15").read_text() == (
        "from the other replica\nother replica stops\n"
    )
    assert ours.path.read_text() == "from this replica\nthis replica again\n"
    # The other replica is gone: its file is free again for whoever starts next.
    restarted = HourlyFileHandler(tmp_path, clock=Clock(BEFORE_HOUR))
    restarted.close()
    assert restarted.path.name == f"{STEM}.2026-12-01-15"


def test_answered_polls_log_their_access_lines_at_debug(tmp_path: Path) -> None:
    from remote_vector_index_builder.app.logs import configure_logging
    from remote_vector_index_builder.app.settings import Settings

    access = logging.getLogger("uvicorn.access")
    # A uvicorn started with its own logging config (test_load's) unhooks both loggers
    # from the root; the service runs uvicorn with log_config=None, which leaves them be.
    unhooked = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.access")]
    saved_uvicorn = [(lg.level, lg.propagate, list(lg.handlers)) for lg in unhooked]
    for lg in unhooked:
        lg.setLevel(logging.NOTSET)
        lg.propagate = True
        lg.handlers = []
    try:
        with root_logging() as root:
            for debug_logs in (None, "info,uvicorn.access=debug"):
                configure_logging(
                    Settings(_env_file=None, logs_dir_path=tmp_path, debug_logs=debug_logs)
                )
                lines = Lines(TextFormatter("%(levelname)s %(message)s"))
                lines.setLevel(logging.DEBUG)
                root.addHandler(lines)
                # As uvicorn's access logger writes them.
                for path, status in (
                    ("/_status/0123abcd", 200),
                    ("/_heart_beat", 200),
                    ("/_ready", 503),
                    ("/_status/unknown", 404),
                    ("/_build", 200),
                ):
                    access.info(
                        '%s - "%s %s HTTP/%s" %d', "10.0.0.7:5500", "GET", path, "1.1", status
                    )
                root.removeHandler(lines)
                if debug_logs is None:
                    assert [line.split('"')[1] for line in lines.lines] == [
                        "GET /_ready HTTP/1.1",
                        "GET /_status/unknown HTTP/1.1",
                        "GET /_build HTTP/1.1",
                    ]
                else:
                    first = 'DEBUG 10.0.0.7:5500 - "GET /_status/0123abcd HTTP/1.1" 200'
                    assert lines.lines[0] == first
                    assert len(lines.lines) == 5
    finally:
        for lg, (level, propagate, handlers) in zip(unhooked, saved_uvicorn, strict=True):
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers = handlers
