"""The ``POST /_build`` body, with the wire names and defaults of the k-NN client.

Validation rejects what cannot be built and says which field and why. Numbers
sent as strings ("768") are accepted (pydantic's lax mode), as are unknown keys
inside ``algorithm_parameters`` (future client versions add some).
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
from remote_vector_index_builder.core.errors import InvalidRequestError

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


class SpaceType(StrEnum):
    L2 = "l2"
    INNER_PRODUCT = "innerproduct"
    HAMMING = "hamming"


class AlgorithmParameters(BaseModel):
    # Future client versions send more keys: keep them, build with the known ones.
    model_config = ConfigDict(extra="allow")

    m: int = Field(default=16, gt=0, le=512)
    ef_construction: int = Field(default=100, gt=0, le=INT32_MAX)
    ef_search: int = Field(default=100, gt=0, le=INT32_MAX)


class IndexParameters(BaseModel):
    space_type: SpaceType = SpaceType.L2
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

    repository_type: Literal["s3"]
    container_name: str = Field(
        min_length=1, max_length=255, json_schema_extra={"pattern": BUCKET_PATTERN}
    )
    # The schema documents the suffix; the validators below say what is wrong.
    vector_path: str = Field(json_schema_extra={"pattern": r"^.+\.knnvec$"})
    doc_id_path: str = Field(json_schema_extra={"pattern": r"^.+\.knndid$"})
    tenant_id: str = ""
    dimension: int = Field(gt=0, le=65536)
    doc_count: int = Field(gt=4, le=2**31 - 1)
    data_type: DataType = DataType.FLOAT
    engine: Literal["faiss"] = "faiss"
    index_parameters: IndexParameters = Field(default_factory=IndexParameters)
    skip_stored_vectors: bool = False

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
                    "(the client sends it only for float fields)"
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
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidRequestError(f"invalid build request: {problems}") from exc
