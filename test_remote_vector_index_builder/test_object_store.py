from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore
import numpy as np
import pytest
from pydantic import ValidationError
from zlib_ng import zlib_ng

from remote_vector_index_builder.core import multipart, streaming_upload
from remote_vector_index_builder.core.checksums import RangeCrcs, crc32_b64, plan_ranges
from remote_vector_index_builder.core.dataset import _mapping_of
from remote_vector_index_builder.core.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CancelledError,
    DatasetError,
    IntegrityError,
    ObjectNotFoundError,
    ObjectStoreError,
    TransientStoreError,
)
from remote_vector_index_builder.core.object_store import ObjectStore, S3ObjectStore
from remote_vector_index_builder.core.options import GIB, MIB
from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client
from testbed.faultproxy import Fault, FaultProxy

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

PART = 5 * MIB


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def upload_bytes(store: ObjectStore, bucket: str, key: str, data: bytes, **kwargs: Any) -> None:
    # Uneven writes so part boundaries fall inside a write.
    chunk = 3 * MIB + 1
    with store.open_upload(bucket, key, **kwargs) as upload:
        for start in range(0, len(data), chunk):
            upload.write(data[start : start + chunk])
    assert upload.bytes_written == len(data)


def no_object(client: S3Client, bucket: str, key: str) -> bool:
    return not client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents")


def no_multipart_uploads(client: S3Client, bucket: str) -> bool:
    return not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize("size", [0, 1, PART, 2 * PART + 2 * MIB + 3])
