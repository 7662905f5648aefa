"""Index quality: recall@k of a built index against exact search.

Used by the demo to check the index it downloaded, and by the tests.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
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
    hits: int = sum(
        len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True)
    )
    return float(hits) / float(truth.size)
