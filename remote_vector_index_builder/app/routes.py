"""The endpoints. Services arrive through ``Depends`` aliases; errors through one handler.

``POST /_build`` and ``GET /_status/{job_id}`` answer exactly the keys of the
k-NN client's contract (docs/knn-contract.md, sections 1 and 2); everything
else an operator may want lives on other endpoints.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
from dataclasses import asdict
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import HTTPBase
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from remote_vector_index_builder.app.job_responses import JobDetail, JobSummary
from remote_vector_index_builder.app.jobs import (
    JobQuery,
    JobService,
    JobState,
    TaskStatus,
    state_named,
)
from remote_vector_index_builder.app.metrics import Metrics
from remote_vector_index_builder.app.runner import Runner
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core import sizing
from remote_vector_index_builder.core.errors import (
    BucketNotAllowed,
    InsufficientMemoryError,
    JobConflictError,
    JobNotFoundError,
    RvibError,
    ServiceUnavailableError,
    StoreFullError,
    Unauthorized,
    problem_message,
)
from remote_vector_index_builder.core.params import BuildRequest

log = logging.getLogger(__name__)


class BuildResponse(BaseModel):
    job_id: str


class StatusResponse(BaseModel):
    task_status: TaskStatus
    file_name: str | None = None
    error_message: str | None = None


class ErrorResponse(BaseModel):
    detail: str


class MemoryState(BaseModel):
    host_limit_bytes: int
    host_reserved_bytes: int
    gpu_limit_bytes: int
    gpu_reserved_bytes: int


class SegmentSize(BaseModel):
    doc_count: int
    vector_bytes: int


class HeartBeat(BaseModel):
    # Other facts about the process (a GPU probe, the fleet) may join these keys.
    model_config = ConfigDict(extra="allow")

    status: Literal["alive"]
    ready: bool
    device: str
    workers: int
    jobs_in_flight: int
    memory: MemoryState
    largest_segment: dict[str, dict[str, SegmentSize]] = Field(
        description="by data type and dimension, at m 16: the most vectors a build is admitted "
        "with under this replica's memory limits (more is answered 507), and their vector "
        "bytes, the unit of knn.remote_index_build.size.max (core/sizing.py)"
    )


class ReadyResponse(BaseModel):
    ready: bool


class FieldProblem(BaseModel):
    field: str
    message: str


class ValidationErrorResponse(BaseModel):
    """The 422 body of ``main.validation_error`` (not FastAPI's default shape)."""

    detail: list[FieldProblem]


class BasicAuthHeader(SecurityBase):
    """The ``Authorization`` header, as is; declares HTTP Basic in the OpenAPI schema.

    FastAPI's ``HTTPBasic`` decodes credentials as ASCII and answers 401 itself for
    a malformed header, even when this service has no authentication configured;
    ``require_auth`` decides instead (docs/knn-contract.md, section 3).
    """

    def __init__(self) -> None:
        self.model = HTTPBase(scheme="basic")
        self.scheme_name = "HTTPBasic"

    async def __call__(self, request: Request) -> str | None:
        return request.headers.get("Authorization")


_basic = BasicAuthHeader()


def basic_credentials(header: str | None) -> tuple[bytes, bytes] | str:
    """``(username, password)`` as the bytes the client sent (UTF-8), or why there are none."""
    if not header:
        return "this service requires HTTP Basic authentication"
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return f"this service requires HTTP Basic authentication, not {scheme!r}"
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "malformed Authorization header: its credentials are not base64"
    user, sep, password = decoded.partition(b":")
    if not sep:
        return "malformed Authorization header: no ':' between username and password"
    return user, password


# Handlers and dependencies that only touch in-memory state are ``async``: FastAPI
# runs a sync one on a worker thread, and while builds hold every core each such
# hop waited for a CPU (GET /_status made three). Handlers whose work grows with
# the job store (/_jobs, /metrics) stay sync, off the event loop.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.backend.service
    return jobs


async def get_runner(request: Request) -> Runner:
    runner: Runner = request.app.state.runner
    return runner


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_auth(
    request: Request, authorization: Annotated[str | None, Depends(_basic)]
) -> None:
    expected: tuple[bytes, bytes] | None = request.app.state.credentials
    if expected is None:
        return  # not configured: the Authorization header is ignored (docs/knn-contract.md, 3)
    credentials = basic_credentials(authorization)
    if isinstance(credentials, str):
        raise Unauthorized(credentials)
    # Both compared whatever the first gives: the time taken tells nothing.
    user_ok = secrets.compare_digest(credentials[0], expected[0])
    password_ok = secrets.compare_digest(credentials[1], expected[1])
    if not (user_ok and password_ok):
        raise Unauthorized("wrong username or password")


async def require_metrics_auth(
    request: Request, authorization: Annotated[str | None, Depends(_basic)]
) -> None:
    # Scrapers often cannot send credentials: RVIB_METRICS_REQUIRE_AUTH=false exempts /metrics.
    if (await get_settings(request)).metrics_require_auth:
        await require_auth(request, authorization)


Authenticated = Depends(require_auth)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 429, 503, 507)
}
# Declared, so FastAPI does not document its own 422 shape, which this app never sends.
_ERRORS[422] = {"model": ValidationErrorResponse, "description": "Invalid request"}

