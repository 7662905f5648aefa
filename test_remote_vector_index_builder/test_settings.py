from __future__ import annotations

import fnmatch
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices, ValidationError

from remote_vector_index_builder.app.logs import HourlyFileHandler, configure_logging, job_context
from remote_vector_index_builder.app.settings import (
    Settings,
    describe_errors,
    parse_levels,
    usable_cpus,
)
from remote_vector_index_builder.core.options import Device, SerializationMode
from test_remote_vector_index_builder.support import readme_variables, root_logging


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


def one_line_error(**kw: Any) -> str:
    """What start-up prints for a configuration mistake (cli: ``describe_errors``)."""
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, **kw)
    line = describe_errors(caught.value)
    assert "\n" not in line and "Value error" not in line
    return line


def test_part_size_outside_s3_limits_is_refused_when_settings_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RVIB_S3_PART_SIZE", str(1024**2))
    assert "RVIB_S3_PART_SIZE must be between 5 MiB" in one_line_error()


def test_heartbeat_must_be_below_the_lease_in_fleet_mode() -> None:
    line = one_line_error(redis_url="redis://127.0.0.1:1/0", lease_seconds=5, heartbeat_seconds=5)
    assert "RVIB_HEARTBEAT_SECONDS (5.0) must be well below RVIB_LEASE_SECONDS (5.0)" in line
    # One process has no leases: nothing to check.
    assert Settings(_env_file=None, lease_seconds=5, heartbeat_seconds=5).redis_url is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3221225472", 3 * 1024**3),
        ("3GiB", 3 * 1024**3),
        ("3 gib", 3 * 1024**3),
        ("3Gi", 3 * 1024**3),  # a Kubernetes quantity
        ("3GB", 3 * 10**9),
        ("512MiB", 512 * 1024**2),
    ],
)
def test_memory_limits_take_bytes_or_units(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: int
) -> None:
    monkeypatch.setenv("CPU_MEMORY_LIMIT", value)
    monkeypatch.setenv("GPU_MEMORY_LIMIT", value)
    settings = Settings(_env_file=None)
    assert settings.effective_cpu_memory_limit() == expected
    assert settings.gpu_memory_limit == expected


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        # The reference service's GB float must not mean 32 bytes.
        ("32.0", ("CPU_MEMORY_LIMIT=32.0 has no unit", "write 32GB", "reference service read GB")),
        ("32", ("CPU_MEMORY_LIMIT=32 is 32 bytes", "256 MiB", "in bytes unless it has a unit")),
        ("100MiB", ("is 104857600 bytes, below the 256 MiB",)),
        ("lots", ("CPU_MEMORY_LIMIT=lots is not a size",)),
    ],
)
def test_memory_limit_mistakes_are_refused_naming_the_unit(
    monkeypatch: pytest.MonkeyPatch, value: str, fragments: tuple[str, ...]
) -> None:
    monkeypatch.setenv("CPU_MEMORY_LIMIT", value)
    line = one_line_error()
    for fragment in fragments:
        assert fragment in line


def test_log_levels_are_checked_when_settings_are_read() -> None:
    assert one_line_error(log_level="verbose") == (
        "unknown log level 'verbose' in LOG_LEVEL; use debug, info, warning, error or critical"
    )
    assert "in RVIB_DEBUG_LOGS" in one_line_error(debug_logs="info,botocore=chatty")
    assert Settings(_env_file=None, log_level="debug").log_level == "DEBUG"


def test_auth_file_format(tmp_path: Path) -> None:
    secret = tmp_path / "auth"
    secret.write_text("rvib:pa:ss wörd\n")  # the first ':' splits; UTF-8 as written
    assert Settings(_env_file=None, auth_file=secret).basic_credentials() == (
        b"rvib",
        "pa:ss wörd".encode(),
    )
    for bad in ("just-a-password\n", "rvib:\n", ":secret\n", "a:b\nc:d\n"):
        secret.write_text(bad)
        assert "must hold one line 'username:password'" in one_line_error(auth_file=secret)
    assert "cannot be read" in one_line_error(auth_file=tmp_path / "missing")
    assert "set both RVIB_AUTH_USERNAME and RVIB_AUTH_PASSWORD" in one_line_error(
        auth_username="rvib"
    )


def test_the_start_up_summary_masks_secrets() -> None:
    settings = Settings(
        _env_file=None,
        auth_username="rvib",
        auth_password="hunter2",
        redis_url="rediss://user:topsecret@redis.internal:6380/0",
        allowed_buckets="b,a",
        s3_endpoint_url="http://127.0.0.1:9000",
    )
    line = settings.summary(device="cpu", workers=2)
    assert "\n" not in line
    assert "hunter2" not in line and "topsecret" not in line
    assert "redis=rediss://***@redis.internal:6380/0" in line
    assert "auth=basic (user 'rvib')" in line and "allowed_buckets=a,b" in line
    assert line.startswith("device=cpu workers=2 s3_endpoint=http://127.0.0.1:9000")


# What --help and the settings must not load (cli.py, core/options.py): Faiss and boto3 take
# seconds to import, and the command line mirrors no enum by hand any more.
IMPORTS = """
import sys
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder import cli
Settings(_env_file=None)
print(sorted(m for m in ("faiss", "boto3", "botocore", "redis") if m in sys.modules))
"""


