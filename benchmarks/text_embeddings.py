"""Real-text embeddings without a model download: LSA over the machine's man pages.

Paragraphs of every ``/usr/share/man/man*/*.gz`` page (troff requests stripped),
TF-IDF (sublinear tf, smooth idf, the 8192 most common terms that are in at most
half of the paragraphs), then a rank-``dim`` randomized SVD (one power
iteration) in plain numpy; the document vectors ``U S`` are unit-normalized, as
sentence-embedding vectors usually are. Like learned text embeddings they have
a decaying spectrum and near-duplicate clusters (man pages repeat boilerplate).
Seeded: the same machine gives the same rows.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path

import numpy as np

MAN_ROOT = Path("/usr/share/man")
VOCABULARY = 8192
_WORD = re.compile(r"[a-z][a-z0-9_]{2,}")
_ESCAPE = re.compile(r"\\f[BIRP]|\\\(..|\\[-e&|^ ]|\\\*.|\\s[-+]?\d")


def paragraphs(root: Path = MAN_ROOT, min_words: int = 8) -> list[list[str]]:
    """Tokenized paragraphs of the man pages under ``root``, deduplicated, in path order."""
    seen: set[str] = set()
    out: list[list[str]] = []
    for path in sorted(root.glob("man*/*.gz")):
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        current: list[str] = []
        for line in [*text.splitlines(), ".PP"]:
            if line.startswith((".", "'")) or not line.strip():
                if line[:3] in (".PP", ".SH", ".TP", ".LP", ".P", ".IP", ".SS") or not line.strip():
                    if len(current) >= min_words:
                        key = " ".join(current)
                        if key not in seen:
                            seen.add(key)
                            out.append(current)
                    current = []
                continue
            current += _WORD.findall(_ESCAPE.sub(" ", line).lower())
    return out


def _csr(docs: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    df = Counter(term for doc in docs for term in set(doc))
    common = [t for t, c in df.most_common() if c >= 3 and c <= len(docs) // 2][:VOCABULARY]
    column = {t: i for i, t in enumerate(common)}
    idf = np.log((1 + len(docs)) / (1 + np.array([df[t] for t in common], np.float64))) + 1
    indptr, indices, data = [0], [], []
    for doc in docs:
        counts = Counter(column[t] for t in doc if t in column)
        cols = np.fromiter(counts.keys(), np.int64, len(counts))
        vals = (1 + np.log(np.fromiter(counts.values(), np.float64, len(counts)))) * idf[cols]
        norm = float(np.linalg.norm(vals)) or 1.0
        indices.append(cols)
        data.append(vals / norm)
        indptr.append(indptr[-1] + len(cols))
    return (
        np.asarray(indptr, np.int64),
        np.concatenate(indices) if indices else np.zeros(0, np.int64),
        np.concatenate(data).astype(np.float32) if data else np.zeros(0, np.float32),
        len(common),
    )


def _times(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dense: np.ndarray
) -> np.ndarray:
    """Sparse (rows x V) @ dense (V x l), in row chunks."""
    rows = len(indptr) - 1
    out = np.zeros((rows, dense.shape[1]), np.float32)
    for start in range(0, rows, 4096):
        stop = min(rows, start + 4096)
        a, b = indptr[start], indptr[stop]
        if b == a:
            continue
        part = dense[indices[a:b]] * data[a:b, None]
        starts = indptr[start:stop] - a
        nonempty = indptr[start + 1 : stop + 1] > indptr[start:stop]
        sums = np.add.reduceat(part, starts[nonempty], axis=0)
        out[start:stop][nonempty] = sums
    return out


def _transposed_times(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dense: np.ndarray, columns: int
) -> np.ndarray:
    """Sparse.T (V x rows) @ dense (rows x l)."""
    row_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    out = np.zeros((columns, dense.shape[1]), np.float32)
    for a in range(0, len(indices), 200_000):
        b = min(len(indices), a + 200_000)
        order = np.argsort(indices[a:b], kind="stable")
        cols = indices[a:b][order]
        part = dense[row_of[a:b][order]] * data[a:b][order, None]
        first = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
        out[cols[first]] += np.add.reduceat(part, first, axis=0)
    return out


def lsa_embeddings(n: int, dim: int = 256, seed: int = 11) -> np.ndarray:
    """``n`` unit-length ``dim``-d LSA vectors of man-page paragraphs (fewer if not that many)."""
    docs = paragraphs()
    rng = np.random.default_rng(seed)
    if len(docs) > n:
        docs = [docs[i] for i in np.sort(rng.choice(len(docs), n, replace=False))]
    indptr, indices, data, columns = _csr(docs)
    sketch = rng.standard_normal((columns, dim + 16)).astype(np.float32)
    y = _times(indptr, indices, data, sketch)
    y = _times(indptr, indices, data, _transposed_times(indptr, indices, data, y, columns))
    q, _ = np.linalg.qr(y)
    b = _transposed_times(indptr, indices, data, q.astype(np.float32), columns).T
    u, s, _ = np.linalg.svd(b, full_matrices=False)
    vectors = (q @ u[:, :dim]) * s[:dim]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


if __name__ == "__main__":
    import time

    began = time.perf_counter()
    rows = lsa_embeddings(50000)
    print(rows.shape, f"{time.perf_counter() - began:.1f}s")
    centred = rows - rows.mean(0)
    spectrum = np.linalg.svd(centred[:5000], compute_uv=False) ** 2
    print(
        "variance share of the first 16/64/128 axes:",
        [round(float(spectrum[:k].sum() / spectrum.sum()), 3) for k in (16, 64, 128)],
    )
