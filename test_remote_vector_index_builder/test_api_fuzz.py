"""Property-based fuzzing of the HTTP API against its own OpenAPI schema (schemathesis).

Every operation the app declares gets generated requests, valid and invalid
(schemathesis's positive and negative modes); each response must not be a 5xx
and must match the schema: declared status code, content type, headers and
body. The app is the real one with its lifespan running and the local S3
server behind it, so accepted builds really run (and fail on missing objects).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from remote_vector_index_builder.app.main import Overrides, create_app
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.object_store import S3ObjectStore

# Two checks judge the request schema's precision rather than the service, and the
# contract is deliberately wider than the schema in both directions:
# * positive_data_acceptance: the rules that span fields (binary needs hamming and a
#   dimension in whole bytes, S3's key limit counts UTF-8 bytes, no '..' segments)
#   are not in the JSON schema, so a schema-valid body can rightly get a 422;
# * negative_data_rejection: numbers sent as strings ("768") are accepted on purpose
#   (API.md), and with them pydantic's other lax coercions (0/1 for booleans).
EXCLUDED = [
    schemathesis.checks.positive_data_acceptance,
    schemathesis.checks.negative_data_rejection,
]
# Examples per operation: enough to reach every validation branch of /_build,
# small enough that the whole module stays within seconds.
MAX_EXAMPLES = 80

# schemathesis loads the schema at import time (its pytest fixture loader does not
# work with pytest 9), so the app exists before the fixtures do; the S3 store is
# handed to it through its ``Overrides`` seam before the lifespan starts.
CREDENTIALS = {"Authorization": "Basic " + base64.b64encode(b"fuzz:fuzz-password").decode()}
_SEAMS = Overrides()
_APP = create_app(
    Settings(
        _env_file=None,
        device="cpu",
        max_workers=2,
        omp_threads=2,
        request_store_max_size=64,
        shutdown_grace_seconds=5,
        # With authentication configured the declared HTTPBasic security is enforced,
        # so schemathesis's checks for requests without credentials apply too.
        auth_username="fuzz",
        auth_password="fuzz-password",
    ),
    _SEAMS,
)
# 507 is the one 5xx of the contract (API.md, docs/knn-contract.md section 3): "this build can
# never fit in the memory limits", which the k-NN client must not retry. It is
# declared on POST /_build, and the fuzzer reaches it with huge doc counts.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"not_a_server_error": {"expected-statuses": ["2XX", "3XX", "4XX", 507]}}}
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP, config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def running_app(object_store: S3ObjectStore) -> Iterator[None]:
    _SEAMS.object_store = object_store
    with TestClient(_APP):
        yield


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_matches_its_schema(case: Any) -> None:
    case.call_and_validate(headers=CREDENTIALS, excluded_checks=EXCLUDED)


# What API.md says needs no credentials when authentication is configured: the probes
# and the API description. Everything else the schema declares needs them.
OPEN = {("GET", "/_heart_beat"), ("GET", "/_ready"), ("GET", "/docs"), ("GET", "/openapi.json")}


def test_only_the_probes_and_the_api_description_are_open() -> None:
    # Its own lifespan: schemathesis runs (and at teardown shuts down) one per fuzz test.
    with TestClient(_APP) as client:
        for method, path in sorted(OPEN):
            assert client.request(method, path).status_code == 200, path
        declared = {
            (method.upper(), path)
            for path, operations in client.get("/openapi.json").json()["paths"].items()
            for method in operations
        }
        assert declared - OPEN, "the schema declares no protected operation"
        for method, path in sorted(declared - OPEN):
            url = path.replace("{job_id}", "unknown-job")
            response = client.request(method, url, json={})
            assert response.status_code == 401, (method, path, response.status_code)
            assert client.request(method, url, json={}, headers=CREDENTIALS).status_code != 401
