"""The per-data-type description against the client's blobs and the Faiss it names."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from remote_vector_index_builder.core import dataset
from remote_vector_index_builder.core.cpu_builder import _inner_index
from remote_vector_index_builder.core.data_types import SPECS, DataType, NumericType
from remote_vector_index_builder.core.params import BuildRequest

DIM, N = 64, 10


def _request(data_type: DataType) -> BuildRequest:
    return BuildRequest.model_validate(
        {
            "repository_type": "s3",
            "container_name": "b",
            "vector_path": "seg.knnvec",
            "doc_id_path": "seg.knndid",
            "dimension": DIM,
            "doc_count": N,
            "data_type": data_type.value,
            "index_parameters": {
                "space_type": "hamming" if data_type is DataType.BINARY else "l2",
                "algorithm_parameters": {"m": 8},
            },
        }
    )


def _client_blob(data_type: DataType, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """The vector blob as docs/knn-contract.md, section 4, has the client write it."""
    if data_type in (DataType.FLOAT, DataType.HALF_FLOAT):  # float32 values per dimension
        values = rng.standard_normal((N, DIM)).astype("<f4")
    elif data_type is DataType.BYTE:  # one signed int8 per dimension
        values = rng.integers(-128, 128, (N, DIM)).astype("i1")
    else:  # dimension / 8 bytes of packed bits
        values = np.packbits(rng.integers(0, 2, (N, DIM)).astype(bool), axis=1)
    return values.tobytes(), values


def test_every_data_type_has_a_spec() -> None:
    assert set(SPECS) == set(DataType)
    assert all(t.spec is SPECS[t] for t in DataType)


@pytest.mark.parametrize("data_type", list(DataType))
def test_spec_matches_the_blobs_the_client_writes(data_type: DataType) -> None:
    request = _request(data_type)
    blob, values = _client_blob(data_type, np.random.default_rng(0))
    assert len(blob) == request.vector_blob_bytes
    assert len(blob) == N * DIM * data_type.spec.blob_bytes_per_dimension
    parsed = dataset.parse(
        request,
        np.frombuffer(blob, dtype=np.uint8),
        np.frombuffer(np.arange(N, dtype="<i4").tobytes(), dtype=np.uint8),
    )
    assert parsed.vectors.dtype == data_type.spec.blob_dtype
    np.testing.assert_array_equal(parsed.vectors, values)


@pytest.mark.parametrize("data_type", list(DataType))
def test_stored_bytes_are_what_the_faiss_index_stores(data_type: DataType) -> None:
    inner = _inner_index(_request(data_type))
    if data_type.spec.packed_bits:
        code_size = faiss.downcast_IndexBinary(inner.storage).code_size
    else:
        code_size = faiss.downcast_index(inner.storage).code_size
    assert code_size == DIM * data_type.spec.storage_bytes_per_dimension


@pytest.mark.parametrize("data_type", list(DataType))
def test_faiss_names_resolve(data_type: DataType) -> None:
    spec = data_type.spec
    if spec.sq_type is not None:
        assert isinstance(getattr(faiss.ScalarQuantizer, spec.sq_type), int)
    if spec.cagra_type is not NumericType.UINT8_BITS:
        assert isinstance(getattr(faiss, spec.cagra_type.value), int)
    # What the GPU path stores after copyTo is its numeric type, packed bits for binary.
    per_value = spec.gpu_row_dtype.itemsize / (8 if spec.packed_bits else 1)
    assert per_value == spec.storage_bytes_per_dimension


def test_the_description_loads_no_faiss() -> None:
    code = (
        "import sys; import remote_vector_index_builder.core.memory; "
        "print('faiss' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
