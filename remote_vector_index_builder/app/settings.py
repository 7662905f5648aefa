"""All configuration, read once from the environment (and ``.env``), passed down.

This is the only module that reads the environment. Names follow the reference
service where it had one (``MAX_WORKERS``, ``S3_ENDPOINT_URL``, ...); settings
of our own start with ``RVIB_``. AWS credentials and region are read by boto3's
standard chain, not here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import psutil
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from remote_vector_index_builder.core.builder import BuilderOptions, CpuBuildMode, Device
from remote_vector_index_builder.core.index_io import SerializationMode
from remote_vector_index_builder.core.object_store import MIB, S3Config


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, frozen=True
    )

    # Service
    host: str = Field("0.0.0.0", validation_alias=_env("RVIB_HOST", "host"))
    port: int = Field(1025, validation_alias=_env("RVIB_PORT", "port"))
    max_workers: int | None = Field(None, gt=0, validation_alias=_env("MAX_WORKERS", "max_workers"))
    request_store_max_size: int = Field(
        10000, gt=0, validation_alias=_env("REQUEST_STORE_MAX_SIZE", "request_store_max_size")
    )
    request_store_ttl_seconds: float = Field(
        7200,
        gt=0,
        validation_alias=_env("REQUEST_STORE_TTL_SECONDS", "request_store_ttl_seconds"),
    )
    cpu_memory_limit: int | None = Field(
        None, gt=0, validation_alias=_env("CPU_MEMORY_LIMIT", "cpu_memory_limit")
    )
    gpu_memory_limit: int | None = Field(
        None, gt=0, validation_alias=_env("GPU_MEMORY_LIMIT", "gpu_memory_limit")
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, validation_alias=_env("RVIB_SHUTDOWN_GRACE_SECONDS", "shutdown_grace_seconds")
    )
    # Builds (and their transfer and OpenMP threads) run this much nicer than the
    # event loop, so /_status answers promptly while builds hold every core
    # (benchmarks/README.md, section 5). 0 runs them at the service's priority.
    build_nice: int = Field(10, ge=0, le=19, validation_alias=_env("RVIB_BUILD_NICE", "build_nice"))
    job_time_limit_seconds: float | None = Field(
        None, gt=0, validation_alias=_env("RVIB_JOB_TIME_LIMIT_SECONDS", "job_time_limit_seconds")
    )
    auth_username: str | None = Field(
        None, validation_alias=_env("RVIB_AUTH_USERNAME", "auth_username")
    )
    auth_password: SecretStr | None = Field(
        None, validation_alias=_env("RVIB_AUTH_PASSWORD", "auth_password")
    )
    auth_file: Path | None = Field(None, validation_alias=_env("RVIB_AUTH_FILE", "auth_file"))
    allowed_buckets: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(), validation_alias=_env("RVIB_ALLOWED_BUCKETS", "allowed_buckets")
    )
    metrics_require_auth: bool = Field(
        True, validation_alias=_env("RVIB_METRICS_REQUIRE_AUTH", "metrics_require_auth")
    )

    # Build
    device: Device = Field(Device.AUTO, validation_alias=_env("RVIB_DEVICE", "device"))
    omp_threads: int | None = Field(
        None, gt=0, validation_alias=_env("RVIB_OMP_THREADS", "omp_threads")
    )
    add_batch_rows: int = Field(
        32768, gt=0, validation_alias=_env("RVIB_ADD_BATCH_ROWS", "add_batch_rows")
    )
    # standard | fast | auto: how the CPU builds the graph (core/projected_graph.py;
    # the default is chosen in benchmarks/README.md, "CPU build modes").
    cpu_build: CpuBuildMode = Field(
        CpuBuildMode.STANDARD, validation_alias=_env("RVIB_CPU_BUILD", "cpu_build")
    )
    index_serialization_mode: SerializationMode = Field(
        SerializationMode.MEMORY,
        validation_alias=_env("INDEX_SERIALIZATION_MODE", "index_serialization_mode"),
    )
    tmp_dir: Path | None = Field(None, validation_alias=_env("RVIB_TMP_DIR", "tmp_dir"))

    # S3
    s3_endpoint_url: str | None = Field(
        None, validation_alias=_env("S3_ENDPOINT_URL", "s3_endpoint_url")
    )
    s3_region: str | None = Field(
        None, validation_alias=_env("AWS_REGION", "AWS_DEFAULT_REGION", "s3_region")
    )
    s3_path_style: bool = Field(False, validation_alias=_env("RVIB_S3_PATH_STYLE", "s3_path_style"))
    s3_unsigned: bool = Field(False, validation_alias=_env("RVIB_S3_UNSIGNED", "s3_unsigned"))
    s3_throughput_target_gbps: float = Field(
        10.0,
        gt=0,
        validation_alias=_env("RVIB_S3_THROUGHPUT_TARGET_GBPS", "s3_throughput_target_gbps"),
    )
    s3_part_size: int = Field(16 * MIB, validation_alias=_env("RVIB_S3_PART_SIZE", "s3_part_size"))
    s3_max_attempts: int = Field(
        5, gt=0, validation_alias=_env("RVIB_S3_MAX_ATTEMPTS", "s3_max_attempts")
    )
    s3_connect_timeout_s: float = Field(
        10.0, gt=0, validation_alias=_env("RVIB_S3_CONNECT_TIMEOUT", "s3_connect_timeout_s")
    )
    s3_read_timeout_s: float = Field(
        60.0, gt=0, validation_alias=_env("RVIB_S3_READ_TIMEOUT", "s3_read_timeout_s")
    )

    # Logs
    log_level: str = Field("INFO", validation_alias=_env("LOG_LEVEL", "log_level"))
    log_format: Literal["text", "json"] = Field(
        "text", validation_alias=_env("LOG_FORMAT", "log_format")
    )
    debug_logs: str | None = Field(None, validation_alias=_env("RVIB_DEBUG_LOGS", "debug_logs"))
    logs_dir_path: Path | None = Field(
        None, validation_alias=_env("RVIB_LOGS_DIR_PATH", "logs_dir_path")
    )

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(b.strip() for b in value.split(",") if b.strip())
        return value

    def s3_config(self) -> S3Config:
        return S3Config(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            path_style=self.s3_path_style,
            unsigned=self.s3_unsigned,
            throughput_target_gbps=self.s3_throughput_target_gbps,
            part_size=self.s3_part_size,
            max_attempts=self.s3_max_attempts,
            connect_timeout_s=self.s3_connect_timeout_s,
            read_timeout_s=self.s3_read_timeout_s,
        )

    def builder_options(self) -> BuilderOptions:
        return BuilderOptions(
            device=self.device, add_batch_rows=self.add_batch_rows, cpu_build=self.cpu_build
        )

    def effective_omp_threads(self) -> int:
        return self.omp_threads or os.cpu_count() or 1

    def effective_cpu_memory_limit(self) -> int:
        """Bytes of host memory builds may reserve (default: what the machine has)."""
        return self.cpu_memory_limit or int(psutil.virtual_memory().total)
