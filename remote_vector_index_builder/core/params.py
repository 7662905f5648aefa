"""The ``POST /_build`` body, with the wire names and defaults of the k-NN client.

Validation rejects what cannot be built and says which field and why. Numbers
sent as strings ("768") are accepted (pydantic's lax mode), as are unknown keys
inside ``algorithm_parameters`` (future client versions add some), as long as
their values are JSON scalars: a stored request must always read back (a value
nested hundreds deep is valid JSON that pydantic cannot parse again).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.errors import InvalidRequestError, problem_message

VECTOR_SUFFIX = ".knnvec"
DOC_ID_SUFFIX = ".knndid"
INDEX_SUFFIX = ".faiss"
# S3's own limit on key length, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
# Faiss stores these HNSW parameters as C ints (and the client sends Java ints).
INT32_MAX = 2**31 - 1
# S3 bucket names, legacy ones included (upper case, "_", up to 255 characters): never
# "." or "..", which some servers and proxies would resolve as a path segment.
BUCKET_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,253}[A-Za-z0-9])?$"
_BUCKET = re.compile(BUCKET_PATTERN)
# Unknown algorithm_parameters: a few scalar values, as a newer client might add.
MAX_EXTRA_PARAMETERS = 32
MAX_EXTRA_TEXT = 256


class SpaceType(StrEnum):
    L2 = "l2"
    INNER_PRODUCT = "innerproduct"
    HAMMING = "hamming"


class AlgorithmParameters(BaseModel):
    # Future client versions send more keys: keep them, build with the known ones. Their
    # values are scalars: anything nested is refused (422) before it is stored.
    model_config = ConfigDict(extra="allow")

    # Faiss's HNSW with M = 1 divides by log(1) and writes out of bounds on the first add
    # (a SIGSEGV), though the k-NN mapping allows any m > 0: refuse it here.
    m: int = Field(
        default=16,
        ge=2,
        le=512,
        description="HNSW links per vector on the upper levels (twice as many on level 0)",
    )
    ef_construction: int = Field(
        default=100, gt=0, le=INT32_MAX, description="HNSW beam width while building"
    )
    ef_search: int = Field(
        default=100,
        gt=0,
        le=INT32_MAX,
        description="HNSW beam width stored in the index for searches (and the quality check)",
    )

    @model_validator(mode="before")
    @classmethod
    def _scalar_extras(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        extras = {k: v for k, v in data.items() if k not in cls.model_fields}
        if len(extras) > MAX_EXTRA_PARAMETERS:
            raise ValueError(
                f"at most {MAX_EXTRA_PARAMETERS} unknown algorithm_parameters are kept, "
                f"got {len(extras)}"
            )
        for key, value in extras.items():
            if not isinstance(value, (bool, int, float, str, type(None))):
                raise ValueError(
                    f"unknown algorithm parameter {key!r} must be a number, string, boolean or "
                    f"null, got {type(value).__name__}"
                )
            if isinstance(value, str) and len(value) > MAX_EXTRA_TEXT:
                raise ValueError(
                    f"unknown algorithm parameter {key!r} is longer than {MAX_EXTRA_TEXT} "
                    "characters"
                )
        return data


class IndexParameters(BaseModel):
    space_type: SpaceType = Field(
        default=SpaceType.L2,
        description="l2 or innerproduct for float, half_float and byte data (cosine arrives as "
        "innerproduct over normalized vectors); hamming for binary data, and its default there",
    )
    algorithm: Literal["hnsw"] = "hnsw"
    algorithm_parameters: AlgorithmParameters = Field(default_factory=AlgorithmParameters)

    @field_validator("space_type", mode="before")
    @classmethod
    def _space_type_known(cls, value: Any) -> Any:
        # The reference service fell back to L2 on unknown names; say so instead.
        if isinstance(value, str) and value not in {s.value for s in SpaceType}:
            raise ValueError(
                f"unknown space_type {value!r}: use one of l2, innerproduct, hamming "
                "(cosine is sent as innerproduct over normalized vectors)"
            )
        return value


def _check_text(field: str, value: str) -> str:
    # JSON may escape lone surrogates ("\\ud800"): valid JSON, but no UTF-8 exists for
    # them, so hashing the job id or addressing S3 would fail later.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def _check_key(field: str, key: str, suffix: str) -> str:
    _check_text(field, key)
    if not key.endswith(suffix) or len(key) <= len(suffix):
        raise ValueError(f"{field} must be an object key ending in {suffix!r}, got {key!r}")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"{field} is longer than S3's {MAX_KEY_BYTES}-byte key limit")
    if "\x00" in key:
        raise ValueError(f"{field} must not contain NUL characters")
    if any(segment in (".", "..") for segment in key.split("/")):
        # S3 keeps them literally, but servers and proxies that normalize URLs would
        # resolve them into another key or even another bucket (path-style addressing).
        raise ValueError(f"{field} must not contain '.' or '..' path segments, got {key!r}")
    return key


class BuildRequest(BaseModel):
    """One segment to index. Field names are the wire names of the k-NN client."""

    repository_type: Literal["s3"] = Field(description="always s3")
    container_name: str = Field(
        min_length=1,
        max_length=255,
        json_schema_extra={"pattern": BUCKET_PATTERN},
        description="the bucket of the cluster's snapshot repository holding both blobs; the "
        "index is written there too",
    )
    # The schema documents the suffix; the validators below say what is wrong.
    vector_path: str = Field(
        json_schema_extra={"pattern": r"^.+\.knnvec$"},
        description="key of the vector blob; the index key is this with .faiss for .knnvec",
    )
    doc_id_path: str = Field(
        json_schema_extra={"pattern": r"^.+\.knndid$"},
        description="key of the doc id blob: one little-endian int32 per vector, strictly "
        "increasing",
    )
    tenant_id: str = Field(
        default="", description="the cluster name; with vector_path it names the job"
    )
    dimension: int = Field(
        gt=0,
        le=65536,
        description="values per vector; for binary data it counts bits (a multiple of 8)",
    )
    doc_count: int = Field(gt=4, le=2**31 - 1, description="vectors in the blob")
    data_type: DataType = Field(
        default=DataType.FLOAT,
        description="float (fp32), half_float (fp32 or fp16 blob, stored as fp16), byte "
        "(int8) or binary (packed bits)",
    )
    engine: Literal["faiss"] = "faiss"
    index_parameters: IndexParameters = Field(default_factory=IndexParameters)
    skip_stored_vectors: bool = Field(
        default=False,
        description="write the HNSW graph without the vectors (float and half_float; the data "
        "node brings its own quantized vectors)",
    )

    @model_validator(mode="before")
    @classmethod
    def _binary_defaults_to_hamming(cls, data: Any) -> Any:
        # The one space binary data can be searched in, as the k-NN client sends it.
        if isinstance(data, dict) and data.get("data_type") == DataType.BINARY.value:
            params = data.get("index_parameters")
            if params is None:
                return {**data, "index_parameters": {"space_type": SpaceType.HAMMING.value}}
            if isinstance(params, dict) and "space_type" not in params:
                params = {**params, "space_type": SpaceType.HAMMING.value}
                return {**data, "index_parameters": params}
        return data

    @field_validator("tenant_id")
    @classmethod
    def _tenant_id(cls, value: str) -> str:
        return _check_text("tenant_id", value)

    @field_validator("container_name")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET.fullmatch(value):
            raise ValueError(
                "container_name must be an S3 bucket name: letters, digits, '.', '-' and "
                f"'_', starting and ending with a letter or digit; got {value!r}"
            )
        return value

    @field_validator("vector_path")
    @classmethod
    def _vector_path(cls, value: str) -> str:
        return _check_key("vector_path", value, VECTOR_SUFFIX)

    @field_validator("doc_id_path")
    @classmethod
    def _doc_id_path(cls, value: str) -> str:
        return _check_key("doc_id_path", value, DOC_ID_SUFFIX)

    @model_validator(mode="after")
    def _buildable(self) -> BuildRequest:
        space = self.index_parameters.space_type
        if self.data_type.spec.packed_bits:
            if self.dimension % 8:
                raise ValueError(
                    f"dimension counts bits for data_type binary and must be a multiple of 8, "
                    f"got {self.dimension}"
                )
            if space is not SpaceType.HAMMING:
                raise ValueError(f"data_type binary needs space_type hamming, got {space.value}")
            if self.skip_stored_vectors:
                raise ValueError(
                    "skip_stored_vectors is not supported for data_type binary "
                    "(the client sends it only for float and half_float fields)"
                )
        elif space is SpaceType.HAMMING:
            raise ValueError(
                f"space_type hamming needs data_type binary, got {self.data_type.value}"
            )
        return self

    # Derived facts the stages share.
    @property
    def space_type(self) -> SpaceType:
        return self.index_parameters.space_type

    @property
    def m(self) -> int:
        return self.index_parameters.algorithm_parameters.m

    @property
    def ef_construction(self) -> int:
        return self.index_parameters.algorithm_parameters.ef_construction

    @property
    def ef_search(self) -> int:
        return self.index_parameters.algorithm_parameters.ef_search

    @property
    def row_bytes(self) -> int:
        """Bytes of one row in the vector blob (binary: ``dimension`` bits, a multiple of 8)."""
        return int(self.dimension * self.data_type.spec.blob_bytes_per_dimension)

    @property
    def vector_blob_bytes(self) -> int:
        return self.doc_count * self.row_bytes

    @property
    def doc_id_blob_bytes(self) -> int:
        return self.doc_count * 4

    @property
    def index_key(self) -> str:
        """``vector_path`` with its last ``.knnvec`` replaced by ``.faiss``."""
        return self.vector_path[: -len(VECTOR_SUFFIX)] + INDEX_SUFFIX

    @property
    def index_file_name(self) -> str:
        return posixpath.basename(self.index_key)

    @property
    def job_id(self) -> str:
        """Stable id: the same tenant and vector path always map to the same job."""
        digest = hashlib.sha256(f"{self.tenant_id}\x00{self.vector_path}".encode()).hexdigest()
        return digest[:32]

    @property
    def fingerprint(self) -> str:
        """What must match for a repeated request to be the same job."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def parse_request(body: dict[str, Any]) -> BuildRequest:
    """Validate a request body outside FastAPI (CLI, library), with typed errors."""
    try:
        return BuildRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {problem_message(err)}"
            for err in exc.errors()
        )
        raise InvalidRequestError(f"invalid build request: {problems}") from exc
