"""Pieces every benchmark section shares: sizes, seeded blobs, child processes, statistics.

Every measurement that needs its own peak RSS or CPU time runs in a fresh
``python -m benchmarks.job`` child that prints one JSON object on stdout. Peak
RSS is read from ``VmHWM`` in ``/proc/self/status``: ``ru_maxrss`` survives
``exec`` on Linux, so a child would report its (large) parent's peak.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2
GIB = 1024**3
BUCKET = "rvib-bench"
REGION = "us-east-1"
DATA_TYPES = ("float", "half_float", "byte", "binary")
# Dummy credentials: SeaweedFS started without an identity file accepts any.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_SUFFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}
_BYTE_SUFFIXES = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_BYTE_SUFFIXES |= {"kib": 1024, "mib": MIB, "gib": GIB}


class BenchError(RuntimeError):
    """A child measurement failed; the message carries the end of its stderr."""


def parse_count(text: str) -> int:
    """``100k`` -> 100000, ``1M`` -> 1000000, ``2500`` -> 2500."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise ValueError(f"not a count: {text!r} (use e.g. 100k, 1M, 20000)")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2).lower()])


def parse_bytes(text: str) -> int:
    """``1GiB`` -> 1073741824, ``512MiB``, ``100MB``, plain byte counts."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _BYTE_SUFFIXES:
        raise ValueError(f"not a size: {text!r} (use e.g. 1GiB, 256MiB)")
    return int(float(match.group(1)) * _BYTE_SUFFIXES[match.group(2).lower()])


def fmt_count(n: int) -> str:
    for factor, suffix in ((1000**2, "M"), (1000, "k")):
        if n >= factor and n % (factor // 10) == 0:
            value = n / factor
            return f"{value:g}{suffix}"
    return str(n)


def median(values: Iterable[float]) -> float:
    data = list(values)
    return float(statistics.median(data)) if data else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(np.ceil(q / 100.0 * len(ordered)))))
    return float(ordered[rank - 1])


def vm_hwm_bytes() -> int:
    """Peak resident memory of this process since exec (``VmHWM``)."""
    return _proc_status_kib("VmHWM") * 1024


def vm_rss_bytes() -> int:
    """Resident memory of this process now (``VmRSS``)."""
    return _proc_status_kib("VmRSS") * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def load_average() -> float:
    return os.getloadavg()[0]


def s3_server_process() -> Any:
    """The SeaweedFS process this run started (a ``psutil.Process``), or None."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "weed":
                return child
        except psutil.Error:
            continue
    return None


def cpu_seconds_of(process: Any) -> float:
    """User + system CPU seconds of a ``psutil.Process`` so far (NaN without one)."""
    if process is None:
        return float("nan")
    times = process.cpu_times()
    return float(times.user + times.system)


# --------------------------------------------------------------------------------------
# Seeded data in the k-NN blob format
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blobs:
    """One segment's blobs on local disk and in the bucket, plus held-out queries."""

    n: int
    dim: int
    data_type: str
    stem: str  # object key without suffix
    vector_file: Path
    doc_id_file: Path
    query_file: Path
    float_file: Path | None  # the float32 rows the typed rows were derived from

    @property
    def vector_key(self) -> str:
        return self.stem + ".knnvec"

    @property
    def doc_id_key(self) -> str:
        return self.stem + ".knndid"

    @property
    def vector_bytes(self) -> int:
        return self.vector_file.stat().st_size

    def request_body(self, **overrides: Any) -> dict[str, Any]:
        """The ``POST /_build`` body a data node would send for this segment."""
        body: dict[str, Any] = {
            "repository_type": "s3",
            "container_name": BUCKET,
            "vector_path": self.vector_key,
            "doc_id_path": self.doc_id_key,
            "tenant_id": "bench",
            "dimension": self.dim,
            "doc_count": self.n,
            "data_type": self.data_type,
            "engine": "faiss",
            "index_parameters": {
                "space_type": "hamming" if self.data_type == "binary" else "l2",
                "algorithm": "hnsw",
                "algorithm_parameters": {"m": 16, "ef_construction": 100, "ef_search": 100},
            },
        }
        body.update(overrides)
        return body


def int8_scale(rows: np.ndarray) -> float:
    return 127.0 / float(np.abs(rows).max())


def to_int8(rows: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(rows * scale), -128, 127).astype(np.int8)


def typed_rows(rows: np.ndarray, data_type: str, scale: float) -> np.ndarray:
    """float32 rows -> what the client sends for ``data_type`` (half_float is sent as fp32)."""
    if data_type in ("float", "half_float"):
        return rows
    if data_type == "byte":
        return to_int8(rows, scale)
    if data_type == "binary":
        return np.packbits(rows > 0, axis=1)
    raise ValueError(f"unknown data type {data_type}")