def test_settings_and_the_command_line_load_neither_faiss_nor_boto3(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_debug_log_filter_sets_per_logger_levels() -> None:
    assert parse_levels("debug,botocore=warning, urllib3 = error") == {
        "": logging.DEBUG,
        "botocore": logging.WARNING,
        "urllib3": logging.ERROR,
    }
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        parse_levels("loud")


def test_logs_go_to_an_hourly_file_with_the_job_id(tmp_path: Path) -> None:
    with root_logging() as root:
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
        assert len(files) == 1
        assert re.fullmatch(
            r"remote-vector-index-builder\.log\.\d{4}-\d\d-\d\d-\d\d", files[0].name
        )
        text = files[0].read_text()
        assert "stage done" in text and "[job job-42]" in text
        assert any(isinstance(h, HourlyFileHandler) for h in root.handlers)


# --- exactly the README's variables configure the service ------------------------------


def setting_variables() -> dict[str, str]:
    """Environment variable -> the setting it configures."""
    names: dict[str, str] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            assert isinstance(choice, str), f"{field_name}: give its variable with env(...)"
            names[choice] = field_name
    return names


def test_every_readme_variable_is_a_setting_and_every_setting_is_in_the_readme() -> None:
    documented = readme_variables()
    patterns = {name for name in documented if name.endswith("*")}  # AWS_*: boto3's chain
    assert patterns == {"AWS_*"}
    read = setting_variables()
    assert sorted(documented - patterns - set(read)) == [], "README rows no setting reads"
    undocumented = [
        name
        for name in read
        if name not in documented and not any(fnmatch.fnmatch(name, p) for p in patterns)
    ]
    assert undocumented == [], "settings missing from the README's table"
    assert {"RVIB_LISTEN_HOST", "RVIB_LISTEN_PORT"} <= set(read)


def test_no_setting_uses_a_name_kubernetes_injects_for_a_service_named_rvib() -> None:
    # For a Service "rvib" Kubernetes sets RVIB_SERVICE_HOST, RVIB_SERVICE_PORT[_<port name>],
    # RVIB_PORT and RVIB_PORT_<port>_TCP[_PROTO|_PORT|_ADDR] in every pod of the namespace.
    clashes = [n for n in setting_variables() if re.match(r"RVIB_(SERVICE_|PORT($|_))", n)]
    assert clashes == []


def test_only_the_documented_names_are_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    defaults = Settings(_env_file=None)
    kubernetes = {
        "RVIB_PORT": "tcp://10.0.0.1:1025",
        "RVIB_SERVICE_HOST": "10.0.0.1",
        "RVIB_SERVICE_PORT": "1025",
        "RVIB_PORT_1025_TCP": "tcp://10.0.0.1:1025",
        "RVIB_PORT_1025_TCP_PROTO": "tcp",
        "RVIB_PORT_1025_TCP_PORT": "1025",
        "RVIB_PORT_1025_TCP_ADDR": "10.0.0.1",
        # The names the service had before RVIB_LISTEN_*:
        "RVIB_HOST": "1.2.3.4",
    }
    for name, value in kubernetes.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOST", "1.2.3.4")
    monkeypatch.setenv("DEVICE", "gpu")
    # Every field's own name, in both cases, with a value no field accepts unchanged
    # (unless that name is also the documented one, as for MAX_WORKERS).
    documented = setting_variables()
    for field_name in Settings.model_fields:
        for name in (field_name.upper(), field_name):
            if name not in documented and name not in ("HOST", "DEVICE"):
                monkeypatch.setenv(name, "not-a-setting-value")
    assert os.environ["PORT"] == "not-a-setting-value"
    assert Settings(_env_file=None).model_dump() == defaults.model_dump()
    dotenv = tmp_path / ".env"
    dotenv.write_text("HOST=1.2.3.4\nport=9\nTMP_DIR=/nowhere\nAUTH_PASSWORD=secret\n")
    assert Settings(_env_file=dotenv).model_dump() == defaults.model_dump()


def test_listen_address_from_its_documented_names_and_init_by_field_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RVIB_PORT", "tcp://10.0.0.1:1025")  # Kubernetes: must not matter
    monkeypatch.setenv("RVIB_LISTEN_HOST", "127.0.0.1")
    monkeypatch.setenv("RVIB_LISTEN_PORT", "8080")
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert Settings(_env_file=None, port=9000, host="::1").port == 9000
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # the second name of s3_region
    assert Settings(_env_file=None).s3_region == "eu-west-1"
    assert Settings(_env_file=None, s3_region="us-east-2").s3_region == "us-east-2"
    monkeypatch.delenv("RVIB_LISTEN_PORT")
    dotenv = tmp_path / ".env"
    dotenv.write_text("RVIB_LISTEN_PORT=8081\nRVIB_TMP_DIR=/var/tmp\n")
    from_file = Settings(_env_file=dotenv)
    assert from_file.port == 8081 and from_file.tmp_dir == Path("/var/tmp")


# --- OpenMP threads from the CPUs this process may use ---------------------------------


def test_threads_follow_the_cgroup_cpu_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: round up, OpenMP wants whole threads
    assert usable_cpus(cpu_max) == min(affinity, 2)
    cpu_max.write_text("10000 100000\n")  # a tenth of a CPU still gets one thread
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000} 100000\n")  # quota above affinity
    assert usable_cpus(cpu_max) == affinity
    assert usable_cpus(tmp_path / "missing") == affinity
    assert Settings(_env_file=None, omp_threads=3).effective_omp_threads() == 3