router = APIRouter()


@router.post(
    "/_build",
    response_model=BuildResponse,
    dependencies=[Authenticated],
    # 400: a body that is not JSON at all (main.validation_error, before field checks).
    responses={**_ERRORS, 400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)
async def build(body: BuildRequest, request: Request, settings: SettingsDep, jobs: JobsDep) -> Any:
    """Accept a build; the same tenant + vector path returns the existing job."""
    request.state.tenant_id = body.tenant_id  # for the log line of a refusal (``refused``)
    if settings.allowed_buckets and body.container_name not in settings.allowed_buckets:
        raise BucketNotAllowed(
            f"bucket {body.container_name!r} is not in this service's allow-list "
            "(RVIB_ALLOWED_BUCKETS)"
        )
    return {"job_id": await jobs.submit(body)}


@router.get(
    "/_status/{job_id}",
    response_model=StatusResponse,
    dependencies=[Authenticated],
    responses=_ERRORS,
)
async def status(job_id: str, jobs: JobsDep) -> Any:
    return await jobs.status(job_id)


@router.get(
    "/_jobs",
    response_model=dict[str, JobSummary],
    dependencies=[Authenticated],
    responses=_ERRORS,
)
async def list_jobs(
    jobs: JobsDep,
    state: Annotated[
        JobState | TaskStatus | None,
        BeforeValidator(state_named),
        Query(description="only jobs in this state, or with this task_status"),
    ] = None,
    limit: Annotated[int | None, Query(ge=1, description="at most this many jobs")] = None,
    after: Annotated[
        str | None,
        Query(description="only jobs whose id sorts after this one: the last id of a page"),
    ] = None,
) -> Any:
    """The jobs the store holds, by id in id order (a JSON object, encoded once)."""
    query = JobQuery(state, limit, after)
    return {snap.id: JobSummary.of(snap) for snap in await jobs.snapshots(query)}


@router.get(
    "/_jobs/{job_id}", response_model=JobDetail, dependencies=[Authenticated], responses=_ERRORS
)
async def job_detail(job_id: str, jobs: JobsDep) -> Any:
    """One job: its summary, the current stage's percent and ETA, and per-stage timings."""
    return JobDetail.at(await jobs.snapshot(job_id), jobs.now())


@router.delete(
    "/_jobs/{job_id}",
    status_code=202,
    response_model=JobDetail,
    dependencies=[Authenticated],
    responses={**_ERRORS, 200: {"model": JobDetail, "description": "Forgotten"}},
)
async def delete_job(job_id: str, jobs: JobsDep, response: Response) -> Any:
    """Cancel an active job (202): a queued one leaves the queue, a running one stops at its
    next batch or stage; either way it ends as ``FAILED_INDEX_BUILD`` "cancelled by
    operator" on ``/_status``. Forget an ended one (200): its id is free for a new request.
    """
    deleted = await jobs.delete(job_id)
    if deleted.forgotten:
        response.status_code = 200
    return JobDetail.at(deleted.snapshot, jobs.now())


@router.get(
    "/metrics",
    dependencies=[Depends(require_metrics_auth)],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}},
)
def metrics(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus metrics (text format; OpenMetrics when the scraper asks for it)."""
    body, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@router.get("/_heart_beat", response_model=HeartBeat)
async def heart_beat(runner: RunnerDep, request: Request) -> Any:
    """Liveness (always 200 while the process serves) plus readiness facts."""
    state = runner.state()
    limits = sizing.Limits(state.host_limit, state.gpu_limit, runner.config.estimate)
    # Cached per limits; the first call bisects the estimate (~0.1 s): off the event loop.
    largest = await anyio.to_thread.run_sync(sizing.largest_segments, limits)
    body = {
        "status": "alive",
        "ready": state.ready,
        "device": state.device,
        "workers": state.workers,
        "jobs_in_flight": state.busy,
        "memory": {
            "host_limit_bytes": state.host_limit,
            "host_reserved_bytes": state.host_reserved,
            "gpu_limit_bytes": state.gpu_limit,
            "gpu_reserved_bytes": state.gpu_reserved,
        },
        "largest_segment": {
            data_type: {dim: asdict(segment) for dim, segment in by_dimension.items()}
            for data_type, by_dimension in largest.items()
        },
        "gpu": request.app.state.gpu_probe.summary(),  # the start-up probe, core/gpu_probe.py
    }
    body.update(request.app.state.backend.summary())  # the fleet block in fleet mode
    return body


@router.get("/_ready", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
async def ready(runner: RunnerDep) -> Any:
    """200 when builds can be accepted, 503 otherwise (for orchestrator probes)."""
    reason = runner.state().unready_reason
    if reason is not None:
        # A probe's answer, not a refused request: not logged or counted as one.
        return _error_body(503, reason, None)
    return {"ready": True}


_STATUS_CODES: list[tuple[type[RvibError], int]] = [
    (Unauthorized, 401),
    (BucketNotAllowed, 403),
    (JobNotFoundError, 404),
    (JobConflictError, 409),
    (StoreFullError, 429),
    (ServiceUnavailableError, 503),
    (InsufficientMemoryError, 507),
]


# Refusals an operator should see: logged at WARNING and counted by reason (``refused``).
_REFUSALS = frozenset({400, 401, 403, 409, 422, 429, 503, 507})
_JSON = re.compile(r"^application/([\w.+-]+\+)?json\s*(;|$)", re.IGNORECASE)


def refused(request: Request, code: int, reason: str, message: str) -> None:
    """Log and count a refused request: code, tenant (when the body named one), path, reason."""
    tenant = getattr(request.state, "tenant_id", None)
    log.warning(
        "refused %s %s with %d (%s), tenant %s: %s",
        request.method,
        request.url.path,
        code,
        reason,
        repr(tenant) if tenant is not None else "unknown",
        message,
    )
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.requests_refused.labels(str(code), reason).inc()


def _error_body(code: int, detail: Any, exc: Exception | None) -> JSONResponse:
    headers: dict[str, str] = {}
    if code == 401:
        headers["WWW-Authenticate"] = 'Basic realm="remote-vector-index-builder"'
    elif code in (429, 503):
        retry_after = exc.retry_after_s if isinstance(exc, ServiceUnavailableError) else None
        headers["Retry-After"] = str(retry_after or 5)
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


def error_response(request: Request, exc: Exception) -> Response:
    """The one handler that turns service errors into HTTP answers."""
    code = next((c for t, c in _STATUS_CODES if isinstance(exc, t)), 500)
    if code in _REFUSALS:
        refused(request, code, type(exc).__name__, str(exc))
    return _error_body(code, str(exc), exc)


def validation_error(request: Request, exc: Exception) -> Response:
    """400 for a body that is not JSON, 422 naming each invalid field (API.md)."""
    if not isinstance(exc, RequestValidationError):
        return error_response(request, exc)
    if isinstance(exc.body, dict) and isinstance(exc.body.get("tenant_id"), str):
        request.state.tenant_id = exc.body["tenant_id"]
    errors = exc.errors()
    for err in errors:
        if err["type"] == "json_invalid":
            cause = err.get("ctx", {}).get("error", "")
            detail = f"the request body is not valid JSON ({cause})"
            refused(request, 400, "invalid_json", detail)
            return _error_body(400, detail, None)
    content_type = request.headers.get("content-type")
    body_not_json = any(tuple(err["loc"]) == ("body",) for err in errors)
    if body_not_json and not _JSON.match(content_type or ""):
        # curl -d sends application/x-www-form-urlencoded: the body never reaches the JSON
        # parser, and pydantic's "Input should be a valid dictionary" says nothing of why.
        message = (
            "send the body as JSON with the header 'Content-Type: application/json' "
            f"(curl: -H 'Content-Type: application/json'); this request's Content-Type is "
            f"{content_type or 'missing'}"
        )
        problems = [{"field": "body", "message": message}]
    else:
        problems = [
            {
                "field": ".".join(str(p) for p in err["loc"][1:]) or "body",
                "message": problem_message(err),
            }
            for err in errors
        ]
    refused(
        request,
        422,
        "invalid_request",
        "; ".join(f"{p['field']}: {p['message']}" for p in problems),
    )
    return _error_body(422, problems, None)


_SLASHES = re.compile(r"/{2,}")


class CollapseSlashes:
    """``//_build`` is ``/_build``: a trailing slash in the client's endpoint setting
    (``http://host:80/``) makes it call ``//_build`` and ``//_status/<id>``, and a 404 for
    those sends every segment back to a CPU build on the data node."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = dict(scope)
            scope["path"] = _SLASHES.sub("/", scope["path"])
            if isinstance(scope.get("raw_path"), bytes):
                scope["raw_path"] = re.sub(rb"/{2,}", b"/", scope["raw_path"])
        await self.app(scope, receive, send)


def method_not_allowed(request: Request, exc: Exception) -> Response:
    """405 whose ``Allow`` lists every method of the path (RFC 9110 requires the header).

    The router's own 405 lists at most the first route matching the path, so
    ``OPTIONS /_jobs/{id}`` got ``Allow: GET`` (DELETE missing) or no header at all.
    """
    allowed = {
        method
        for route in router.routes
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE
        for method in route.methods or ()
    }
    headers = dict(getattr(exc, "headers", None) or {})
    if allowed:
        headers["Allow"] = ", ".join(sorted(allowed))
    return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers=headers)
