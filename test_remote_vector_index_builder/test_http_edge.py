"""The HTTP edge as the k-NN client and an operator meet it: Basic authentication, double
slashes, refusals logged and counted, the docs page without a CDN, the schema's field
descriptions, readiness without S3 credentials, the start-up line, and idle keep-alive
connections on a real uvicorn server."""

from __future__ import annotations

import base64
import json
import logging
import re
import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from remote_vector_index_builder.app.main import create_app, server_config
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.options import DEFAULT_KEEP_ALIVE_SECONDS
from remote_vector_index_builder.core.s3_calls import S3Config
from remote_vector_index_builder.local_s3 import free_port
from test_remote_vector_index_builder.support import (
    both_modes,
    build_body,
    fast_body,
    make_settings,
    metric_value,
    parse_metrics,
    upload,
    wait_terminal,
)
from testbed.data import clustered

JSON = {"Content-Type": "application/json"}


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# --- HTTP Basic (issue 16, item 11) ----------------------------------------------------


def test_a_utf8_password_authenticates(service: Callable[..., TestClient]) -> None:
    client = service(auth_username="bauer", auth_password="pässwörd-ß-密码")
    assert client.get("/_jobs", headers=basic("bauer", "pässwörd-ß-密码")).status_code == 200
    assert client.get("/_jobs", headers=basic("bauer", "passwort")).status_code == 401
    assert client.get("/_jobs", headers=basic("bäuer", "pässwörd-ß-密码")).status_code == 401


MALFORMED = [
    "Basic !!!not-base64!!!",
    "Basic " + base64.b64encode(b"no-colon").decode(),
    "Basic",
    "Bearer abc.def",
]


@pytest.mark.parametrize("header", MALFORMED)
def test_a_malformed_authorization_header_is_ignored_without_auth_and_401_with(
    service: Callable[..., TestClient], header: str
) -> None:
    assert service().get("/_jobs", headers={"Authorization": header}).status_code == 200
    answer = service(auth_username="rvib", auth_password="pw").get(
        "/_jobs", headers={"Authorization": header}
    )
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Basic")


# --- "//_build" from an endpoint setting with a trailing slash (issue 16, item 16) ----------


