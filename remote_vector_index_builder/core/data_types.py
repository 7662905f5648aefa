"""What each ``data_type`` of a build request means to every stage, in one table.

The blob layout is the k-NN client's (docs/knn-contract.md, section 4); the rest
is what this service chose for each type: how the CPU path stores vectors, which
element type the GPU path hands to CAGRA, and which values the index cannot hold.
Parsing (``dataset``), admission (``memory``) and both builders read these specs
rather than keeping tables of their own.

Faiss constants are named here, not imported: ``memory`` and ``params`` read this
module and must not load Faiss. The builders resolve the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class DataType(StrEnum):
    FLOAT = "float"
    HALF_FLOAT = "half_float"
    BYTE = "byte"
    BINARY = "binary"

    @property
    def spec(self) -> DataTypeSpec:
        return SPECS[self]


class NumericType(StrEnum):  # element type handed to the GPU; values name Faiss constants
    FLOAT32 = "Float32"
    FLOAT16 = "Float16"
    INT8 = "Int8"
    UINT8_BITS = "uint8 bits"  # packed binary codes: GpuIndexBinaryCagra takes no numeric type


# fp16's largest finite value: larger magnitudes would become inf in fp16 storage.
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class DataTypeSpec:
    # One value of a blob row (binary: a byte of 8 packed dimensions).
    blob_dtype: np.dtype
    blob_bytes_per_dimension: float
    # Binary: ``dimension`` counts bits, and the index is a Hamming one over packed codes.
    packed_bits: bool
    # Bytes per dimension of the stored vectors, on the CPU path (flat fp32, Faiss scalar
    # quantizer, packed bits) and after the GPU path's copyTo (its numeric type) alike.
    storage_bytes_per_dimension: float
    # ``faiss.ScalarQuantizer`` constant the CPU HNSW stores vectors with; None: flat storage.
    sq_type: str | None
    cagra_type: NumericType
    # The dtype of the host rows CAGRA's ``train`` reads (and ``copyTo`` reads back).
    gpu_row_dtype: np.dtype
    # ``dataset.check_values``: NaN and infinity rejected; magnitudes above the limit (the
    # fp16 range, the only storage that narrows the blob's values) too.
    finite_only: bool
    max_magnitude: float | None
    # Bytes per value of that check's temporaries (``memory`` counts one batch of them):
    # float: the isfinite bools; half_float: those, |x| in fp32 and its comparison's bools.
    check_bytes_per_value: int

    @property
    def converts_for_faiss(self) -> bool:
        """Faiss's float indexes encode from fp32: other numeric rows go through a buffer."""
        return not self.packed_bits and self.blob_dtype != np.dtype("<f4")

    @property
    def gpu_converts(self) -> bool:
        """The GPU path hands CAGRA a converted copy of the rows, not a view of the blob."""
        return self.gpu_row_dtype != self.blob_dtype


SPECS: dict[DataType, DataTypeSpec] = {
    DataType.FLOAT: DataTypeSpec(
        blob_dtype=np.dtype("<f4"),
        blob_bytes_per_dimension=4.0,
        packed_bits=False,
        storage_bytes_per_dimension=4.0,
        sq_type=None,
        cagra_type=NumericType.FLOAT32,
        gpu_row_dtype=np.dtype("<f4"),
        finite_only=True,
        max_magnitude=None,
        check_bytes_per_value=1,
    ),
    # float32 on the wire; stored as fp16, so values beyond fp16's range are refused.
    DataType.HALF_FLOAT: DataTypeSpec(
        blob_dtype=np.dtype("<f4"),
        blob_bytes_per_dimension=4.0,
        packed_bits=False,
        storage_bytes_per_dimension=2.0,
        sq_type="QT_fp16",
        cagra_type=NumericType.FLOAT16,
        gpu_row_dtype=np.dtype("<f2"),
        finite_only=True,
        max_magnitude=FP16_MAX,
        check_bytes_per_value=6,
    ),
    DataType.BYTE: DataTypeSpec(
        blob_dtype=np.dtype("i1"),
        blob_bytes_per_dimension=1.0,
        packed_bits=False,
        storage_bytes_per_dimension=1.0,
        sq_type="QT_8bit_direct_signed",
        cagra_type=NumericType.INT8,
        gpu_row_dtype=np.dtype("i1"),
        finite_only=False,
        max_magnitude=None,
        check_bytes_per_value=0,
    ),
    DataType.BINARY: DataTypeSpec(
        blob_dtype=np.dtype("u1"),
        blob_bytes_per_dimension=0.125,
        packed_bits=True,
        storage_bytes_per_dimension=0.125,
        sq_type=None,
        cagra_type=NumericType.UINT8_BITS,
        gpu_row_dtype=np.dtype("u1"),
        finite_only=False,
        max_magnitude=None,
        check_bytes_per_value=0,
    ),
}