def test_round_trip(object_store: S3ObjectStore, s3_client: S3Client, bucket: str, size: int):
    data = random_bytes(size, seed=size)
    sent: list[int] = []
    upload_bytes(object_store, bucket, "blob.knnvec", data, progress=sent.append)
    received: list[int] = []

    blob = object_store.download(
        bucket, "blob.knnvec", expected_size=size, progress=received.append
    )

    assert blob.dtype == np.uint8 and blob.shape == (size,)
    assert blob.flags.writeable
    # One buffer of its own: an anonymous mapping whose pages the builder can release.
    assert size == 0 or _mapping_of(blob)[0] is not None
    assert blob.tobytes() == data
    assert sum(sent) == sum(received) == size
    assert no_multipart_uploads(s3_client, bucket)
    head = s3_client.head_object(Bucket=bucket, Key="blob.knnvec", ChecksumMode="ENABLED")
    assert head["ContentLength"] == size
    assert head.get("ChecksumCRC32")
    # Up to one part is a single PUT; more is a multipart upload of ceil(size / part) parts.
    parts = -(-size // PART)
    assert head["ETag"].endswith(f'-{parts}"') == (parts > 1)


def test_upload_file_round_trips_without_reading_the_whole_file(
    object_store: S3ObjectStore, bucket: str, tmp_path: Path
):
    data = random_bytes(2 * PART + MIB + 5)
    path = tmp_path / "index.faiss"
    path.write_bytes(data)
    sent: list[int] = []

    assert object_store.upload_file(bucket, "index.faiss", path, progress=sent.append) == len(data)

    assert sum(sent) == len(data)
    assert object_store.download(bucket, "index.faiss").tobytes() == data


def test_write_accepts_any_contiguous_buffer(object_store: S3ObjectStore, bucket: str):
    vectors = np.arange(12, dtype="<f4")
    with object_store.open_upload(bucket, "v") as upload:
        assert upload.write(vectors.data) == vectors.nbytes
        upload.write(bytearray(b"tail"))
    assert object_store.download(bucket, "v").tobytes() == vectors.tobytes() + b"tail"


def test_part_size_grows_for_long_streams(
    object_store: S3ObjectStore, bucket: str, monkeypatch: pytest.MonkeyPatch
):
    # Every 2 parts the part size doubles: 5, 5, 10, 10, 20 MiB (+1 byte for a 6th).
    monkeypatch.setattr(streaming_upload, "_PARTS_PER_SIZE_STEP", 2)
    data = random_bytes(50 * MIB + 1)
    upload_bytes(object_store, bucket, "big", data)
    head = object_store.head(bucket, "big")
    assert head.etag.endswith('-6"')
    assert object_store.download(bucket, "big").tobytes() == data


def test_parts_follow_the_expected_size():
    plan = multipart.UploadPlan.of(S3Config())  # 25 connections, 16 MiB parts
    assert (plan.first_part(None), plan.in_flight(None)) == (16 * MIB, 25)
    # Parts of an eighth of the object, at least 5 MiB; a quarter of it in flight.
    assert (plan.first_part(24 * MIB), plan.in_flight(24 * MIB)) == (5 * MIB, 1)
    assert (plan.first_part(96 * MIB), plan.in_flight(96 * MIB)) == (12 * MIB, 2)
    assert (plan.first_part(4 * GIB), plan.in_flight(4 * GIB)) == (16 * MIB, 25)
    assert plan.buffer_bytes(96 * MIB) == 3 * 12 * MIB


@pytest.mark.parametrize(("size_hint", "most"), [(12 * PART, 3), (None, 6)])
def test_an_upload_of_known_size_keeps_a_quarter_in_flight(
    s3_config: S3Config, s3_client: S3Client, bucket: str, size_hint: int | None, most: int
):
    config = s3_config.model_copy(update={"part_size": PART, "throughput_target_gbps": 2.4})
    store = S3ObjectStore(s3_client, config)
    lock, in_flight, seen = threading.Lock(), [0], [0]
    release = threading.Event()

    def started(**_: Any) -> None:
        with lock:
            in_flight[0] += 1
            seen[0] = max(seen[0], in_flight[0])
        release.wait(0.3)  # hold the part so the writer fills every free slot

    def finished(**_: Any) -> None:
        with lock:
            in_flight[0] -= 1

    events = s3_client.meta.events
    events.register("before-call.s3.UploadPart", started)
    events.register("after-call.s3.UploadPart", finished)
    try:
        data = random_bytes(12 * PART)
        upload_bytes(store, bucket, "k", data, size_hint=size_hint)
    finally:
        events.unregister("before-call.s3.UploadPart", started)
        events.unregister("after-call.s3.UploadPart", finished)
    assert seen[0] == most  # concurrency is 6 at 2.4 Gbit/s
    assert store.download(bucket, "k").tobytes() == data


def test_upload_close_is_idempotent_and_abort_after_close_keeps_the_object(
    object_store: S3ObjectStore, bucket: str
):
    upload = object_store.open_upload(bucket, "k")
    upload.write(b"abc")
    upload.close()
    upload.close()
    upload.abort()
    assert object_store.download(bucket, "k").tobytes() == b"abc"
    with pytest.raises(ObjectStoreError, match="after close"):
        upload.write(b"more")


def test_part_size_limits():
    for bad in (4 * MIB, 6 * GIB):
        with pytest.raises(ValidationError) as caught:
            S3Config(part_size=bad)
        assert "5 MiB" in str(caught.value) and "5 GiB" in str(caught.value)
    assert S3Config(part_size=5 * MIB).part_size == 5 * MIB
    assert S3Config(part_size=5 * GIB).part_size == 5 * GIB


def test_concurrency_follows_throughput_target():
    assert S3Config().concurrency == 25  # 10 Gbit/s at 0.4 Gbit/s per connection
    assert S3Config(throughput_target_gbps=1.0).concurrency == 3
    assert S3Config(throughput_target_gbps=0.01).concurrency == 2
    assert S3Config(throughput_target_gbps=400).concurrency == 64
    with pytest.raises(ValidationError):
        S3Config(throughput_target_gbps=0)


def test_client_config(s3_config: S3Config):
    # botocore-stubs declare none of Config's attributes.
    config: Any = make_s3_client(s3_config).meta.config
    assert config.s3 is not None and config.s3["addressing_style"] == "path"
    # S3ObjectStore._call retries; botocore makes one attempt, so the two never multiply.
    assert config.retries == {"mode": "standard", "total_max_attempts": 1}
    assert config.max_pool_connections is not None
    assert config.max_pool_connections >= s3_config.concurrency
    assert (config.connect_timeout, config.read_timeout) == (5.0, 30.0)
    assert config.tcp_keepalive


def test_unsigned_client_sends_no_signature(s3_config: S3Config, s3_client: S3Client, bucket: str):
    s3_client.put_object(Bucket=bucket, Key="public", Body=b"open data", ACL="public-read")
    s3_client.put_object(Bucket=bucket, Key="private", Body=b"secret")
    client = make_s3_client(s3_config.model_copy(update={"unsigned": True}))
    client_config: Any = client.meta.config
    assert client_config.signature_version is botocore.UNSIGNED
    headers: list[dict[str, str]] = []
    client.meta.events.register(
        "before-send.s3.*", lambda request, **_: headers.append(dict(request.headers))
    )

    store = S3ObjectStore(client, s3_config)

    assert store.download(bucket, "public").tobytes() == b"open data"
    assert headers and not any("Authorization" in h for h in headers)
    with pytest.raises(AccessDeniedError, match=f"s3://{bucket}/private failed: access denied"):
        store.download(bucket, "private")


def test_uploads_carry_their_crc32_and_sign_payloads_only_over_plain_http(
    object_store: S3ObjectStore, s3_client: S3Client, s3_config: S3Config, bucket: str
):
    # Each part and each single PUT sends the CRC32 we computed as a (signed) header, so
    # botocore neither computes it again nor streams the body through its aws-chunked
    # trailer wrapper; over plain HTTP, botocore still signs the payload's SHA-256.
    sent: list[tuple[str, str]] = []

    def note(request: Any, **_: Any) -> None:
        crc, sha = (request.headers[h] for h in ("x-amz-checksum-crc32", "X-Amz-Content-SHA256"))
        sent.append((crc.decode(), sha.decode()))  # prepared requests carry bytes

    events = s3_client.meta.events
    for operation in ("UploadPart", "PutObject"):
        events.register(f"before-send.s3.{operation}", note, unique_id=f"crc-{operation}")
    try:
        data = random_bytes(2 * PART + 3)
        upload_bytes(object_store, bucket, "crc", data)
        upload_bytes(object_store, bucket, "crc-small", b"tiny")
    finally:
        for operation in ("UploadPart", "PutObject"):
            events.unregister(f"before-send.s3.{operation}", unique_id=f"crc-{operation}")

    pieces = [data[:PART], data[PART : 2 * PART], data[2 * PART :], b"tiny"]
    expected = {crc32_b64(piece) for piece in pieces}
    assert {crc for crc, _ in sent} == expected
    assert all(len(sha) == 64 for _, sha in sent)  # a hex digest: the payload is signed
    plain: Any = make_s3_client(s3_config).meta.config
    assert "payload_signing_enabled" not in (plain.s3 or {})
    for endpoint in ("https://s3.example.internal", None):
        tls: Any = make_s3_client(s3_config.model_copy(update={"endpoint_url": endpoint}))
        assert tls.meta.config.s3["payload_signing_enabled"] is False


def test_missing_key(object_store: S3ObjectStore, bucket: str):
    with pytest.raises(ObjectNotFoundError) as caught:
        object_store.download(bucket, "segment/missing.knnvec")
    assert f"s3://{bucket}/segment/missing.knnvec" in str(caught.value)
    assert "does not exist" in str(caught.value)
    with pytest.raises(ObjectNotFoundError):
        object_store.head(bucket, "segment/missing.knnvec")


def test_missing_bucket(object_store: S3ObjectStore):
    with pytest.raises(BucketNotFoundError) as caught:
        object_store.download("rvib-no-such-bucket", "x.knnvec")
    assert "rvib-no-such-bucket" in str(caught.value)
    with pytest.raises(BucketNotFoundError):
        object_store.head("rvib-no-such-bucket", "x.knnvec")
    with pytest.raises(BucketNotFoundError), object_store.open_upload("rvib-no-such-bucket", "y"):
        pass


def test_expected_size_mismatch(object_store: S3ObjectStore, s3_client: S3Client, bucket: str):
    s3_client.put_object(Bucket=bucket, Key="short", Body=b"0123456789")
    with pytest.raises(DatasetError, match=f"s3://{bucket}/short holds 10 bytes, expected 12"):
        object_store.download(bucket, "short", expected_size=12)


def test_cancelling_a_multipart_upload_leaves_nothing_behind(
    object_store: S3ObjectStore, s3_client: S3Client, bucket: str
):
    calls: list[int] = []

    def progress(nbytes: int) -> None:
        calls.append(nbytes)
        if len(calls) == 2:
            raise CancelledError("job cancelled")

    with pytest.raises(CancelledError, match="job cancelled"):
        upload_bytes(object_store, bucket, "index.faiss", random_bytes(5 * PART), progress=progress)

    assert no_object(s3_client, bucket, "index.faiss")
    assert no_multipart_uploads(s3_client, bucket)


def test_failed_upload_of_a_file_leaves_nothing_behind(
    object_store: S3ObjectStore, s3_client: S3Client, bucket: str, tmp_path: Path
):
    path = tmp_path / "index.faiss"
    path.write_bytes(random_bytes(3 * PART))

    def progress(nbytes: int) -> None:
        raise CancelledError("job cancelled")

    with pytest.raises(CancelledError):
        object_store.upload_file(bucket, "index.faiss", path, progress=progress)
    assert no_object(s3_client, bucket, "index.faiss")
    assert no_multipart_uploads(s3_client, bucket)


def test_cancelling_a_download_stops_it(
    object_store: S3ObjectStore, s3_client: S3Client, bucket: str
):
    s3_client.put_object(Bucket=bucket, Key="v", Body=random_bytes(3 * PART))

    def progress(nbytes: int) -> None:
        raise CancelledError("job cancelled")

    with pytest.raises(CancelledError):
        object_store.download(bucket, "v", progress=progress)


def test_object_replaced_during_download(s3_config: S3Config, s3_client: S3Client, bucket: str):
    s3_client.put_object(Bucket=bucket, Key="v", Body=random_bytes(3 * PART, seed=1))
    # Two workers for three ranges: the third GET starts after the first progress call,
    # which replaces the object (progress calls are serialized, so no worker gets ahead).
    store = S3ObjectStore(s3_client, s3_config.model_copy(update={"throughput_target_gbps": 0.1}))
    replaced = threading.Event()

    def progress(nbytes: int) -> None:
        if not replaced.is_set():
            s3_client.put_object(Bucket=bucket, Key="v", Body=random_bytes(3 * PART, seed=2))
            replaced.set()

    with pytest.raises(IntegrityError, match="replaced"):
        store.download(bucket, "v", progress=progress)


def test_sse_kms_key_is_reported_and_reused(
    s3_server: str, object_store: S3ObjectStore, s3_client: S3Client, bucket: str
):
    kms = boto3.client("kms", endpoint_url=s3_server, region_name="us-east-1")
    key_id = kms.create_key(Description="rvib test")["KeyMetadata"]["KeyId"]
    s3_client.put_object(
        Bucket=bucket, Key="v", Body=b"vectors", ServerSideEncryption="aws:kms", SSEKMSKeyId=key_id
    )

    info = object_store.head(bucket, "v")
    assert info.sse_kms_key_id is not None and key_id in info.sse_kms_key_id
    assert object_store.head(bucket, "v").sse_kms_key_id == info.sse_kms_key_id

    for key, size in (("small.faiss", 10), ("large.faiss", PART + 1)):
        upload_bytes(object_store, bucket, key, random_bytes(size), sse_kms_key_id=key_id)
        head = s3_client.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms"
        assert key_id in head["SSEKMSKeyId"]
    s3_client.put_object(Bucket=bucket, Key="plain", Body=b"x")
    assert object_store.head(bucket, "plain").sse_kms_key_id is None


# --------------------------------------------------------------------------------------
# Failures moto cannot produce: a real HTTP server that breaks bodies, a closed port.
# --------------------------------------------------------------------------------------


class _TruncatingS3(BaseHTTPRequestHandler):
    """Serves one object; the first ``truncations`` GETs of each range stop halfway."""

    protocol_version = "HTTP/1.1"
    data = b""
    truncations = 0
    gets: dict[str, int] = {}

    def _headers(self, status: int, length: int, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"fixed-etag"')
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()

    def do_HEAD(self) -> None:
        self._headers(200, len(self.data), {})

    def do_GET(self) -> None:
        byte_range = self.headers["Range"]
        first, last = (int(n) for n in byte_range.removeprefix("bytes=").split("-"))
        body = self.data[first : last + 1]
        seen = self.gets[byte_range] = self.gets.get(byte_range, 0) + 1
        extra = {"Content-Range": f"bytes {first}-{last}/{len(self.data)}"}
        if seen <= self.truncations:
            self._headers(206, len(body), {**extra, "Connection": "close"})
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self._headers(206, len(body), extra)
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose here


@pytest.fixture
def truncating_server() -> Iterator[tuple[str, type[_TruncatingS3]]]:
    handler = type("Handler", (_TruncatingS3,), {"data": random_bytes(2 * PART + 7), "gets": {}})
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _store_at(s3_config: S3Config, endpoint: str, sleeps: list[float], attempts: int):
    config = s3_config.model_copy(update={"endpoint_url": endpoint, "max_attempts": attempts})
    return S3ObjectStore(make_s3_client(config), config, sleep=sleeps.append)


def test_truncated_ranges_are_retried(
    s3_server: str, s3_config: S3Config, truncating_server: tuple[str, type[_TruncatingS3]]
):
    endpoint, handler = truncating_server
    handler.truncations = 1
    sleeps: list[float] = []
    progress: list[int] = []

    blob = _store_at(s3_config, endpoint, sleeps, 3).download("b", "k", progress=progress.append)

    assert blob.tobytes() == handler.data
    assert sum(progress) == len(handler.data)  # retried bytes are not counted twice
    assert len(sleeps) == 3 and all(0 <= s <= 10 for s in sleeps)
    assert set(handler.gets.values()) == {2}


def test_ranges_that_keep_failing_raise_a_retryable_error(
    s3_server: str, s3_config: S3Config, truncating_server: tuple[str, type[_TruncatingS3]]
):
    endpoint, handler = truncating_server
    handler.truncations = 99
    sleeps: list[float] = []

    with pytest.raises(TransientStoreError) as caught:
        _store_at(s3_config, endpoint, sleeps, 2).download("b", "k")

    message = str(caught.value)
    assert "s3://b/k (bytes " in message and "after 2 attempt(s)" in message
    assert "retryable" in message


def test_unreachable_endpoint_is_retried_then_named_not_called_transient(
    s3_server: str, s3_config: S3Config
):
    sleeps: list[float] = []
    store = _store_at(s3_config, f"http://127.0.0.1:{closed_port()}", sleeps, 2)
    with pytest.raises(ObjectStoreError) as caught:
        store.download("b", "k")
    assert not isinstance(caught.value, TransientStoreError)
    message = str(caught.value)
    assert message.startswith("download of s3://b/k failed: could not connect to the S3 endpoint")
    assert "after 2 attempt(s)" in message and "check S3_ENDPOINT_URL" in message
    assert "transient" not in message
    assert len(sleeps) == 1  # still retried: a server may be restarting


@pytest.mark.parametrize("every", [False, True])
def test_a_bit_flipped_in_a_range_of_a_multipart_object_is_caught(
    object_store: S3ObjectStore, s3_server: str, s3_config: S3Config, bucket: str, every: bool
):
    """Our own multipart uploads carry a composite CRC32 (of the parts' CRC32s): a range
    that arrives with one bit flipped is downloaded again, or fails the download."""
    data = random_bytes(3 * PART + 7, seed=9)
    upload_bytes(object_store, bucket, "parts.knnvec", data)
    with FaultProxy(s3_server) as proxy:
        config = s3_config.model_copy(update={"endpoint_url": proxy.url})
        store = S3ObjectStore(make_s3_client(config), config)
        proxy.add(Fault("flip", "GET", "parts.knnvec", times=None if every else 1))
        if every:
            with pytest.raises(IntegrityError, match="composite CRC32 of the 4 parts"):
                store.download(bucket, "parts.knnvec")
        else:
            assert store.download(bucket, "parts.knnvec").tobytes() == data
        ranged_gets = [s for s in proxy.seen if s.method == "GET"]
        assert len(ranged_gets) == 2 * 4  # the object was downloaded twice, in 4 ranges


def upload_one_part_multipart(client: S3Client, bucket: str, key: str, data: bytes) -> None:
    """A multipart upload of a single part, as a client that always uploads multipart makes."""
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")[
        "UploadId"
    ]
    sent = client.upload_part(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        PartNumber=1,
        Body=data,
        ChecksumAlgorithm="CRC32",
        ChecksumCRC32=crc32_b64(data),
    )
    part: CompletedPartTypeDef = {
        "PartNumber": 1,
        "ETag": sent["ETag"],
        "ChecksumCRC32": sent["ChecksumCRC32"],
    }
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": [part]}
    )


