"""Logs of a real job run through the app: JSON lines carry job id, stage and durations."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.logs import ContextFilter, JsonFormatter, TextFormatter
from test_remote_vector_index_builder.data import clustered
from test_remote_vector_index_builder.test_app import upload, wait_terminal
from test_remote_vector_index_builder.test_progress import fast_body

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