def test_double_slashes_reach_the_same_endpoints(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    client = service()
    upload(s3_client, bucket, "idx/slash", clustered(300, 16))
    body = fast_body(bucket, "idx/slash", 16, 300)
    # A full URL: httpx would read "//_build" alone as a host name.
    answer = client.post("http://testserver//_build", json=body)
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["job_id"]
    assert client.post("/_build", json=body).json() == {"job_id": job_id}
    wait_terminal(client, job_id)
    status = client.get(f"http://testserver//_status/{job_id}")
    assert status.status_code == 200
    assert status.json()["task_status"] == "COMPLETED_INDEX_BUILD"


# --- refusals: logged at WARNING with code, tenant, path and reason; counted ----------------


def test_every_refusal_is_logged_and_counted_by_reason(
    service: Callable[..., TestClient], bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = service(
        auth_username="rvib",
        auth_password="pw",
        allowed_buckets=bucket,
        cpu_memory_limit=256 * 1024**2,
    )
    auth = basic("rvib", "pw")
    elsewhere = build_body("other-bucket", "idx/x", 16, 300, tenant_id="cluster-a")
    huge = build_body(bucket, "idx/huge", 768, 10_000_000, tenant_id="cluster-b")
    invalid = build_body(bucket, "idx/x", 0, 300, tenant_id="cluster-c")
    with caplog.at_level(logging.WARNING, logger="remote_vector_index_builder.app.routes"):
        assert client.post("/_build", json=elsewhere, headers=auth).status_code == 403
        assert client.post("/_build", json=elsewhere).status_code == 401
        assert client.post("/_build", json=huge, headers=auth).status_code == 507
        assert client.post("/_build", json=invalid, headers=auth).status_code == 422
        assert client.post("/_build", content=b"{", headers=auth | JSON).status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = [
        "refused POST /_build with 403 (BucketNotAllowed), tenant 'cluster-a': bucket "
        "'other-bucket' is not in this service's allow-list (RVIB_ALLOWED_BUCKETS)",
        "refused POST /_build with 401 (Unauthorized), tenant unknown: this service requires "
        "HTTP Basic authentication",
        "refused POST /_build with 507 (InsufficientMemoryError), tenant 'cluster-b': this "
        "build needs about",
        "refused POST /_build with 422 (invalid_request), tenant 'cluster-c': dimension: "
        "Input should be greater than 0",
        "refused POST /_build with 400 (invalid_json), tenant unknown: the request body is not "
        "valid JSON",
    ]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), line
    samples = parse_metrics(client.get("/metrics", headers=auth).text)
    for code, reason in [
        ("403", "BucketNotAllowed"),
        ("401", "Unauthorized"),
        ("507", "InsufficientMemoryError"),
        ("422", "invalid_request"),
        ("400", "invalid_json"),
    ]:
        assert metric_value(samples, "rvib_requests_refused_total", code=code, reason=reason) == 1
    # The metrics scrape itself was not refused, and the probes never count.
    assert client.get("/_ready").status_code == 200


def test_a_body_without_the_json_content_type_says_which_header(
    service: Callable[..., TestClient], bucket: str
) -> None:
    client = service()
    body = json.dumps(build_body(bucket, "idx/x", 16, 300))
    for headers, shown in (
        (
            {"Content-Type": "application/x-www-form-urlencoded"},
            "application/x-www-form-urlencoded",
        ),
        ({}, "missing"),
    ):
        answer = client.post("/_build", content=body, headers=headers)
        assert answer.status_code == 422
        (problem,) = answer.json()["detail"]
        assert problem["field"] == "body"
        assert "'Content-Type: application/json'" in problem["message"]
        assert problem["message"].endswith(f"this request's Content-Type is {shown}")
    charset = {"Content-Type": "application/json; charset=UTF-8"}  # as the k-NN client sends
    assert client.post("/_build", content=body, headers=charset).status_code == 200


def test_validation_messages_are_the_validators_own_words(
    service: Callable[..., TestClient], bucket: str
) -> None:
    body = build_body(bucket, "idx/x", 16, 300, index_parameters={"space_type": "cosine"})
    answer = service().post("/_build", json=body)
    assert answer.status_code == 422
    assert answer.json()["detail"] == [
        {
            "field": "index_parameters.space_type",
            "message": "unknown space_type 'cosine': use one of l2, innerproduct, hamming "
            "(cosine is sent as innerproduct over normalized vectors)",
        }
    ]


# --- the API docs, from the installed package ------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_nothing_from_outside(
    service: Callable[..., TestClient], page: str
) -> None:
    client = service()
    html = client.get(page).text
    assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html)
    assert assets, html
    assert not [url for url in assets if not url.startswith("/")], assets
    assert "cdn" not in html.lower()
    for url in assets:
        assert client.get(url).status_code == 200, url


def test_the_schema_describes_the_build_request(service: Callable[..., TestClient]) -> None:
    schemas = service().get("/openapi.json").json()["components"]["schemas"]
    fields = schemas["BuildRequest"]["properties"]
    assert "counts bits" in fields["dimension"]["description"]
    assert "at least" not in fields["dimension"]["description"]
    assert "increasing" in fields["doc_id_path"]["description"]
    assert schemas["AlgorithmParameters"]["properties"]["m"]["minimum"] == 2


# --- /_heart_beat: the largest segment that fits ---------------------------------------------


