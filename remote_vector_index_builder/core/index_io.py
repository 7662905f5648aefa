"""Serialization: one plain Faiss ``write_index`` stream, to a file or a stream.

With ``skip_stored_vectors`` the stream is composed here, because the stock
``IndexIDMap`` writer does not pass ``IO_FLAG_SKIP_STORAGE`` down to the inner
index: we write the ``IxMp`` header, the inner CAGRA-typed HNSW with the flag,
and the id map ourselves. For an index with storage this composition is byte
for byte what ``faiss.write_index`` writes (``test_cpu_builder``'s
``test_composed_id_map_stream_is_byte_identical_to_faiss`` proves it).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from remote_vector_index_builder.core.errors import BuildError
from remote_vector_index_builder.core.index_builder import FaissIndex

# Faiss's header keeps two unused int64 fields that it always writes as 1 << 20.
_HEADER_DUMMY = 1 << 20
# Bytes handed to the sink per callback: large enough that Python call overhead
# is negligible, small next to an upload part.
_CHUNK = 4 * 1024 * 1024


class Sink(Protocol):
    def write(self, data: bytes) -> int: ...


class _CountingSink:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.count = 0

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.count += len(data)
        return len(data)


def id_map_header(index: FaissIndex) -> bytes:
    """The ``IxMp`` header ``faiss.write_index`` writes for an ``IndexIDMap``."""
    header = b"IxMp" + struct.pack(
        "<iqqq?i",
        index.d,
        index.ntotal,
        _HEADER_DUMMY,
        _HEADER_DUMMY,
        bool(index.is_trained),
        int(index.metric_type),
    )
    if index.metric_type > 1:  # metrics beyond L2/IP carry an argument
        header += struct.pack("<f", index.metric_arg)
    return header


def write_faiss(index: FaissIndex, write: Callable[[bytes], int], io_flags: int = 0) -> None:
    """``faiss.write_index`` (or its binary twin) into ``write``, in 4 MiB chunks."""
    writer = faiss.PyCallbackIOWriter(write, _CHUNK)
    try:
        if isinstance(index, faiss.IndexBinary):
            faiss.write_index_binary(index, writer)
        else:
            faiss.write_index(index, writer, io_flags)
    finally:
        del writer


def write(index: FaissIndex, sink: Sink, *, skip_storage: bool = False) -> int:
    """Serialize ``index`` into ``sink``; returns the bytes written."""
    counting = _CountingSink(sink)
    try:
        if skip_storage:
            inner = faiss.downcast_index(index.index)
            if not isinstance(inner, faiss.IndexHNSWCagra):
                raise BuildError("skip_stored_vectors needs a CAGRA-typed HNSW inner index")
            counting.write(id_map_header(index))
            write_faiss(inner, counting.write, faiss.IO_FLAG_SKIP_STORAGE)
            ids = faiss.vector_to_array(index.id_map).astype("<i8", copy=False)
            counting.write(struct.pack("<Q", ids.size))
            counting.write(memoryview(ids).cast("B").tobytes())
        else:
            write_faiss(index, counting.write)
    except RuntimeError as exc:
        raise BuildError(f"Faiss failed to serialize the index: {exc}") from exc
    return counting.count


@contextmanager
def temporary_index_file(tmp_dir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """A fresh private directory holding ``index.faiss``, removed on exit.

    The file name never derives from the request's paths, so no vector path
    (``../``, absolute, unicode) can steer it outside the temp directory.
    """
    with tempfile.TemporaryDirectory(prefix="rvib-", dir=tmp_dir) as directory:
        yield Path(directory) / "index.faiss"


def read(data: bytes | np.ndarray | os.PathLike[str] | str) -> FaissIndex:
    """Read an index back (tests, CLI checks); detects binary indexes by tag."""
    if isinstance(data, str | os.PathLike):
        data = Path(data).read_bytes()
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if bytes(buffer[:2]) == b"IB":
        return faiss.deserialize_index_binary(buffer)
    return faiss.deserialize_index(buffer)
