"""Seeded test and benchmark data in the k-NN blob format, and recall checks.

Clustered (a Gaussian mixture), never i.i.d. uniform: uniform data in high
dimensions has no meaningful neighbours, so recall on it says nothing.
"""

from __future__ import annotations

import numpy as np

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
