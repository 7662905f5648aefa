"""All configuration, read once from the environment (and ``.env``), passed down.

This is the only module that reads the environment. Exactly the variables of
the README's settings table configure the service: each field names its one
variable with ``env(...)``, and neither the field's own name (``HOST``,
``DEVICE``, ...) nor anything else in the environment is read. Code builds
settings with the field names (``Settings(port=8080)``). Names follow the
reference service where it had one (``MAX_WORKERS``, ``S3_ENDPOINT_URL``, ...);
settings of our own start with ``RVIB_`` but never ``RVIB_PORT`` or
``RVIB_SERVICE_``: Kubernetes sets those for a Service named ``rvib``
(``RVIB_PORT=tcp://10.0.0.1:1025``). AWS credentials are read by boto3's
standard chain, not here.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import psutil
from pydantic import (
    AliasChoices,
    ByteSize,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from remote_vector_index_builder.core.errors import problem_message
from remote_vector_index_builder.core.options import (
    DEFAULT_KEEP_ALIVE_SECONDS,
    MEMORY_LIMIT_FLOOR,
    MIB,
    CpuBuildMode,
    Device,
    GpuLayout,
    SerializationMode,
    check_part_size,
)

if TYPE_CHECKING:  # their modules load boto3 and Faiss; Settings must not (test_settings)
    from remote_vector_index_builder.core.builder_choice import BuilderOptions
    from remote_vector_index_builder.core.s3_calls import S3Config

# cgroup v2: "<quota> <period>" in microseconds, or "max <period>" for no limit.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


_LEVELS = "debug, info, warning, error or critical"
# A Kubernetes quantity's binary suffix ("32Gi") for pydantic's "32GiB".
_K8S_SUFFIX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i)\s*$")
_BARE_NUMBER = re.compile(r"^\s*\d*\.\d+\s*$|^\s*\d+\.\d*\s*$")
_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


def parse_level(name: str, value: str) -> int:
    """A log level by name (``debug`` ... ``critical``, any case)."""
    level = logging.getLevelNamesMapping().get(value.strip().upper())
    if level is None:
        raise ValueError(f"unknown log level {value!r} in {name}; use {_LEVELS}")
    return level


def parse_levels(spec: str) -> dict[str, int]:
    """``RVIB_DEBUG_LOGS``: ``"debug,botocore=warning"`` -> ``{"": DEBUG, "botocore": WARNING}``."""
    levels: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, level = part.rpartition("=")
        levels[name.strip()] = parse_level(f"RVIB_DEBUG_LOGS={spec!r}", level)
    return levels


def parse_memory_limit(name: str, value: object) -> int:
    """Bytes from ``3221225472``, ``3GiB``, ``3GB`` or ``3Gi``; never a silent unit mistake.

    The reference service read these variables as GB floats ("32.0"); here they are
    bytes, so a bare decimal is refused and a value below ``MEMORY_LIMIT_FLOOR`` is
    called out as the unit mistake it is.
    """
    text = str(value)
    if isinstance(value, str):
        if _BARE_NUMBER.match(value):
            gb = value.strip().rstrip("0").rstrip(".")
            raise ValueError(
                f"{name}={value} has no unit and is not a whole number of bytes; this service "
                f"reads bytes or a size with a unit: write {gb}GB or {gb}GiB (the reference "
                "service read GB)"
            )
        k8s = _K8S_SUFFIX.match(value)
        if k8s:
            text = f"{k8s[1]}{k8s[2]}B"
    try:
        size = int(_BYTE_SIZE.validate_python(text))
    except ValidationError:
        raise ValueError(
            f"{name}={value} is not a size: give bytes (3221225472) or a unit (3GiB, 3GB)"
        ) from None
    if size < MEMORY_LIMIT_FLOOR:
        raise ValueError(
            f"{name}={value} is {size} bytes, below the {MEMORY_LIMIT_FLOOR // MIB} MiB no build "
            "fits in; the value is in bytes unless it has a unit: write e.g. 32GiB"
        )
    return size


def describe_errors(exc: ValidationError) -> str:
    """A settings ``ValidationError`` as one line naming each variable and what is wrong."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        if where in Settings.model_fields:  # given by field name (code, the CLI's flags)
            where = Settings.variable(where)
        message = problem_message(error)
        problems.append(f"{where}: {message}" if where and where not in message else message)
    return "; ".join(problems)


