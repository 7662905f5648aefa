"""Seeded test and benchmark data in the k-NN blob format, and recall checks.

Clustered (a Gaussian mixture), never i.i.d. uniform: uniform data in high
dimensions has no meaningful neighbours, so recall on it says nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

SHARED_SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "cohere-1k-768"


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
    return np.packbits(vectors > 0, axis=1)


def normalized(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def vector_blob(vectors: np.ndarray) -> bytes:
    """Row-major little-endian bytes as the client writes them."""
    if vectors.dtype == np.float32:
        return vectors.astype("<f4", copy=False).tobytes()
    return vectors.tobytes()


def doc_id_blob(doc_ids: np.ndarray) -> bytes:
    return doc_ids.astype("<i4").tobytes()


def exact_neighbours(
    base: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> np.ndarray:
    """Row positions of the true k nearest neighbours."""
    if metric == "hamming":
        index: Any = faiss.IndexBinaryFlat(base.shape[1] * 8)
    elif metric == "innerproduct":
        index = faiss.IndexFlatIP(base.shape[1])
    else:
        index = faiss.IndexFlatL2(base.shape[1])
    index.add(base if metric == "hamming" else base.astype(np.float32))
    _, positions = index.search(queries if metric == "hamming" else queries.astype(np.float32), k)
    return np.asarray(positions)


def recall_at_k(
    index: Any,
    base: np.ndarray,
    doc_ids: np.ndarray,
    queries: np.ndarray,
    metric: str,
    k: int = 10,
) -> float:
    """Recall@k of ``index`` (returning doc ids) against exact search over ``base``."""
    truth = doc_ids[exact_neighbours(base, queries, k, metric)]
    q = queries if metric == "hamming" else queries.astype(np.float32)
    _, found = index.search(q, k)
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
    return hits / truth.size
