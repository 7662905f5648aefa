from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

import pytest

from remote_vector_index_builder.app.logs import configure_logging, job_context, parse_levels
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.builder import Device
from remote_vector_index_builder.core.index_io import SerializationMode


def test_reference_service_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "MAX_WORKERS": "3",
        "REQUEST_STORE_MAX_SIZE": "50",
        "REQUEST_STORE_TTL_SECONDS": "90",
        "CPU_MEMORY_LIMIT": "1073741824",
        "S3_ENDPOINT_URL": "http://127.0.0.1:9",
        "INDEX_SERIALIZATION_MODE": "disk",
        "RVIB_DEVICE": "cpu",
        "RVIB_ALLOWED_BUCKETS": "a-bucket, b-bucket",
        "RVIB_S3_PART_SIZE": str(16 * 1024**2),
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.max_workers == 3 and settings.request_store_max_size == 50
    assert settings.request_store_ttl_seconds == 90
    assert settings.effective_cpu_memory_limit() == 1024**3
    assert settings.index_serialization_mode is SerializationMode.DISK
    assert settings.device is Device.CPU
    assert settings.allowed_buckets == frozenset({"a-bucket", "b-bucket"})
    s3 = settings.s3_config()
    assert s3.endpoint_url == "http://127.0.0.1:9" and s3.part_size == 16 * 1024**2


def test_part_size_outside_s3_limits_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RVIB_S3_PART_SIZE", str(1024**2))
    with pytest.raises(ValueError, match="5 MiB"):
        Settings(_env_file=None).s3_config()


def test_debug_log_filter_sets_per_logger_levels() -> None:
    assert parse_levels("debug,botocore=warning, urllib3 = error") == {
        "": logging.DEBUG,
        "botocore": logging.WARNING,
        "urllib3": logging.ERROR,
    }
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        parse_levels("loud")


def test_logs_go_to_an_hourly_file_with_the_job_id(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(
            Settings(
                _env_file=None,
                logs_dir_path=tmp_path,
                debug_logs="info,remote_vector_index_builder.test=debug",
            )
        )
        assert logging.getLogger("botocore").level == logging.WARNING
        with job_context("job-42"):
            logging.getLogger("remote_vector_index_builder.test").debug("stage done")
        for handler in root.handlers:
            handler.flush()
        files = list(tmp_path.iterdir())
        assert [f.name for f in files] == ["remote-vector-index-builder.log"]
        text = files[0].read_text()
        assert "stage done" in text and "[job job-42]" in text
        rolling = [
            h for h in root.handlers if isinstance(h, logging.handlers.TimedRotatingFileHandler)
        ]
        assert rolling and rolling[0].when == "H"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
