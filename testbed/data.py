"""Seeded test and benchmark data in the k-NN blob format, and recall checks.

Clustered (a Gaussian mixture), never i.i.d. uniform: uniform data in high
dimensions has no meaningful neighbours, so recall on it says nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from remote_vector_index_builder.core import dataset
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.quality import exact_neighbours, recall_at_k
from remote_vector_index_builder.demo import SAMPLE_DIR

__all__ = ["exact_neighbours", "recall_at_k"]

# Where the inner index's section tag starts in a serialized ID map:
ID_MAP_HEADER = 37  # "IxMp" + d, ntotal, 2 dummies, is_trained, metric
BINARY_ID_MAP_HEADER = 25  # "IBMp" + d, code_size, ntotal, is_trained, metric

SHARED_SAMPLE = SAMPLE_DIR


def clustered(n: int, dim: int, *, clusters: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, (clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    chunk = 65536
    for start in range(0, n, chunk):
        rows = labels[start : start + chunk]
        noise = rng.normal(0.0, 0.35, (len(rows), dim)).astype(np.float32)
        np.add(centers[rows], noise, out=out[start : start + chunk])
    return out


def cohere_sample() -> tuple[np.ndarray, np.ndarray]:
    vectors = np.fromfile(SHARED_SAMPLE / "vectors.knnvec", dtype="<f4").reshape(-1, 768)
    doc_ids = np.fromfile(SHARED_SAMPLE / "doc_ids.knndid", dtype="<i4")
    return vectors, doc_ids


def to_int8(vectors: np.ndarray) -> np.ndarray:
    scale = 127.0 / float(np.abs(vectors).max())
    return np.clip(np.rint(vectors * scale), -128, 127).astype(np.int8)


def to_binary(vectors: np.ndarray) -> np.ndarray:
    """Sign bits, packed 8 per byte (the client's binary layout)."""
    packed: np.ndarray = np.packbits(vectors > 0, axis=1)
    return packed


def normalized(vectors: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit.astype(np.float32)


def vector_blob(vectors: np.ndarray) -> bytes:
    """Row-major little-endian bytes as the client writes them."""
    if vectors.dtype == np.float32:
        return vectors.astype("<f4", copy=False).tobytes()
    return vectors.tobytes()


def doc_id_blob(doc_ids: np.ndarray) -> bytes:
    return doc_ids.astype("<i4").tobytes()


def make_request(
    data_type: str = "float",
    space: str = "l2",
    dim: int = 32,
    n: int = 2000,
    *,
    skip_stored_vectors: bool = False,
    index_parameters: dict[str, Any] | None = None,
    **algorithm_parameters: Any,
) -> BuildRequest:
    """A request for blobs at ``x/seg``; ``m``, ``ef_*`` go to ``algorithm_parameters``."""
    return BuildRequest.model_validate(
        {
            "repository_type": "s3",
            "container_name": "b",
            "vector_path": "x/seg.knnvec",
            "doc_id_path": "x/seg.knndid",
            "dimension": dim,
            "doc_count": n,
            "data_type": data_type,
            "skip_stored_vectors": skip_stored_vectors,
            "index_parameters": index_parameters
            or {"space_type": space, "algorithm_parameters": algorithm_parameters},
        }
    )


def rows_for(data_type: str, space: str, n: int, dim: int) -> np.ndarray:
    """Clustered rows in ``data_type``'s client layout (binary: ``dim`` bits, packed)."""
    base = clustered(n, dim, seed=1)
    if data_type == "binary":
        return to_binary(base)
    if space == "innerproduct":
        base = normalized(base)
    return to_int8(base) if data_type == "byte" else base


def make_dataset(request: BuildRequest, rows: np.ndarray, ids: np.ndarray) -> dataset.Dataset:
    """``rows`` and ``ids`` through their blobs and ``dataset.parse``, as a build gets them."""
    return dataset.parse(
        request,
        np.frombuffer(bytearray(vector_blob(rows)), dtype=np.uint8),
        np.frombuffer(bytearray(doc_id_blob(ids)), dtype=np.uint8),
    )


def doc_ids(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int32) * 3 + 7).astype(np.int32)  # not row positions


def sparse_ids(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int32)


# (data_type, space, inner HNSW tag, storage tag) of the CPU builder's float-family indexes.
FLOAT_FAMILY_LAYOUTS = [
    ("float", "l2", b"IHNf", b"IxF2"),
    ("float", "innerproduct", b"IHNf", b"IxFI"),
    ("half_float", "l2", b"IHNs", b"IxSQ"),
    ("half_float", "innerproduct", b"IHNs", b"IxSQ"),
    ("byte", "l2", b"IHNs", b"IxSQ"),
    ("byte", "innerproduct", b"IHNs", b"IxSQ"),
]
