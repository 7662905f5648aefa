"""Bad input through the real service: malformed blobs, hostile paths, hostile strings.

Every case ends in a completed index or a clear ``FAILED_INDEX_BUILD`` message
(or a 422 naming the field), never a crash, a hang or a 5xx; the service stays
healthy. Hostile paths run in ``disk`` mode with the temp directory under the
test's control, and through a (fault-free) ``FaultProxy`` that records every
request the service sends to S3: all of them must address the requested bucket.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.core import index_io
from remote_vector_index_builder.core.object_store import S3ObjectStore
from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client
from test_remote_vector_index_builder.support import build_body, wait_idle, wait_terminal
from testbed.data import clustered, doc_id_blob, vector_blob
from testbed.faultproxy import FaultProxy

FAST = {"space_type": "l2", "algorithm_parameters": {"m": 8, "ef_construction": 32}}
N, DIM = 200, 8


def put(s3_client: Any, bucket: str, key: str, data: bytes) -> None:
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)


def keys(s3_client: Any, bucket: str) -> set[str]:
    listing = s3_client.list_objects_v2(Bucket=bucket)
    return {item["Key"] for item in listing.get("Contents", [])}


def assert_idle(client: TestClient) -> None:
    """No build left and nothing reserved: a hostile input leaked no memory."""
    wait_idle(client)
    beat = client.get("/_heart_beat").json()
    assert beat["jobs_in_flight"] == 0 and beat["memory"]["host_reserved_bytes"] == 0


# --------------------------------------------------------------------------------------
# Malformed blobs
# --------------------------------------------------------------------------------------


def _vectors() -> np.ndarray:
    return clustered(N, DIM, seed=3)


def _ids() -> np.ndarray:
    return np.arange(N, dtype=np.int32) * 2 + 1


def _with(value: float, row: int = 7, column: int = 3) -> bytes:
    vectors = _vectors()
    vectors[row, column] = value
    return vector_blob(vectors)


@dataclass(frozen=True)
class Blob:
    name: str
    vectors: Callable[[], bytes]
    ids: Callable[[], bytes]
    # None: the build completes; otherwise fragments of the FAILED message.
    message: tuple[str, ...] | None
    data_type: str = "float"
    doc_count: int = N
    expect_ids: Callable[[], np.ndarray] | None = None


VECTOR_BYTES = N * DIM * 4
KEY = "idx/u1_vectors/r_f_0"
BLOBS = [
    Blob(
        "vectors-one-row-short",
        lambda: vector_blob(_vectors()[:-1]),
        lambda: doc_id_blob(_ids()),
        (
            f"vector object '{KEY}.knnvec' holds {VECTOR_BYTES - DIM * 4} bytes, "
            f"expected {VECTOR_BYTES} (doc_count {N} x dimension {DIM} x 4 bytes)",
            "check dimension, doc_count and data_type",
        ),
    ),
    Blob(
        "vectors-with-trailing-bytes",
        lambda: vector_blob(_vectors()) + b"\0\0",
        lambda: doc_id_blob(_ids()),
        (f"holds {VECTOR_BYTES + 2} bytes, expected {VECTOR_BYTES}",),
    ),
    Blob(
        "empty-vector-blob",
        lambda: b"",
        lambda: doc_id_blob(_ids()),
        (f"vector object '{KEY}.knnvec' holds 0 bytes, expected {VECTOR_BYTES}",),
    ),
    Blob(
        "doc-ids-odd-length",
        lambda: vector_blob(_vectors()),
        lambda: doc_id_blob(_ids()) + b"\x07\x00",
        (
            f"doc id object '{KEY}.knndid' holds {N * 4 + 2} bytes, expected {N * 4} "
            f"(doc_count {N} x 4 bytes)",
        ),
    ),
    Blob(
        "nan",
        lambda: _with(float("nan")),
        lambda: doc_id_blob(_ids()),
        ("vector at row 7 (doc id 15) holds NaN or infinity",),
    ),
    Blob(
        "infinity",
        lambda: _with(float("-inf"), row=0),
        lambda: doc_id_blob(_ids()),
        ("vector at row 0 (doc id 1) holds NaN or infinity",),
    ),
    Blob(
        "beyond-fp16-for-half-float",
        lambda: _with(70000.0, row=199),
        lambda: doc_id_blob(_ids()),
        ("vector at row 199 (doc id 399) has a value beyond the fp16 range (+-65504)",),
        data_type="half_float",
    ),
    # The same values are fine for float: fp32 holds them.
    Blob("beyond-fp16-for-float", lambda: _with(70000.0), lambda: doc_id_blob(_ids()), None),
    # Lucene doc ids of one segment: non-negative and strictly increasing. Anything else is
    # not what a data node sends, and an id map over it would answer wrong documents.
    Blob(
        "non-increasing-doc-ids",
        lambda: vector_blob(_vectors()),
        lambda: doc_id_blob(_ids()[::-1].copy()),
        (f"doc id object '{KEY}.knndid' is not strictly increasing: row 1 holds 397 after 399",),
    ),
    Blob(
        "duplicate-doc-ids",
        lambda: vector_blob(_vectors()),
        lambda: doc_id_blob(np.repeat(_ids()[: N // 2], 2)),
        ("is not strictly increasing: row 1 holds 1 after 1",),
    ),
    Blob(
        "negative-doc-ids",
        lambda: vector_blob(_vectors()),
        lambda: doc_id_blob(np.full(N, -3, dtype=np.int32)),
        (f"doc id object '{KEY}.knndid' holds a negative doc id (-3) at row 0",),
    ),
    # half_float as fp16 (2 bytes a value), told apart from fp32 by the object's size.
    Blob(
        "half-float-as-fp16",
        lambda: _vectors().astype("<f2").tobytes(),
        lambda: doc_id_blob(_ids()),
        None,
        data_type="half_float",
        expect_ids=lambda: _ids().astype(np.int64),
    ),
    Blob(
        "half-float-of-neither-width",
        lambda: b"\0" * (N * DIM * 3),
        lambda: doc_id_blob(_ids()),
        (
            f"holds {N * DIM * 3} bytes, expected {VECTOR_BYTES} (doc_count {N} x dimension "
            f"{DIM} x 4 bytes, fp32) or {N * DIM * 2} (doc_count {N} x dimension {DIM} x 2 "
            "bytes, fp16)",
        ),
        data_type="half_float",
    ),
    Blob(
        "all-identical-vectors",
        lambda: vector_blob(np.ones((N, DIM), dtype=np.float32)),
        lambda: doc_id_blob(_ids()),
        None,
    ),
    Blob(
        "doc-count-5",
        lambda: vector_blob(_vectors()[:5]),
        lambda: doc_id_blob(_ids()[:5]),
        None,
        doc_count=5,
    ),
]


@pytest.mark.parametrize("blob", BLOBS, ids=lambda blob: blob.name)
def test_malformed_blob(
    blob: Blob, service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    client = service()
    put(s3_client, bucket, f"{KEY}.knnvec", blob.vectors())
    put(s3_client, bucket, f"{KEY}.knndid", blob.ids())
    body = build_body(
        bucket, KEY, DIM, blob.doc_count, data_type=blob.data_type, index_parameters=FAST
    )
    job_id = client.post("/_build", json=body).json()["job_id"]
    status = wait_terminal(client, job_id)
    if blob.message is None:
        assert status["task_status"] == "COMPLETED_INDEX_BUILD", status
        raw = s3_client.get_object(Bucket=bucket, Key=f"{KEY}.faiss")["Body"].read()
        index = index_io.read(raw)
        assert index.ntotal == blob.doc_count
        if blob.expect_ids is not None:
            np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), blob.expect_ids())
        _, found = index.search(np.ones((1, DIM), dtype=np.float32), 1)
        assert found[0, 0] != -1
    else:
        assert status["task_status"] == "FAILED_INDEX_BUILD", status
        for fragment in blob.message:
            assert fragment in status["error_message"]
        assert f"{KEY}.faiss" not in keys(s3_client, bucket)
    assert_idle(client)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"dimension": 12, "data_type": "binary"}, "body", "multiple of 8"),
        ({"doc_count": 4}, "doc_count", "greater than 4"),
        ({"doc_count": 2**31}, "doc_count", "less than or equal to 2147483647"),
        (
            {"index_parameters": {"algorithm_parameters": {"ef_construction": 2**31}}},
            "index_parameters.algorithm_parameters.ef_construction",
            "less than or equal to 2147483647",
        ),
        ({"tenant_id": "\ud800"}, "tenant_id", "lone surrogate"),
        ({"vector_path": "idx/\udfff.knnvec"}, "vector_path", "lone surrogate"),
        ({"container_name": ".."}, "container_name", "S3 bucket name"),
        ({"container_name": "a/b"}, "container_name", "S3 bucket name"),
        ({"vector_path": "a" * 1018 + ".knnvec"}, "vector_path", "1024-byte key limit"),
        ({"vector_path": "é" * 509 + ".knnvec"}, "vector_path", "1024-byte key limit"),
        ({"vector_path": "../other/x.knnvec"}, "vector_path", "'..' path segments"),
        ({"doc_id_path": "idx/./x.knndid"}, "doc_id_path", "'..' path segments"),
        ({"vector_path": "x.knnvec\n"}, "vector_path", "ending in '.knnvec'"),
        ({"vector_path": "x\x00.knnvec"}, "vector_path", "NUL"),
    ],
)
def test_invalid_requests_get_422_naming_the_field(
    change: dict[str, Any], field: str, message: str, service: Callable[..., TestClient]
) -> None:
    client = service()
    body = {**build_body("bucket", "idx/x", 16, 300), **change}
    # json.dumps escapes lone surrogates (\ud800), as any JSON encoder may send them.
    response = client.post(
        "/_build", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(p["field"] == field and message in p["message"] for p in problems), problems
    assert client.get("/_jobs").json() == {}


@pytest.mark.parametrize("content", [b"{not json", b'{"dimension": 16,', b"\xff\xfe"])
def test_a_body_that_is_not_json_gets_400(
    content: bytes, service: Callable[..., TestClient]
) -> None:
    client = service()
    response = client.post("/_build", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "not valid JSON" in detail
    assert client.get("/_jobs").json() == {}


# --------------------------------------------------------------------------------------
# Hostile paths: only the requested bucket and the temp directory are touched
# --------------------------------------------------------------------------------------


@pytest.fixture
def recording(s3_server: str, s3_config: S3Config) -> Iterator[tuple[FaultProxy, S3ObjectStore]]:
    with FaultProxy(s3_server) as proxy:
        config = s3_config.model_copy(update={"endpoint_url": proxy.url})
        yield proxy, S3ObjectStore(make_s3_client(config), config)


HOSTILE_STEMS = [
    "/abs/idx/seg_0",  # a leading slash: an S3 key like any other
    "//double//slashes/seg",
    "..\\..\\windows\\seg",  # backslashes are not separators in S3
    "%2e%2e/%2E%2E/escaped/seg",  # percent signs are literal, sent as %25
    "idx/ünïcødé 😀/سلام/段 0?x=1#frag&y;z",
    "idx/ends-with-dots../.hidden/...",
    "k/" + "ü" * 506 + "/s",  # 1,023 of S3's 1,024 bytes with the .knnvec suffix
]


@pytest.mark.parametrize("stem", HOSTILE_STEMS, ids=range(len(HOSTILE_STEMS)))
def test_hostile_paths_stay_in_the_bucket_and_temp_dir(
    stem: str,
    service: Callable[..., TestClient],
    recording: tuple[FaultProxy, S3ObjectStore],
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    proxy, store = recording
    # A neighbour bucket whose keys an escaping path would reach.
    neighbour = f"{bucket}-x"
    s3_client.create_bucket(Bucket=neighbour)
    put(s3_client, neighbour, "windows/seg.knnvec", b"not yours")
    before = keys(s3_client, neighbour)
    client = service(store=store, index_serialization_mode="disk", tmp_dir=tmp_path)
    vectors = clustered(N, DIM, seed=5)
    put(s3_client, bucket, f"{stem}.knnvec", vector_blob(vectors))
    put(s3_client, bucket, f"{stem}.knndid", doc_id_blob(_ids()))
    proxy.clear()

    body = build_body(bucket, stem, DIM, N, index_parameters=FAST)
    job_id = client.post("/_build", json=body).json()["job_id"]
    status = wait_terminal(client, job_id)

    assert status["task_status"] == "COMPLETED_INDEX_BUILD", status
    assert status["file_name"] == f"{stem}.faiss".rsplit("/", 1)[-1]
    assert keys(s3_client, bucket) == {f"{stem}.knnvec", f"{stem}.knndid", f"{stem}.faiss"}
    assert keys(s3_client, neighbour) == before
    # Every request the service sent addressed this bucket (path-style: /<bucket>/...),
    # the listings of other attempts' uploads too (first and last), by exactly the index key.
    listings = [s for s in proxy.seen if "?uploads" in s.target]
    assert [proxy.seen[0], proxy.seen[-1]] == listings
    assert all(s.target.startswith(f"/{bucket}/") for s in proxy.seen[1:-1])
    for seen in listings:
        listing = urlsplit(seen.target)
        assert listing.path == f"/{bucket}"
        assert parse_qs(listing.query)["prefix"] == [f"{stem}.faiss"]
    assert list(tmp_path.iterdir()) == []
    assert_idle(client)


@pytest.mark.parametrize("width", ["<f4", "<f2"])
def test_half_float_without_stored_vectors_at_either_width(
    width: str, service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    # The native half_float field at 16x compression arrives with skip_stored_vectors.
    client = service()
    put(s3_client, bucket, f"{KEY}.knnvec", _vectors().astype(width).tobytes())
    put(s3_client, bucket, f"{KEY}.knndid", doc_id_blob(_ids()))
    body = build_body(
        bucket, KEY, DIM, N, data_type="half_float", index_parameters=FAST, skip_stored_vectors=True
    )
    status = wait_terminal(client, client.post("/_build", json=body).json()["job_id"])
    assert status["task_status"] == "COMPLETED_INDEX_BUILD", status
    raw = s3_client.get_object(Bucket=bucket, Key=f"{KEY}.faiss")["Body"].read()
    assert (raw[:4], raw[37:41]) == (b"IxMp", b"IHc2") and b"null" in raw
    assert_idle(client)
