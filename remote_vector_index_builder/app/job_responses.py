"""How a job is presented to operators: the bodies of ``GET /_jobs``, ``GET /_jobs/{id}``
and ``DELETE /_jobs/{id}``, each built from one ``JobSnapshot`` by its own model.

``/_status``'s three keys are the k-NN client's contract (``jobs.status_body``), not
these.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from remote_vector_index_builder.app.jobs import JobSnapshot, JobState, TaskStatus
from remote_vector_index_builder.core.workflow import StageProgress, stage_unit


def _request_fields(snap: JobSnapshot) -> dict[str, Any]:
    """The request's fields operators see; of an unreadable stored request (fleet), what
    could be read of it, its size unknown (0)."""
    r = snap.request
    if r is not None:
        return {
            "tenant_id": r.tenant_id,
            "bucket": r.container_name,
            "vector_path": r.vector_path,
            "data_type": r.data_type.value,
            "dimension": r.dimension,
            "doc_count": r.doc_count,
            "vector_bytes": r.vector_blob_bytes,
        }
    raw = snap.raw_request or {}

    def text(key: str) -> str:
        value = raw.get(key)
        return value if isinstance(value, str) else ""

    def number(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return {
        "tenant_id": text("tenant_id"),
        "bucket": text("container_name"),
        "vector_path": text("vector_path"),
        "data_type": text("data_type"),
        "dimension": number("dimension"),
        "doc_count": number("doc_count"),
        "vector_bytes": 0,
    }


class JobSummary(BaseModel):
    """One job in ``GET /_jobs``."""

    task_status: TaskStatus
    state: JobState
    attempt: int
    tenant_id: str
    bucket: str
    vector_path: str
    data_type: str
    dimension: int
    doc_count: int
    vector_bytes: int
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    file_name: str | None
    error_message: str | None
    device: str | None
    index_bytes: int | None
    quality: dict[str, Any] | None = None
    # Fleet mode only (null in one process): the replica holding the job, its lease's end.
    owner: str | None = None
    lease_expires_at: float | None = None

    @classmethod
    def fields_of(cls, snap: JobSnapshot) -> dict[str, Any]:
        return {
            "task_status": snap.task_status,
            "state": snap.state,
            "attempt": snap.attempt,
            **_request_fields(snap),
            "submitted_at": snap.submitted_at,
            "started_at": snap.started_at,
            "finished_at": snap.finished_at,
            "file_name": snap.file_name,
            "error_message": snap.error,
            "device": snap.device,
            "index_bytes": snap.index_bytes,
            "quality": snap.quality,
            "owner": snap.owner,
            "lease_expires_at": snap.lease_expires_at,
        }

    @classmethod
    def of(cls, snap: JobSnapshot) -> JobSummary:
        # Built from a snapshot whose fields are typed already: not validated again.
        return cls.model_construct(**cls.fields_of(snap))


class StageProgressModel(BaseModel):
    """The current stage's progress; a completed job is at 100 %."""

    stage: str | None
    unit: str | None
    done: int
    total: int
    percent: float | None
    eta_seconds: float | None

    @classmethod
    def of(cls, snap: JobSnapshot, now: float) -> StageProgressModel:
        state, done, total, stage = snap.state, snap.stage_done, snap.stage_total, snap.stage
        if stage is None:  # queued
            return cls.model_construct(
                stage=None, unit=None, done=0, total=0, percent=0.0, eta_seconds=None
            )
        if state is JobState.COMPLETED:
            return cls.model_construct(
                stage=stage.value,
                unit=stage_unit(stage),
                done=done,
                total=total,
                percent=100.0,
                eta_seconds=0.0,
            )
        started = snap.stage_started_at
        view = StageProgress(stage, done, total, now - started if started is not None else 0.0)
        eta = view.eta_s if not state.terminal else None
        return cls.model_construct(
            stage=stage.value,
            unit=view.unit,
            done=done,
            total=total,
            percent=None if view.percent is None else round(view.percent, 2),
            eta_seconds=None if eta is None else round(eta, 1),
        )


class StageSpan(BaseModel):
    started_at: float
    seconds: float | None


class JobDetail(JobSummary):
    """``GET /_jobs/{job_id}`` and ``DELETE /_jobs/{job_id}``: the summary, the current
    stage's progress and every stage's timing."""

    job_id: str
    cancel_requested: bool
    progress: StageProgressModel
    stages: dict[str, StageSpan]

    @classmethod
    def at(cls, snap: JobSnapshot, now: float) -> JobDetail:
        seconds = dict(snap.stage_seconds)
        return cls.model_construct(
            job_id=snap.id,
            **cls.fields_of(snap),
            cancel_requested=snap.cancel_requested,
            progress=StageProgressModel.of(snap, now),
            stages={
                name: StageSpan.model_construct(started_at=started, seconds=seconds.get(name))
                for name, started in snap.stage_times
            },
        )
