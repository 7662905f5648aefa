"""The endpoints. Services arrive through ``Depends`` aliases; errors through one handler.

``POST /_build`` and ``GET /_status/{job_id}`` answer exactly the keys of the
k-NN client's contract (docs/knn-contract.md, sections 1 and 2); everything
else an operator may want lives on other endpoints.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel
from starlette.routing import Match

from remote_vector_index_builder.app.jobs import JobStore, TaskStatus
from remote_vector_index_builder.app.metrics import Metrics
from remote_vector_index_builder.app.runner import Runner
from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core.errors import (
    AccessDeniedError,
    InsufficientMemoryError,
    InvalidRequestError,
    JobConflictError,
    JobNotFoundError,
    RvibError,
    ServiceUnavailableError,
    StoreFullError,
)
from remote_vector_index_builder.core.params import BuildRequest


class BuildResponse(BaseModel):
    job_id: str


class StatusResponse(BaseModel):
    task_status: TaskStatus
    file_name: str | None = None
    error_message: str | None = None


class ErrorResponse(BaseModel):
    detail: str


class FieldProblem(BaseModel):
    field: str
    message: str


class ValidationErrorResponse(BaseModel):
    """The 422 body of ``main.validation_error`` (not FastAPI's default shape)."""

    detail: list[FieldProblem]


class Unauthorized(RvibError):
    pass


class BucketNotAllowed(RvibError):
    pass


_basic = HTTPBasic(auto_error=False)

# Handlers and dependencies that only touch in-memory state are ``async``: FastAPI
# runs a sync one on a worker thread, and while builds hold every core each such
# hop waited for a CPU (GET /_status made three). Handlers whose work grows with
# the job store (/_jobs, /metrics) stay sync, off the event loop.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_jobs(request: Request) -> JobStore:
    jobs: JobStore = request.app.state.jobs
    return jobs


async def get_runner(request: Request) -> Runner:
    runner: Runner = request.app.state.runner
    return runner


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_auth(
    request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
) -> None:
    expected: tuple[bytes, bytes] | None = request.app.state.credentials
    if expected is None:
        return  # not configured: the Authorization header is ignored (docs/knn-contract.md, 3)
    if credentials is None:
        raise Unauthorized("this service requires HTTP Basic authentication")
    user_ok = secrets.compare_digest(credentials.username.encode(), expected[0])
    password_ok = secrets.compare_digest(credentials.password.encode(), expected[1])
    if not (user_ok and password_ok):
        raise Unauthorized("wrong username or password")


async def require_metrics_auth(
    request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
) -> None:
    # Scrapers often cannot send credentials: RVIB_METRICS_REQUIRE_AUTH=false exempts /metrics.
    if (await get_settings(request)).metrics_require_auth:
        await require_auth(request, credentials)


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
async def build(body: BuildRequest, settings: SettingsDep, jobs: JobsDep, runner: RunnerDep) -> Any:
    """Accept a build; the same tenant + vector path returns the existing job."""
    if settings.allowed_buckets and body.container_name not in settings.allowed_buckets:
        raise BucketNotAllowed(
            f"bucket {body.container_name!r} is not in this service's allow-list "
            "(RVIB_ALLOWED_BUCKETS)"
        )
    runner.admit(body)
    job, created = jobs.add_if_absent(body)
    if created:
        try:
            runner.submit(job)
        except RvibError:
            jobs.remove(job)
            raise
    return {"job_id": job.id}


@router.get(
    "/_status/{job_id}",
    response_model=StatusResponse,
    dependencies=[Authenticated],
    responses=_ERRORS,
)
async def status(job_id: str, jobs: JobsDep) -> Any:
    return jobs.get(job_id).status_body()


@router.get("/_jobs", dependencies=[Authenticated], responses=_ERRORS)
def list_jobs(jobs: JobsDep) -> dict[str, dict[str, Any]]:
    """Every job the store holds, by id (a JSON object, encoded once)."""
    return {job.id: job.summary() for job in jobs.jobs()}


@router.get("/_jobs/{job_id}", dependencies=[Authenticated], responses=_ERRORS)
async def job_detail(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """One job: its summary, the current stage's percent and ETA, and per-stage timings."""
    return jobs.get(job_id).detail(jobs.clock())


@router.delete("/_jobs/{job_id}", status_code=202, dependencies=[Authenticated], responses=_ERRORS)
async def cancel_job(job_id: str, jobs: JobsDep, runner: RunnerDep) -> dict[str, Any]:
    """Cancel: a queued job leaves the queue, a running one stops at its next batch or stage.

    Either way it ends as ``FAILED_INDEX_BUILD`` "cancelled by operator" on ``/_status``.
    """
    job = jobs.get(job_id)
    if job.state.terminal:
        raise JobConflictError(
            f"job {job_id} already ended ({job.state.value}); there is nothing to cancel"
        )
    runner.cancel(job)
    return job.detail(jobs.clock())


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


@router.get("/_heart_beat")
async def heart_beat(runner: RunnerDep) -> dict[str, Any]:
    """Liveness (always 200 while the process serves) plus readiness facts."""
    budget = runner.budget
    ready = runner.accepting and not runner.unhealthy.is_set()
    return {
        "status": "alive",
        "ready": ready,
        "device": runner.builder.name,
        "workers": runner.config.max_workers,
        "jobs_in_flight": runner.busy(),
        "memory": {
            "host_limit_bytes": budget.host_limit,
            "host_reserved_bytes": budget.host_reserved,
            "gpu_limit_bytes": budget.gpu_limit,
            "gpu_reserved_bytes": budget.gpu_reserved,
        },
    }


@router.get("/_ready", responses={503: {"model": ErrorResponse}})
async def ready(runner: RunnerDep) -> dict[str, bool]:
    """200 when builds can be accepted, 503 otherwise (for orchestrator probes)."""
    if not runner.accepting:
        raise ServiceUnavailableError("shutting down")
    if runner.unhealthy.is_set():
        raise ServiceUnavailableError(
            "a build exceeded RVIB_JOB_TIME_LIMIT_SECONDS and its thread cannot be reclaimed; "
            "restart this service"
        )
    return {"ready": True}


_STATUS_CODES: list[tuple[type[RvibError], int]] = [
    (Unauthorized, 401),
    (BucketNotAllowed, 403),
    (AccessDeniedError, 403),
    (JobNotFoundError, 404),
    (JobConflictError, 409),
    (StoreFullError, 429),
    (InvalidRequestError, 422),
    (ServiceUnavailableError, 503),
    (InsufficientMemoryError, 507),
]


def error_response(request: Request, exc: Exception) -> Response:
    """The one handler that turns service errors into HTTP answers."""
    code = next((c for t, c in _STATUS_CODES if isinstance(exc, t)), 500)
    headers: dict[str, str] = {}
    if code == 401:
        headers["WWW-Authenticate"] = 'Basic realm="remote-vector-index-builder"'
    elif code in (429, 503):
        headers["Retry-After"] = "5"
    return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


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
