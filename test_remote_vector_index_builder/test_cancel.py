"""``DELETE /_jobs/{job_id}``: queued jobs leave the queue, running ones stop and clean up."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from remote_vector_index_builder.core.cpu_builder import insertion_share
from remote_vector_index_builder.core.object_store import S3ObjectStore, Upload
from remote_vector_index_builder.core.params import BuildRequest
from test_remote_vector_index_builder.support import (
    GatedBuilder,
    GatedStore,
    both_modes,
    fast_body,
    upload,
    wait_idle,
    wait_terminal,
)
from testbed.data import clustered

CANCELLED = {
    "task_status": "FAILED_INDEX_BUILD",
    "file_name": None,
    "error_message": "cancelled by operator",
}


class UploadGatedStore(GatedStore):
    """Downloads pass; the upload pauses once its first part is in S3 until a test resumes."""

    def __init__(self, inner: S3ObjectStore) -> None:
        super().__init__(inner)
        self.gate.set()
        self.part_uploaded = threading.Event()
        self.resume = threading.Event()

    def open_upload(self, *args: Any, progress: Any = None, **kwargs: Any) -> Upload:
        def report(nbytes: int) -> None:
            if not self.part_uploaded.is_set():
                self.part_uploaded.set()
                assert self.resume.wait(timeout=30), "test never resumed the upload"
            progress(nbytes)

        return self.inner.open_upload(*args, progress=report, **kwargs)


def faiss_keys(s3_client: Any, bucket: str) -> list[str]:
    listing = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return [item["Key"] for item in listing if item["Key"].endswith(".faiss")]


def host_reserved(client: TestClient) -> int:
    reserved: int = client.get("/_heart_beat").json()["memory"]["host_reserved_bytes"]
    return reserved


@both_modes
def test_cancel_queued_jobs_waiting_for_a_worker_or_for_memory(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    store = GatedStore(object_store)
    client = service(store=store, max_workers=2)
    for i in range(4):
        upload(s3_client, bucket, f"idx/q{i}", clustered(2000, 16, seed=i))
    bodies = [fast_body(bucket, f"idx/q{i}", 16, 2000) for i in range(4)]
    admission = client.app.state.admission  # type: ignore[attr-defined]
    one = admission.estimate(BuildRequest.model_validate(bodies[0])).host_bytes
    admission.host_limit = int(one * 1.5)  # one build at a time fits
    ids = [client.post("/_build", json=bodies[0]).json()["job_id"]]
    assert store.waiting.acquire(timeout=10)  # job 0 runs (held at its download)
    ids += [client.post("/_build", json=body).json()["job_id"] for body in bodies[1:]]
    # A worker is free, not the memory: jobs 1, 2 and 3 wait in the queue.
    assert client.get(f"/_jobs/{ids[1]}").json()["state"] == "queued"

    for cancelled in (ids[2], ids[1]):
        response = client.delete(f"/_jobs/{cancelled}")
        assert response.status_code == 202, response.text
        assert response.json()["job_id"] == cancelled
        assert response.json()["cancel_requested"] is True
    # Queued, they left the queue at once.
    assert client.get(f"/_status/{ids[2]}").json() == CANCELLED
    assert client.get(f"/_jobs/{ids[2]}").json()["state"] == "cancelled"

    store.gate.set()
    assert wait_terminal(client, ids[1]) == CANCELLED
    for job_id in (ids[0], ids[3]):
        assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    wait_idle(client)
    assert host_reserved(client) == 0
    assert sorted(faiss_keys(s3_client, bucket)) == ["idx/q0.faiss", "idx/q3.faiss"]
    jobs = client.get("/_jobs").json()
    assert [jobs[i]["started_at"] is None for i in ids] == [False, True, True, False]


def test_cancel_a_running_build_frees_its_worker_and_memory(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    builder = GatedBuilder(add_batch_rows=500, pause_after=2)
    client = service(builder=builder, max_workers=1)
    upload(s3_client, bucket, "idx/run", clustered(5000, 16))
    upload(s3_client, bucket, "idx/next", clustered(2000, 16, seed=1))
    job_id = client.post("/_build", json=fast_body(bucket, "idx/run", 16, 5000)).json()["job_id"]
    next_id = client.post("/_build", json=fast_body(bucket, "idx/next", 16, 2000)).json()["job_id"]
    try:
        assert builder.paused.wait(timeout=30)
        assert host_reserved(client) > 0
        response = client.delete(f"/_jobs/{job_id}")
        assert response.status_code == 202
        accepted = response.json()
        # Accepted: the build stops at its next batch boundary.
        assert accepted["state"] == "building" and accepted["cancel_requested"] is True
        # Two 500-row batches of 5000, counted by their share of the insertion work.
        assert accepted["progress"]["done"] == int(5000 * insertion_share(1000, 5000))
    finally:
        builder.resume.set()
    assert wait_terminal(client, job_id) == CANCELLED
    detail = client.get(f"/_jobs/{job_id}").json()
    assert detail["state"] == "cancelled"
    assert detail["progress"]["done"] == int(5000 * insertion_share(1000, 5000))
    # The only worker and the memory went to the next job, which completes.
    assert wait_terminal(client, next_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    wait_idle(client)
    assert host_reserved(client) == 0
    assert faiss_keys(s3_client, bucket) == ["idx/next.faiss"]

    # A cancelled job may be submitted again: a new attempt under the same id.
    builder.pause_after = 10**6
    again = client.post("/_build", json=fast_body(bucket, "idx/run", 16, 5000)).json()["job_id"]
    assert again == job_id
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    assert client.get(f"/_jobs/{job_id}").json()["attempt"] == 2


def test_cancel_during_a_multipart_upload_aborts_it(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, object_store: Any
) -> None:
    store = UploadGatedStore(object_store)
    client = service(store=store, max_workers=1)
    n, dim = 10000, 128  # a 6 MB index: more than one 5 MiB part
    upload(s3_client, bucket, "idx/up", clustered(n, dim))
    job_id = client.post("/_build", json=fast_body(bucket, "idx/up", dim, n)).json()["job_id"]
    try:
        assert store.part_uploaded.wait(timeout=60)
        assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")
        assert client.get(f"/_jobs/{job_id}").json()["state"] == "uploading"
        assert client.delete(f"/_jobs/{job_id}").status_code == 202
    finally:
        store.resume.set()
    assert wait_terminal(client, job_id) == CANCELLED
    wait_idle(client)
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert faiss_keys(s3_client, bucket) == []
    assert host_reserved(client) == 0


@both_modes
def test_delete_forgets_a_finished_job_answers_404_when_unknown_and_needs_auth(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    client = service(auth_username="ops", auth_password="pw")
    auth = {"Authorization": "Basic " + base64.b64encode(b"ops:pw").decode()}
    upload(s3_client, bucket, "idx/f", clustered(300, 16))
    body = fast_body(bucket, "idx/f", 16, 300)
    job_id = client.post("/_build", json=body, headers=auth).json()["job_id"]
    assert client.delete(f"/_jobs/{job_id}").status_code == 401
    assert client.get(f"/_jobs/{job_id}").status_code == 401
    client.headers.update(auth)
    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    response = client.delete(f"/_jobs/{job_id}")
    assert response.status_code == 200  # forgotten: the job as it ended
    assert response.json()["state"] == "completed" and response.json()["job_id"] == job_id
    assert client.get(f"/_status/{job_id}").status_code == 404
    for gone in (job_id, "never-seen"):
        assert client.delete(f"/_jobs/{gone}").status_code == 404
