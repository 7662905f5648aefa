from __future__ import annotations

from typing import Any

import pytest

from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.errors import InvalidRequestError
from remote_vector_index_builder.core.params import BuildRequest, SpaceType, parse_request
from test_remote_vector_index_builder.support import required_body


def body(**overrides: Any) -> dict[str, Any]:
    return required_body("bucket", "idx/uuid_vectors/abc_my.field_0", 768, 1000, **overrides)


def test_defaults_follow_the_knn_contract() -> None:
    # docs/knn-contract.md, section 1
    request = parse_request(body())
    assert request.tenant_id == ""
    assert request.data_type is DataType.FLOAT
    assert request.engine == "faiss"
    assert request.space_type is SpaceType.L2
    assert request.index_parameters.algorithm == "hnsw"
    assert (request.m, request.ef_construction, request.ef_search) == (16, 100, 100)
    assert request.skip_stored_vectors is False


def test_index_key_replaces_only_the_last_suffix() -> None:
    request = parse_request(body(vector_path="a.knnvec/b_field.knnvec_0.knnvec"))
    assert request.index_key == "a.knnvec/b_field.knnvec_0.faiss"
    assert request.index_file_name == "b_field.knnvec_0.faiss"


def test_numbers_as_strings_and_unknown_algorithm_keys_are_accepted() -> None:
    request = parse_request(
        body(
            dimension="768",
            doc_count="1000",
            index_parameters={
                "space_type": "innerproduct",
                "algorithm_parameters": {"m": "32", "ef_construction": 64, "future_knob": 3},
            },
        )
    )
    assert request.dimension == 768 and request.m == 32 and request.ef_construction == 64
    assert request.index_parameters.algorithm_parameters.model_extra == {"future_knob": 3}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"vector_path": "idx/seg.vec"}, "vector_path must be an object key ending in '.knnvec'"),
        ({"doc_id_path": "idx/seg.ids"}, "doc_id_path must be an object key ending in '.knndid'"),
        ({"doc_count": 4}, "doc_count: Input should be greater than 4"),
        ({"dimension": 0}, "dimension: Input should be greater than 0"),
        ({"dimension": -3}, "dimension: Input should be greater than 0"),
        (
            {"data_type": "binary", "dimension": 12, "index_parameters": {"space_type": "hamming"}},
            "multiple of 8",
        ),
        (
            {"data_type": "binary", "index_parameters": {"space_type": "l2"}},
            "data_type binary needs space_type hamming",
        ),
        ({"index_parameters": {"space_type": "hamming"}}, "hamming needs data_type binary"),
        ({"index_parameters": {"space_type": "cosinesimil"}}, "unknown space_type 'cosinesimil'"),
        ({"index_parameters": {"algorithm_parameters": {"m": 0}}}, "m: Input should be greater"),
        # Faiss's HNSW crashes the process on M = 1 (issue 16, item 1).
        (
            {"index_parameters": {"algorithm_parameters": {"m": 1}}},
            "m: Input should be greater than or equal to 2",
        ),
        (
            {"index_parameters": {"algorithm_parameters": {"future": {"nested": [1]}}}},
            "unknown algorithm parameter 'future' must be a number, string, boolean or null",
        ),
        (
            {"index_parameters": {"algorithm_parameters": {"future": "x" * 300}}},
            "unknown algorithm parameter 'future' is longer than 256 characters",
        ),
        (
            {"index_parameters": {"algorithm_parameters": {f"k{i}": i for i in range(33)}}},
            "at most 32 unknown algorithm_parameters are kept, got 33",
        ),
        (
            {"index_parameters": {"algorithm_parameters": {"ef_search": -1}}},
            "ef_search: Input should be greater",
        ),
        ({"repository_type": "gcs"}, "repository_type"),
        ({"engine": "nmslib"}, "engine"),
        ({"data_type": "double"}, "data_type"),
        (
            {
                "data_type": "binary",
                "dimension": 64,
                "skip_stored_vectors": True,
                "index_parameters": {"space_type": "hamming"},
            },
            "skip_stored_vectors is not supported for data_type binary",
        ),
        ({"vector_path": "a" * 1100 + ".knnvec"}, "1024-byte key limit"),
    ],
)
def test_unbuildable_requests_name_the_field(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(body(**overrides))
    assert expected in str(info.value)
    assert "Value error" not in str(info.value)  # pydantic's prefix of a validator's words


def test_binary_defaults_to_hamming_as_the_cli_does() -> None:
    binary = {"data_type": "binary", "dimension": 64}
    assert parse_request(body(**binary)).space_type is SpaceType.HAMMING
    with_m = body(**binary, index_parameters={"algorithm_parameters": {"m": 8}})
    assert parse_request(with_m).space_type is SpaceType.HAMMING
    assert parse_request(with_m).m == 8
    assert parse_request(body()).space_type is SpaceType.L2


def test_unknown_scalar_parameters_are_kept_and_fingerprinted() -> None:
    extras = {"future_flag": True, "future_ratio": 0.5, "future_name": "x", "future_none": None}
    request = parse_request(body(index_parameters={"algorithm_parameters": extras}))
    assert request.index_parameters.algorithm_parameters.model_extra == extras
    # A stored request reads back (the fleet stores and re-parses them).
    assert BuildRequest.model_validate_json(request.model_dump_json()) == request


@pytest.mark.parametrize("data_type", ["float", "half_float", "byte"])
def test_skip_stored_vectors_for_every_float_like_type(data_type: str) -> None:
    assert parse_request(body(data_type=data_type, skip_stored_vectors=True)).skip_stored_vectors


def test_the_schema_describes_the_fields() -> None:
    properties = BuildRequest.model_json_schema()["properties"]
    assert "counts bits" in properties["dimension"]["description"]
    undescribed = sorted(
        name
        for name, schema in properties.items()
        if "description" not in schema and name not in ("engine", "index_parameters")
    )
    assert undescribed == []


def test_job_id_depends_on_tenant_and_path_only() -> None:
    a = parse_request(body())
    assert a.job_id == parse_request(body(dimension=128)).job_id
    assert a.job_id != parse_request(body(tenant_id="other-cluster")).job_id
    assert a.fingerprint != parse_request(body(dimension=128)).fingerprint


def test_sizes() -> None:
    assert parse_request(body()).vector_blob_bytes == 1000 * 768 * 4
    assert parse_request(body(data_type="half_float")).vector_blob_bytes == 1000 * 768 * 4
    assert parse_request(body(data_type="byte")).vector_blob_bytes == 1000 * 768
    binary = BuildRequest.model_validate(
        body(data_type="binary", dimension=256, index_parameters={"space_type": "hamming"})
    )
    assert binary.vector_blob_bytes == 1000 * 32
    assert binary.doc_id_blob_bytes == 4000