@pytest.mark.parametrize("size", [MIB, PART + MIB])
def test_an_intact_one_part_multipart_object_passes_its_composite_crc32(
    object_store: S3ObjectStore, s3_client: S3Client, bucket: str, size: int
):
    """S3 stores the CRC32 of the part's CRC32 for a one-part multipart object (moto too)."""
    data = random_bytes(size, seed=5)
    upload_one_part_multipart(s3_client, bucket, "one.knnvec", data)
    head = s3_client.head_object(Bucket=bucket, Key="one.knnvec", ChecksumMode="ENABLED")
    # Stored composite: not the object's own CRC32 (the case this test is about).
    assert head["ChecksumCRC32"].partition("-")[0] != crc32_b64(data)
    assert head["ETag"].endswith('-1"')

    assert object_store.download(bucket, "one.knnvec").tobytes() == data


def test_a_bit_flipped_in_a_one_part_multipart_object_is_caught(
    object_store: S3ObjectStore,
    s3_server: str,
    s3_config: S3Config,
    s3_client: S3Client,
    bucket: str,
):
    data = random_bytes(PART + MIB, seed=6)
    upload_one_part_multipart(s3_client, bucket, "one.knnvec", data)
    with FaultProxy(s3_server) as proxy:
        config = s3_config.model_copy(update={"endpoint_url": proxy.url})
        store = S3ObjectStore(make_s3_client(config), config)
        proxy.add(Fault("flip", "GET", "one.knnvec"))
        with pytest.raises(IntegrityError, match="composite CRC32 of the one part"):
            store.download(bucket, "one.knnvec")