def test_heart_beat_says_the_largest_segment_admitted(
    service: Callable[..., TestClient], bucket: str
) -> None:
    client = service(cpu_memory_limit="3GiB")
    largest = client.get("/_heart_beat").json()["largest_segment"]
    assert set(largest) == {"float", "half_float", "byte", "binary"}
    segment = largest["float"]["768"]
    assert segment["vector_bytes"] == segment["doc_count"] * 768 * 4
    assert largest["binary"]["768"]["vector_bytes"] == largest["binary"]["768"]["doc_count"] * 96
    # Exactly admission's boundary: one more vector is refused as never fitting.
    fits = build_body(bucket, "idx/fits", 768, segment["doc_count"])
    assert client.post("/_build", json=fits).status_code == 200
    too_big = build_body(bucket, "idx/too-big", 768, segment["doc_count"] + 1)
    assert client.post("/_build", json=too_big).status_code == 507
    # README's sizing table quotes 805k x 768 for Compose's 3 GiB (16 MiB parts there).
    assert 700_000 < segment["doc_count"] < 900_000


# --- readiness without S3 credentials (issue 16, item 16) --------------------------------


@both_modes
def test_without_s3_credentials_the_service_is_unready_and_refuses_builds(
    service: Callable[..., TestClient],
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to look for
    with caplog.at_level(logging.INFO):
        client = service()
    ready = client.get("/_ready")
    assert ready.status_code == 503
    assert "no AWS credentials found" in ready.json()["detail"]
    answer = client.post("/_build", json=build_body(bucket, "idx/x", 16, 300))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert "no AWS credentials found" in answer.json()["detail"]
    assert client.get("/_heart_beat").json()["ready"] is False
    assert "s3_credentials=none" in caplog.text
    # Anonymous access needs none.
    assert service(s3_unsigned=True).get("/_ready").status_code == 200


def test_start_up_logs_its_configuration_in_one_line(
    service: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        service(device="auto", auth_username="rvib", auth_password="secret-pw")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting: ")]
    assert "device=cpu workers=2 host_memory=" in line
    assert "s3_credentials=env" in line and "addressing=path" in line
    assert "auth=basic (user 'rvib')" in line and "secret-pw" not in line
    # faiss-cpu without GPU classes is how CPU hosts are meant to run: no to-do in the log.
    assert "install the gpu extra" not in caplog.text


# --- idle keep-alive connections (issue 16, item 17) ----------------------------------------


@contextmanager
def serving(settings: Settings) -> Iterator[int]:
    """The service as ``serve`` runs it (``server_config``), on a free loopback port."""
    server = uvicorn.Server(server_config(create_app(settings), settings))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    tick = threading.Event()
    while not server.started and thread.is_alive():
        tick.wait(0.01)
    assert server.started
    try:
        yield settings.port
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def get(sock: socket.socket, path: str) -> bytes:
    """One HTTP/1.1 request on an open connection; the response's status line."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: rvib\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        head += chunk
    header, body = head.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", header.lower())[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(4096)
    return header.split(b"\r\n", 1)[0]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the idle connection within ``seconds``."""
    readable, _, _ = select.select([sock], [], [], seconds)
    return bool(readable) and sock.recv(1) == b""


def test_idle_connections_stay_open_past_the_poll_interval(s3_config: S3Config) -> None:
    assert DEFAULT_KEEP_ALIVE_SECONDS > 3 * 5  # the client polls every 5 s
    # A short timeout shows the server does close idle connections at its setting ...
    short = make_settings(s3_config, host="127.0.0.1", port=free_port(), keep_alive_seconds=1)
    with serving(short) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        assert get(sock, "/_heart_beat") == b"HTTP/1.1 200 OK"
        assert closed_within(sock, 10.0)
    # ... and the default keeps one open while it idles longer than the client's poll
    # interval with its 20 % jitter (uvicorn's own default, 5 s, closed it: a POST sent as
    # it closes fails, and the client never retries a POST), then serves the next request.
    default = make_settings(s3_config, host="127.0.0.1", port=free_port())
    assert default.keep_alive_seconds == DEFAULT_KEEP_ALIVE_SECONDS
    with serving(default) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        assert get(sock, "/_heart_beat") == b"HTTP/1.1 200 OK"
        assert not closed_within(sock, 5 * 1.2 + 0.5)
        assert get(sock, "/_ready") == b"HTTP/1.1 200 OK"
