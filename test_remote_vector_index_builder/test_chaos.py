"""The chaos run (``benchmarks/chaos.py``) for a minute: every promise must hold after it.

Three replica processes, a real redis-server (append-only file on) and
SeaweedFS behind the fault proxy, all on 127.0.0.1; kill -9 and SIGSTOP of
replicas, Redis restarts, OOM and MISCONF, S3 resets, stalls and lost
``CompleteMultipartUpload`` answers, good jobs mixed with bad requests. The
seed is fixed, so a failure replays with the command the test prints; the
long mode (``python -m benchmarks.run --only chaos --chaos-minutes 10``) runs
the same for longer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from benchmarks.chaos import run_chaos
from benchmarks.chaos_checks import (
    FAILED,
    Answers,
    Tracked,
    bad_request_outcomes,
    builds_of,
    overlaps,
    table,
    verify_file,
)
from benchmarks.chaos_fleet import ChaosConfig, Incarnation, Timeline
from remote_vector_index_builder.core import quality
from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client
from remote_vector_index_builder.local_s3 import LocalS3
from testbed.data import clustered

SEED = 16
CHAOS_S = 60.0
# Dummy credentials: SeaweedFS started without identities accepts any, and the
# replica processes inherit them.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "chaos",
    "AWS_SECRET_ACCESS_KEY": "chaos",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def seaweed(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with LocalS3() as s3:
        yield s3.endpoint_url


@pytest.mark.slow
def test_chaos_run_keeps_every_promise(seaweed: str, tmp_path: Path) -> None:
    config = ChaosConfig(seed=SEED, chaos_s=CHAOS_S, work_dir=tmp_path, s3_endpoint=seaweed)
    client: Any = make_s3_client(
        S3Config(endpoint_url=seaweed, region="us-east-1", path_style=True)
    )
    result = run_chaos(config, client)
    text = "\n".join(table(result))
    print(text)
    failed = [c["name"] for c in result["checks"] if not c["passed"]]
    assert not failed, f"seed {SEED}: {failed}\n{text}"
    assert not result["harness_errors"], result["harness_errors"]


# -- the checks themselves, on made-up logs and a real index (fast) ----------------------


def _line(t: float, message: str, job_id: str | None = None) -> dict[str, Any]:
    return {"t": t, "message": message, "job_id": job_id}


def _thread(t: float, job_id: str, attempt: int, what: str) -> dict[str, Any]:
    return _line(t, f"job {job_id} attempt {attempt}: build thread {what}", job_id)


def _timeline(**lives: list[Incarnation]) -> Timeline:
    timeline = Timeline()
    timeline.incarnations = dict(lives)
    timeline.stops = {name: [] for name in lives}
    return timeline


def _found(logs: dict[str, list[dict[str, Any]]], timeline: Timeline) -> tuple[list[str], ...]:
    builds = [b for r, entries in logs.items() for b in builds_of(r, entries, timeline)]
    return overlaps(builds, logs, timeline)


def test_two_builds_of_a_job_at_once_are_an_overlap() -> None:
    timeline = _timeline(a=[Incarnation(0.0)], b=[Incarnation(0.0)])
    logs = {
        "a": [_thread(1.0, "j", 1, "started"), _thread(5.0, "j", 1, "ended")],
        "b": [_thread(4.0, "j", 2, "started"), _thread(8.0, "j", 2, "ended")],
    }
    bad, fenced = _found(logs, timeline)
    assert len(bad) == 1 and "for 1.00 s" in bad[0] and not fenced


def test_a_killed_build_ends_with_its_process() -> None:
    killed = Incarnation(0.0, 3.0, "kill -9")
    logs = {"a": [_thread(1.0, "j", 1, "started")], "b": [_thread(4.0, "j", 2, "started")]}
    timeline = _timeline(a=[killed, Incarnation(3.5)], b=[Incarnation(0.0)])
    timeline.incarnations["b"][0].ended = 9.0
    assert _found(logs, timeline) == ([], [])
    logs["b"] = [_thread(2.5, "j", 2, "started")]
    bad, _ = _found(logs, timeline)
    assert len(bad) == 1 and "for 0.50 s" in bad[0]


def test_a_resumed_owner_that_only_winds_down_is_the_fence_not_an_overlap() -> None:
    timeline = _timeline(a=[Incarnation(0.0)], b=[Incarnation(0.0)])
    timeline.stops["a"] = [(2.0, 6.0)]  # paused while b took the job over
    logs = {
        "a": [
            _thread(1.0, "j", 1, "started"),
            _line(1.5, "stage build started (6000 vectors)", "j"),
            _line(6.2, "job j attempt 1 fenced: another replica took this job over"),
            _thread(6.5, "j", 1, "ended"),
        ],
        "b": [_thread(4.0, "j", 2, "started"), _thread(9.0, "j", 2, "ended")],
    }
    bad, fenced = _found(logs, timeline)
    assert not bad and len(fenced) == 1
    # Resumed and went on to its next stage: a second build of the job.
    logs["a"].insert(3, _line(6.3, "stage upload started (100 bytes)", "j"))
    bad, fenced = _found(logs, timeline)
    assert len(bad) == 1 and not fenced


def _index_and_job(space: str) -> tuple[Any, Tracked, np.ndarray]:
    vectors = clustered(1500, 24, seed=5)
    doc_ids = (np.arange(1500) * 3 + 11).astype(np.int32)
    metric = faiss.METRIC_INNER_PRODUCT if space == "innerproduct" else faiss.METRIC_L2
    inner = faiss.IndexHNSWFlat(24, 8, metric)
    inner.hnsw.efConstruction = 20
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(vectors, doc_ids.astype(np.int64))
    sample = quality.QuerySample.take(vectors)
    recall = quality.sample_recall(index, sample, 10, 16, space)
    body = {"index_parameters": {"space_type": space}, "vector_path": "x/seg.knnvec"}
    job = Tracked("j", "small", body, "small", doc_ids, 0.0)
    job.detail = {"quality": {"recall": recall, "k": 10, "ef_search": 16}}
    return index, job, vectors


@pytest.mark.parametrize("space", ["l2", "innerproduct"])
def test_a_file_is_checked_against_its_ids_and_its_reported_recall(space: str) -> None:
    index, job, vectors = _index_and_job(space)
    assert verify_file(job, bytes(faiss.serialize_index(index)), vectors) == []
    assert job.detail is not None and job.doc_ids is not None
    job.detail["quality"]["recall"] += 0.05
    job.doc_ids = job.doc_ids[::-1].copy()
    problems = verify_file(job, bytes(faiss.serialize_index(index)), vectors)
    assert len(problems) == 2
    assert "not the job's doc ids" in problems[0] and "the report says" in problems[1]


def test_a_bad_request_the_faults_interrupted_is_handled_and_a_wrong_end_names_its_error() -> None:
    """An accepted huge-ef request whose replicas were killed three times failed for the
    faults, as a good job may; one that failed for itself is a problem, shown with why."""

    def job(path: str, error: str) -> Tracked:
        body = {"vector_path": path}
        detail = {"error_message": error}
        return Tracked(path, "huge_ef", body, None, None, 0.0, FAILED, 1.0, detail)

    interrupted = "the build was interrupted 3 times (the replica running it was lost or killed)"
    jobs = [job("a.knnvec", interrupted), job("b.knnvec", "unexpected error (MemoryError)")]
    answers = Answers(posts=[("huge_ef", "200", "a.knnvec"), ("huge_ef", "200", "b.knnvec")])
    handled, sent, problems = bad_request_outcomes(jobs, answers)
    assert (handled, sent) == (1, 2)
    assert problems == [
        "huge_ef: failed (unexpected error (MemoryError)), expected completed or rejected"
    ]