def make_blobs(
    work_dir: Path, n: int, dim: int, data_type: str, *, queries: int = 1000, seed: int = 7
) -> Blobs:
    """Write (once) seeded Gaussian-mixture rows as k-NN blobs under ``work_dir``.

    ``dim`` counts bits for ``binary`` (the sign bits of the float rows, packed).
    Queries are further draws from the same mixture, held out of the index.
    """
    from testbed.data import clustered

    stem = f"bench/{fmt_count(n)}x{dim}-{data_type}_vectors/s{seed}_emb_0"
    folder = work_dir / f"{fmt_count(n)}x{dim}-{data_type}-s{seed}"
    blobs = Blobs(
        n=n,
        dim=dim,
        data_type=data_type,
        stem=stem,
        vector_file=folder / "vectors.knnvec",
        doc_id_file=folder / "doc_ids.knndid",
        query_file=folder / "queries.npy",
        float_file=None if data_type == "float" else folder / "float_rows.npy",
    )
    if blobs.vector_file.exists() and blobs.query_file.exists():
        return blobs
    folder.mkdir(parents=True, exist_ok=True)
    rows = clustered(n + queries, dim, seed=seed)
    base, held_out = rows[:n], rows[n:]
    scale = int8_scale(base)
    typed_rows(base, data_type, scale).tofile(blobs.vector_file)
    np.arange(n, dtype="<i4").tofile(blobs.doc_id_file)
    np.save(blobs.query_file, typed_rows(held_out, data_type, scale))
    if blobs.float_file is not None:
        np.save(blobs.float_file, base)
        np.save(folder / "float_queries.npy", held_out)
    return blobs


def upload_blobs(store: Any, blobs: Blobs, stem: str | None = None) -> None:
    """Put both blobs in the bucket (under ``stem`` when given)."""
    stem = stem or blobs.stem
    store.upload_file(BUCKET, stem + ".knnvec", blobs.vector_file)
    store.upload_file(BUCKET, stem + ".knndid", blobs.doc_id_file)


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **AWS_ENV, "PYTHONPATH": str(ROOT)}
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def run_child(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 3600.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run ``python -m benchmarks.job ARGS`` and return the JSON it prints last.

    With ``profile`` (a ``.folded`` path) the child runs under py-spy and a
    summary is written beside the stacks (``benchmarks.profiles``).
    """
    command = [sys.executable, "-m", "benchmarks.job", *map(str, args)]
    if profile is not None:
        from benchmarks import profiles

        command, profile_env = profiles.record_command(profile, command)
        env = {**(env or {}), **profile_env}
    load_before = load_average()
    started = time.perf_counter()
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"{' '.join(command[2:])} failed ({proc.returncode}):\n{tail}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{' '.join(command[2:])} printed no JSON:\n{proc.stdout[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if profile is not None:
        from benchmarks import profiles

        summary = profiles.write_summary(profile)
        result["profile"] = str(summary or profile)
    result["child_wall_s"] = time.perf_counter() - started
    result["load_before"] = load_before
    result["load_after"] = load_average()
    return result


def touch_free_memory(limit: int = 16 * GIB) -> int:
    """Write to most of the free memory once, in 2 MiB pages where the kernel allows.

    On a virtual machine whose memory the host backs lazily, the first write to
    each guest page costs a host fault: a fresh VM made a 1 GiB download's huge
    pages cost 1.7 instead of 0.7 CPU-s. A host that has run for a while has
    touched its memory; doing it once up front puts every measurement, ours and
    the reference's alike, on such a machine. Returns the bytes touched.
    """
    import mmap

    available = _meminfo_kib("MemAvailable") * 1024
    size = min(limit, int(available * 0.75)) // (2 * MIB) * (2 * MIB)
    if size <= 0:
        return 0
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        pages = np.frombuffer(mapping, dtype=np.uint8)
        pages[::4096] = 1
        del pages
    finally:
        mapping.close()
    return size


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# The shared state of one benchmark run
# --------------------------------------------------------------------------------------


@dataclass
class Context:
    """The local S3 server, the work directory and the blobs already in the bucket."""

    endpoint: str
    store: Any  # S3ObjectStore of the parent, for setting up objects
    client: Any  # its boto3 client, for the odd delete
    work_dir: Path
    repeats: int
    uploaded: dict[tuple[int, int, str], Blobs]
    https_endpoint: str | None = None  # the same server over TLS, when a certificate was made
    ca_bundle: Path | None = None  # the self-signed certificate clients must trust
    warm_transfers: bool = True  # time each transfer after an untimed one in its process
    profile_dir: Path | None = None  # with --profile: where py-spy profiles go
    profiled: set[str] = field(default_factory=set)

    def profile(self, name: str) -> Path | None:
        """Where to profile the measurement ``name``: its first run only, if profiling."""
        if self.profile_dir is None or name in self.profiled:
            return None
        self.profiled.add(name)
        return self.profile_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".folded")

    def blobs(self, n: int, dim: int, data_type: str) -> Blobs:
        """Seeded blobs for ``n x dim`` ``data_type``, generated and uploaded once."""
        key = (n, dim, data_type)
        if key not in self.uploaded:
            started = time.perf_counter()
            blobs = make_blobs(self.work_dir, n, dim, data_type)
            upload_blobs(self.store, blobs)
            say(
                f"  data: {fmt_count(n)} x {dim} {data_type} generated and uploaded "
                f"in {time.perf_counter() - started:.1f}s"
            )
            self.uploaded[key] = blobs
        return self.uploaded[key]

    def workflow(
        self,
        body: dict[str, Any],
        mode: str = "memory",
        batch_rows: int = 0,
        profile: str | None = None,
        overlap: bool = True,
    ) -> dict[str, Any]:
        args = ["workflow", "--endpoint", self.endpoint, "--request", json.dumps(body)]
        args += ["--mode", mode, "--batch-rows", str(batch_rows)]
        args += [] if overlap else ["--no-overlap"]
        return run_child(args, profile=self.profile(profile) if profile else None)


def make_certificate(folder: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1 (cert, key), or None without ``cryptography``."""
    try:
        import ipaddress
        from datetime import UTC, datetime, timedelta

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "s3-cert.pem", folder / "s3-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
