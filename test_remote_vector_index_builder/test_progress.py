"""Live progress: ``GET /_jobs/{job_id}`` during real builds, and the CLI's progress bar."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from remote_vector_index_builder.build_command import ProgressBar
from remote_vector_index_builder.core import workflow
from remote_vector_index_builder.core.cpu_builder import CpuBuilder, insertion_share
from remote_vector_index_builder.core.options import SerializationMode
from remote_vector_index_builder.core.params import BuildRequest
from test_remote_vector_index_builder.support import (
    Clock,
    GatedBuilder,
    both_modes,
    build_body,
    fast_body,
    upload,
    wait_terminal,
)
from testbed.data import clustered

STAGE_ORDER = ["download", "parse", "build", "serialize", "upload"]


def test_progress_of_a_running_build_has_percent_eta_and_stage_times(
    service: Callable[..., TestClient], s3_client: Any, bucket: str
) -> None:
    clock = Clock()
    builder = GatedBuilder(add_batch_rows=1000, pause_after=2)
    client = service(clock=clock, builder=builder)
    upload(s3_client, bucket, "idx/p", clustered(10000, 16))
    job_id = client.post("/_build", json=fast_body(bucket, "idx/p", 16, 10000)).json()["job_id"]
    try:
        assert builder.paused.wait(timeout=30)
        clock.now += 10.0  # 2,000 of 10,000 vectors in 10 s
        detail = client.get(f"/_jobs/{job_id}").json()
    finally:
        builder.resume.set()
    assert detail["job_id"] == job_id and detail["state"] == "building"
    assert detail["task_status"] == "RUNNING_INDEX_BUILD" and detail["cancel_requested"] is False
    # Vectors count by their share of the insertion work (cpu_builder.insertion_share).
    done = int(10000 * insertion_share(2000, 10000))
    assert detail["progress"] == {
        "stage": "build",
        "unit": "vectors",
        "done": done,
        "total": 10000,
        "percent": round(100 * done / 10000, 2),
        "eta_seconds": round((10000 - done) * 10.0 / done, 1),
    }
    assert list(detail["stages"]) == ["download", "parse", "build"]
    assert detail["stages"]["download"]["seconds"] > 0
    assert detail["stages"]["build"] == {"started_at": 1_000_000.0, "seconds": None}
    assert detail["vector_bytes"] == 10000 * 16 * 4 and detail["device"] == "cpu"

    assert wait_terminal(client, job_id)["task_status"] == "COMPLETED_INDEX_BUILD"
    done = client.get(f"/_jobs/{job_id}").json()
    assert done["state"] == "completed" and done["error_message"] is None
    assert done["progress"]["percent"] == 100.0 and done["progress"]["eta_seconds"] == 0.0
    # In memory mode the index streams into the upload: one stage whose estimated
    # total became the real size of the object.
    assert list(done["stages"]) == ["download", "parse", "build", "upload"]
    assert all(stage["seconds"] is not None for stage in done["stages"].values())
    size = s3_client.head_object(Bucket=bucket, Key="idx/p.faiss")["ContentLength"]
    assert done["index_bytes"] == size
    assert done["progress"]["done"] == done["progress"]["total"] == size
    assert client.get("/_jobs/never-seen").status_code == 404


@both_modes
@pytest.mark.parametrize("mode", list(SerializationMode))
def test_polled_progress_is_monotonic_and_reaches_100(
    service: Callable[..., TestClient], s3_client: Any, bucket: str, mode: SerializationMode
) -> None:
    client = service(add_batch_rows=500, index_serialization_mode=mode.value)
    n, dim = 6000, 32
    upload(s3_client, bucket, "idx/m", clustered(n, dim))
    job_id = client.post("/_build", json=fast_body(bucket, "idx/m", dim, n)).json()["job_id"]
    samples: list[dict[str, Any]] = []
    pause = threading.Event()
    while not samples or samples[-1]["state"] not in ("completed", "failed"):
        samples.append(client.get(f"/_jobs/{job_id}").json())
        pause.wait(0.002)  # leave the build a core
    assert samples[-1]["state"] == "completed", samples[-1]["error_message"]

    last_stage, last_done, last_percent = -1, 0, 0.0
    for sample in samples:
        progress = sample["progress"]
        if progress["stage"] is None:
            assert sample["state"] == "queued" and last_stage == -1
            continue
        stage = STAGE_ORDER.index(progress["stage"])
        assert stage >= last_stage
        if progress["percent"] is None:
            # A fleet replica claims a job (downloading) before its first heartbeat
            # publishes the stage's size: unknown, never a step back.
            assert progress["total"] == 0 and last_stage <= 0 and last_done == 0
            continue
        if stage == last_stage:
            assert progress["done"] >= last_done
            assert progress["percent"] >= last_percent
        assert 0.0 <= progress["percent"] <= 100.0
        last_stage, last_done, last_percent = stage, progress["done"], progress["percent"]
    assert samples[-1]["progress"]["percent"] == 100.0
    expected = ["download", "parse", "build"]
    expected += ["upload"] if mode is SerializationMode.MEMORY else ["serialize", "upload"]
    assert list(samples[-1]["stages"]) == expected


def test_serialized_size_estimate_is_close_to_the_real_size() -> None:
    # The serialize/upload stage's total is this estimate until the file is written.
    for kw, actual in (({}, 8163879), ({"skip_stored_vectors": True}, 3043848)):
        request = BuildRequest.model_validate(
            build_body("b", "idx/e", 64, 20000, index_parameters={"space_type": "l2"}, **kw)
        )
        estimate = workflow.serialized_bytes_estimate(request)
        assert abs(estimate - actual) / actual < 0.01, (kw, estimate)


def _cli_run(
    s3_client: Any, bucket: str, object_store: Any, tracker: ProgressBar, mode: SerializationMode
) -> None:
    n, dim = 3000, 32
    upload(s3_client, bucket, "idx/cli", clustered(n, dim))
    request = BuildRequest.model_validate(fast_body(bucket, "idx/cli", dim, n))
    workflow.run(request, object_store, CpuBuilder(add_batch_rows=250), mode=mode, tracker=tracker)


def test_cli_progress_without_a_terminal_prints_plain_lines(
    s3_client: Any, bucket: str, object_store: Any
) -> None:
    stream = io.StringIO()
    _cli_run(s3_client, bucket, object_store, ProgressBar(stream), SerializationMode.DISK)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    finished = [line.split()[0] for line in lines if " done in " in line]
    assert finished == ["download", "parse", "build", "serialize", "upload"]
    # A few lines per stage, percent rising within each, 100 % when it is done.
    percents: dict[str, list[float]] = {}
    for line in lines:
        stage, rest = line.split(" ", 1)
        percents.setdefault(stage, []).append(float(rest.split("]")[1].split("%")[0]))
    for stage, values in percents.items():
        assert values == sorted(values) and values[-1] == 100.0, (stage, values)
        assert len(values) <= 12
    assert len(percents["build"]) >= 5  # 12 batches of 250 vectors, a line per tenth
    build_done = next(line for line in lines if line.startswith("build") and "done in" in line)
    assert "3,000 vectors of 3,000 vectors" in build_done


def test_cli_progress_on_a_terminal_redraws_one_line_per_stage(
    s3_client: Any, bucket: str, object_store: Any
) -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, tty=True, redraw_interval_s=0.0)
    _cli_run(s3_client, bucket, object_store, bar, SerializationMode.MEMORY)
    text = stream.getvalue()
    # Each stage is redrawn in place (\r ... ESC[K) and left as one finished line.
    finished = text.split("\n")
    assert finished[-1] == ""
    assert [line.rsplit("\r", 1)[-1].split()[0] for line in finished[:-1]] == [
        "download",
        "parse",
        "build",
        "upload",
    ]
    assert all("100.0 %" in line.rsplit("\r", 1)[-1] for line in finished[:-1])
    assert text.count("\r") > 4 * 2 and "\x1b[K" in text
    assert "ETA" in text  # shown while a stage runs, gone from the finished lines
    assert all("ETA" not in line.rsplit("\r", 1)[-1] for line in finished[:-1])


def test_stage_progress_percent_is_capped_and_eta_needs_a_rate() -> None:
    view = workflow.StageProgress(workflow.Stage.UPLOAD, done=120, total=100, elapsed_s=3.0)
    assert view.percent == 100.0 and view.eta_s == 0.0 and view.unit == "bytes"
    assert workflow.StageProgress(workflow.Stage.BUILD, 0, 100, 5.0).eta_s is None
    assert workflow.StageProgress(workflow.Stage.BUILD, 0, 0, 5.0).percent is None
    halfway = workflow.StageProgress(workflow.Stage.BUILD, 50, 100, 5.0)
    assert halfway.percent == 50.0 and halfway.eta_s == 5.0 and halfway.unit == "vectors"
    assert np.isclose(workflow.StageProgress(workflow.Stage.PARSE, 1, 3, 1.0).eta_s or 0, 2.0)