def env(names: str | tuple[str, ...], default: Any, **constraints: Any) -> Any:
    """A setting read from the environment variable ``names`` (the first found of several).

    ``constraints`` are pydantic's (``gt=0``, ...). The name must be in the
    README's settings table (test_settings checks both ways).
    """
    alias = names if isinstance(names, str) else AliasChoices(*names)
    return Field(default, validation_alias=alias, **constraints)


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core host sees 64 in ``os.cpu_count()``;
    64 OpenMP threads there spend their time descheduled by the quota.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here (or an unreadable file): affinity alone
    return cpus


def variable_names(settings_cls: type[BaseSettings]) -> frozenset[str]:
    """The environment variables the fields name with ``env(...)``."""
    names: set[str] = set()
    for field in settings_cls.model_fields.values():
        alias = field.validation_alias
        names.update(
            str(choice)
            for choice in (alias.choices if isinstance(alias, AliasChoices) else [alias])
        )
    return frozenset(names)


class _DocumentedOnly(PydanticBaseSettingsSource):
    """What another source found, kept only where it was found under a documented name."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        source: PydanticBaseSettingsSource,
        names: frozenset[str],
    ) -> None:
        super().__init__(settings_cls)
        self.source = source
        self.names = names

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ is the whole source

    def __call__(self) -> dict[str, Any]:
        return {key: value for key, value in self.source().items() if key in self.names}


class Settings(BaseSettings):
    # populate_by_name: code passes field names; the environment sources are kept
    # from reading those (settings_customise_sources). case_sensitive: the documented
    # spelling only (pydantic-settings would take max_workers for MAX_WORKERS).
    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        case_sensitive=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # With populate_by_name pydantic-settings also reads a field's own name from
        # the environment (HOST would set host), and a .env file passes every line on.
        # Keep what those two sources found under a documented name only.
        names = variable_names(settings_cls)
        return (
            init_settings,
            _DocumentedOnly(settings_cls, env_settings, names),
            _DocumentedOnly(settings_cls, dotenv_settings, names),
            file_secret_settings,
        )

    # Service
    host: str = env("RVIB_LISTEN_HOST", "0.0.0.0")
    port: int = env("RVIB_LISTEN_PORT", 1025, ge=0, le=65535)
    max_workers: int | None = env("MAX_WORKERS", None, gt=0)
    request_store_max_size: int = env("REQUEST_STORE_MAX_SIZE", 10000, gt=0)
    request_store_ttl_seconds: float = env("REQUEST_STORE_TTL_SECONDS", 7200, gt=0)
    cpu_memory_limit: int | None = env("CPU_MEMORY_LIMIT", None)
    gpu_memory_limit: int | None = env("GPU_MEMORY_LIMIT", None)
    shutdown_grace_seconds: float = env("RVIB_SHUTDOWN_GRACE_SECONDS", 30.0, ge=0)
    # Builds (and their transfer and OpenMP threads) run this much nicer than the
    # event loop, so /_status answers promptly while builds hold every core
    # (benchmarks/README.md, section 5). 0 runs them at the service's priority.
    build_nice: int = env("RVIB_BUILD_NICE", 10, ge=0, le=19)
    job_time_limit_seconds: float | None = env("RVIB_JOB_TIME_LIMIT_SECONDS", None, gt=0)
    auth_username: str | None = env("RVIB_AUTH_USERNAME", None)
    auth_password: SecretStr | None = env("RVIB_AUTH_PASSWORD", None)
    auth_file: Path | None = env("RVIB_AUTH_FILE", None)
    allowed_buckets: Annotated[frozenset[str], NoDecode] = env("RVIB_ALLOWED_BUCKETS", frozenset())
    metrics_require_auth: bool = env("RVIB_METRICS_REQUIRE_AUTH", True)
    # Longer than the k-NN client's poll interval (5 s): see core/options.py.
    keep_alive_seconds: int = env("RVIB_KEEP_ALIVE_SECONDS", DEFAULT_KEEP_ALIVE_SECONDS, ge=1)

    # Build
    device: Device = env("RVIB_DEVICE", Device.AUTO)
    omp_threads: int | None = env("RVIB_OMP_THREADS", None, gt=0)
    add_batch_rows: int = env("RVIB_ADD_BATCH_ROWS", 32768, gt=0)
    index_serialization_mode: SerializationMode = env(
        "INDEX_SERIALIZATION_MODE", SerializationMode.MEMORY
    )
    tmp_dir: Path | None = env("RVIB_TMP_DIR", None)
    # standard | fast | auto: how the CPU builds the graph (core/projected_graph.py;
    # the default is chosen in benchmarks/README.md, "CPU build modes").
    cpu_build: CpuBuildMode = env("RVIB_CPU_BUILD", CpuBuildMode.STANDARD)
    # hnsw | base_level_only: how a GPU build is written (core/gpu_builder.py).
    gpu_index_layout: GpuLayout = env("RVIB_GPU_INDEX_LAYOUT", GpuLayout.HNSW)

    # S3
    s3_endpoint_url: str | None = env("S3_ENDPOINT_URL", None)
    s3_region: str | None = env(("AWS_REGION", "AWS_DEFAULT_REGION"), None)
    s3_path_style: bool = env("RVIB_S3_PATH_STYLE", False)
    s3_unsigned: bool = env("RVIB_S3_UNSIGNED", False)
    s3_throughput_target_gbps: float = env("RVIB_S3_THROUGHPUT_TARGET_GBPS", 10.0, gt=0)
    s3_part_size: int = env("RVIB_S3_PART_SIZE", 16 * MIB)
    s3_max_attempts: int = env("RVIB_S3_MAX_ATTEMPTS", 5, gt=0)
    s3_connect_timeout_s: float = env("RVIB_S3_CONNECT_TIMEOUT", 10.0, gt=0)
    s3_read_timeout_s: float = env("RVIB_S3_READ_TIMEOUT", 60.0, gt=0)

    # Fleet: replicas sharing jobs through Redis (RVIB_REDIS_URL unset: one process, no Redis)
    redis_url: SecretStr | None = env("RVIB_REDIS_URL", None)
    replica_id: str = Field(
        default_factory=socket.gethostname, min_length=1, validation_alias="RVIB_REPLICA_ID"
    )
    lease_seconds: float = env("RVIB_LEASE_SECONDS", 20.0, gt=0)
    heartbeat_seconds: float = env("RVIB_HEARTBEAT_SECONDS", 2.0, gt=0)
    max_attempts: int = env("RVIB_MAX_ATTEMPTS", 3, ge=1)
    redis_retry_after_seconds: int = env("RVIB_REDIS_RETRY_AFTER_SECONDS", 10, ge=1)

    # Logs
    log_level: str = env("LOG_LEVEL", "INFO")
    log_format: Literal["text", "json"] = env("LOG_FORMAT", "text")
    debug_logs: str | None = env("RVIB_DEBUG_LOGS", None)
    logs_dir_path: Path | None = env("RVIB_LOGS_DIR_PATH", None)

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(b.strip() for b in value.split(",") if b.strip())
        return value

    @field_validator("cpu_memory_limit", "gpu_memory_limit", mode="before")
    @classmethod
    def _memory_limit(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            return None
        return parse_memory_limit(cls.variable(info.field_name), value)

    @field_validator("s3_part_size")
    @classmethod
    def _part_size(cls, value: int) -> int:
        return check_part_size("RVIB_S3_PART_SIZE", value)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        parse_level("LOG_LEVEL", value)
        return value.upper()

    @field_validator("debug_logs")
    @classmethod
    def _debug_logs(cls, value: str | None) -> str | None:
        if value is not None:
            parse_levels(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # Checked here, so a mistake stops the start-up with one line, not a build later.
        if self.redis_url is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"RVIB_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be well below "
                f"RVIB_LEASE_SECONDS ({self.lease_seconds}), or leases expire between renewals"
            )
        self.basic_credentials()
        return self

    @classmethod
    def variable(cls, field_name: str | None) -> str:
        """The environment variable of a field (its first, for two names)."""
        alias = cls.model_fields[field_name or ""].validation_alias
        return str(alias.choices[0] if isinstance(alias, AliasChoices) else alias)

    def basic_credentials(self) -> tuple[bytes, bytes] | None:
        """HTTP Basic ``(username, password)`` as UTF-8, or None when authentication is off.

        ``RVIB_AUTH_FILE`` holds one line ``username:password`` (the first ``:`` splits
        them, so the password may contain more; surrounding whitespace and the final
        newline are ignored); it wins over ``RVIB_AUTH_USERNAME``/``RVIB_AUTH_PASSWORD``.
        """
        if self.auth_file is not None:
            try:
                text = self.auth_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"RVIB_AUTH_FILE {self.auth_file} cannot be read: {exc}") from None
            user, sep, password = text.partition(":")
            if not sep or not user or not password or "\n" in text:
                raise ValueError(
                    f"RVIB_AUTH_FILE {self.auth_file} must hold one line 'username:password' "
                    "(non-empty, separated by the first ':')"
                )
            return user.encode(), password.encode()
        if self.auth_username and self.auth_password is not None:
            return self.auth_username.encode(), self.auth_password.get_secret_value().encode()
        if self.auth_username or self.auth_password is not None:
            raise ValueError("set both RVIB_AUTH_USERNAME and RVIB_AUTH_PASSWORD, or neither")
        return None

    def s3_config(self) -> S3Config:
        from remote_vector_index_builder.core.s3_calls import S3Config

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
        from remote_vector_index_builder.core.builder_choice import BuilderOptions

        return BuilderOptions(
            device=self.device,
            add_batch_rows=self.add_batch_rows,
            cpu_build=self.cpu_build,
            gpu_layout=self.gpu_index_layout,
        )

    def effective_omp_threads(self) -> int:
        """Faiss OpenMP threads: ``RVIB_OMP_THREADS``, else the CPUs this process may use."""
        return self.omp_threads or usable_cpus()

    def effective_cpu_memory_limit(self) -> int:
        """Bytes of host memory builds may reserve (default: what the machine has)."""
        return self.cpu_memory_limit or int(psutil.virtual_memory().total)

    def summary(self, **facts: object) -> str:
        """The effective configuration as one log line, secrets masked; ``facts`` are what
        only the running service knows (device, workers, limits, S3 credential source)."""
        redis = "off"
        if self.redis_url is not None:
            redis = re.sub(r"//[^@/]*@", "//***@", self.redis_url.get_secret_value())
        credentials = self.basic_credentials()
        items: dict[str, object] = {
            **facts,
            "s3_endpoint": self.s3_endpoint_url or "AWS",
            "region": self.s3_region or "boto3 default",
            "addressing": "path" if self.s3_path_style else "virtual",
            "signing": "unsigned" if self.s3_unsigned else "signed",
            "auth": "off" if credentials is None else f"basic (user {credentials[0].decode()!r})",
            "allowed_buckets": ",".join(sorted(self.allowed_buckets)) or "any",
            "serialization": self.index_serialization_mode.value,
            "cpu_build": self.cpu_build.value,
            "redis": redis,
            "replica": self.replica_id if self.redis_url is not None else "-",
            "keep_alive_s": self.keep_alive_seconds,
            "log": f"{self.log_level}/{self.log_format}",
        }
        return " ".join(f"{key}={value}" for key, value in items.items())