def upload_parts(client: S3Client, bucket: str, key: str, pieces: list[bytes]) -> None:
    """A multipart upload of ``pieces`` as its parts, each with its CRC32 (S3's default type)."""
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")[
        "UploadId"
    ]
    parts: list[CompletedPartTypeDef] = []
    for number, piece in enumerate(pieces, 1):
        sent = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=piece,
            ChecksumAlgorithm="CRC32",
            ChecksumCRC32=crc32_b64(piece),
        )
        parts.append(
            {"PartNumber": number, "ETag": sent["ETag"], "ChecksumCRC32": sent["ChecksumCRC32"]}
        )
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )


@pytest.mark.parametrize(
    ("sizes", "ranges"),
    [
        # Equal parts (what SDKs upload), not a multiple of the 5 MiB ranges: the ranges
        # are cut at the part boundaries, and the parts' CRC32s come from the ranges'.
        ([7 * MIB, 7 * MIB, 3 * MIB], [PART, 2 * MIB, PART, 2 * MIB, 3 * MIB]),
        # Parts of different sizes: cut as if equal (5 MiB from the first), the guess
        # fails, the store is asked for each part's size, and the buffer is read again.
        ([PART, 7 * MIB, 3 * MIB], [PART, PART, PART]),
    ],
    ids=["equal-parts", "unequal-parts"],
)
@pytest.mark.parametrize("flip", [False, True], ids=["intact", "flipped"])
def test_a_composite_crc32_is_checked_whatever_the_part_sizes(
    s3_server: str,
    s3_config: S3Config,
    s3_client: S3Client,
    bucket: str,
    sizes: list[int],
    ranges: list[int],
    flip: bool,
):
    data = random_bytes(sum(sizes), seed=len(sizes))
    bounds = itertools.pairwise(np.cumsum([0, *sizes]))
    upload_parts(s3_client, bucket, "p.knnvec", [data[a:b] for a, b in bounds])
    with FaultProxy(s3_server) as proxy:
        config = s3_config.model_copy(update={"endpoint_url": proxy.url})
        store = S3ObjectStore(make_s3_client(config), config)
        if flip:
            proxy.add(Fault("flip", "GET", "p.knnvec"))
            with pytest.raises(IntegrityError, match="composite CRC32 of the 3 parts"):
                store.download(bucket, "p.knnvec")
        else:
            assert store.download(bucket, "p.knnvec").tobytes() == data
        gets = [s for s in proxy.seen if s.method == "GET"]
    assert len(gets) == len(ranges) * (2 if flip else 1)


def test_ranges_follow_the_parts_and_combine_into_their_crc32():
    assert plan_ranges(10, 4) == [(0, 3), (4, 7), (8, 9)]
    assert plan_ranges(10, 4, [6, 4]) == [(0, 3), (4, 5), (6, 9)]
    assert plan_ranges(0, 4) == []
    data = random_bytes(1000, seed=3)
    crcs = RangeCrcs(plan_ranges(len(data), 128, [300, 300, 400]))
    crcs.crcs = [zlib_ng.crc32(data[first : last + 1]) for first, last in crcs.ranges]
    assert crcs.of(0, 999) == zlib_ng.crc32(data)
    assert crcs.of(300, 599) == zlib_ng.crc32(data[300:600])
    assert crcs.of(0, 298) is None and crcs.of(1, 299) is None  # not whole ranges
