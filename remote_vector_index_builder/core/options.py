"""The operator's choices and the limits on them, named once and importable without Faiss or boto3.

Settings, the command line and admission read these; the builders, the
serializer and the S3 layer implement them. Keeping them here lets ``Settings``
and ``--help`` load in a fraction of a second (no Faiss, no boto3: test_settings
checks) and keeps one definition of each value the environment may hold.
"""

from __future__ import annotations

from enum import StrEnum

KIB = 1024
MIB = 1024**2
GIB = 1024**3

# S3's size limits for every multipart part but the last.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * GIB


def check_part_size(name: str, value: int) -> int:
    """``value`` if S3's multipart limits allow it as a part size; ``name`` goes in the error."""
    if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
        raise ValueError(
            f"{name} must be between 5 MiB ({MIN_PART_SIZE} bytes) and 5 GiB "
            f"({MAX_PART_SIZE} bytes), S3's multipart limits; got {value}"
        )
    return value


# The smallest CPU_MEMORY_LIMIT / GPU_MEMORY_LIMIT taken: below it no build fits
# (each reserves a 64 MiB fixed allowance besides its data, core/memory.py), so a
# smaller value is a unit mistake, such as the reference service's "32.0" (GB).
MEMORY_LIMIT_FLOOR = 256 * MIB

# uvicorn's own default idle keep-alive is 5 s: the k-NN client's poll interval. A
# poll sent as the server closes its idle connection fails, and a POST is never
# retried by the client (a CPU fallback), so idle connections stay open well past it.
DEFAULT_KEEP_ALIVE_SECONDS = 75


class Device(StrEnum):
    """``RVIB_DEVICE``: where builds run."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


class CpuBuildMode(StrEnum):
    """``RVIB_CPU_BUILD``: how the CPU builds the HNSW graph."""

    STANDARD = "standard"  # Faiss HNSW over the stored vectors
    FAST = "fast"  # graph on projected 8-bit codes (core.projected_graph)
    AUTO = "auto"  # fast where a pilot shows it as good as standard


class SerializationMode(StrEnum):
    """``INDEX_SERIALIZATION_MODE``: how the index reaches S3."""

    DISK = "disk"
    MEMORY = "memory"


class GpuLayout(StrEnum):
    """``RVIB_GPU_INDEX_LAYOUT``: how a GPU build is written (core/gpu_builder.py's docstring)."""

    HNSW = "hnsw"  # a full HNSW assembled on the host from the GPU's kNN graph
    BASE_LEVEL_ONLY = "base_level_only"  # the reference service's IHc2/IBHc layout
