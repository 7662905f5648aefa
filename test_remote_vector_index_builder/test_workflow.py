"""The whole pipeline against a local S3 server and real faiss-cpu."""

from __future__ import annotations

import functools
import io
import threading
from typing import Any

import faiss
import numpy as np
import pytest

from remote_vector_index_builder import cli
from remote_vector_index_builder.core import index_io, workflow
from remote_vector_index_builder.core.cpu_builder import CpuBuilder
from remote_vector_index_builder.core.errors import (
    CancelledError,
    DatasetError,
    ObjectNotFoundError,
    TransientStoreError,
)
from remote_vector_index_builder.core.object_store import S3ObjectStore
from remote_vector_index_builder.core.options import SerializationMode
from remote_vector_index_builder.core.params import BuildRequest
from remote_vector_index_builder.core.s3_calls import make_s3_client
from test_remote_vector_index_builder.support import request_for
from testbed.data import (
    clustered,
    cohere_sample,
    doc_id_blob,
    recall_at_k,
    vector_blob,
)
from testbed.faultproxy import Fault, FaultProxy


def keys(s3_client: Any, bucket: str) -> set[str]:
    listing = s3_client.list_objects_v2(Bucket=bucket)
    return {item["Key"] for item in listing.get("Contents", [])}


@pytest.mark.parametrize("mode", list(SerializationMode))
def test_cohere_sample_round_trip(
    s3_client: Any, bucket: str, object_store: Any, mode: SerializationMode, tmp_path: Any
) -> None:
    vectors, doc_ids = cohere_sample()
    stem = "base/uuid_vectors/rand_my.vec.field_0"
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knndid", Body=doc_id_blob(doc_ids))
    request = request_for(bucket, stem, 768, 1000)

    class Recorder(workflow.Tracker):
        def __init__(self) -> None:
            self.stages: list[str] = []
            self.done: dict[str, int] = {}

        def stage(self, stage: workflow.Stage, total: int) -> None:
            self.stages.append(stage.value)
            self.done[stage.value] = 0

        def advance(self, amount: int) -> None:
            self.done[self.stages[-1]] += amount

    tracker = Recorder()
    result = workflow.run(
        request, object_store, CpuBuilder(), mode=mode, tmp_dir=tmp_path, tracker=tracker
    )
    assert result.index_key == f"{stem}.faiss" and result.file_name == "rand_my.vec.field_0.faiss"
    assert [s.stage for s in result.stages][:3] == ["download", "parse", "build"]
    assert tracker.done["download"] == vectors.nbytes + doc_ids.nbytes
    assert tracker.done["build"] == 1000
    raw = s3_client.get_object(Bucket=bucket, Key=result.index_key)["Body"].read()
    assert len(raw) == result.index_bytes
    index = index_io.read(raw)
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), doc_ids)
    queries = vectors[:100] + np.random.default_rng(1).normal(0, 0.05, (100, 768)).astype("f4")
    assert recall_at_k(index, vectors, doc_ids, queries, "l2") >= 0.95
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_hostile_vector_path_stays_in_bucket_and_temp_dir(
    s3_client: Any, bucket: str, object_store: Any, tmp_path: Any
) -> None:
    # '..' segments are refused by the request model (a normalizing proxy would resolve
    # them); an absolute, unicode, long key with look-alike segments is just a key.
    with pytest.raises(ValueError, match=r"'\.\.' path segments"):
        request_for(bucket, "../../etc/seg", 8, 200)
    stem = "/etc/ünïcødé/" + "x" * 200 + "/.../..seg"
    vectors = clustered(200, 8)
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knndid", Body=doc_id_blob(np.arange(200)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    request = request_for(bucket, stem, 8, 200)
    workflow.run(request, object_store, CpuBuilder(), mode=SerializationMode.DISK, tmp_dir=scratch)
    assert f"{stem}.faiss" in keys(s3_client, bucket)
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]


def test_errors_are_typed_and_leave_no_index(
    s3_client: Any, bucket: str, object_store: Any
) -> None:
    vectors = clustered(100, 8)
    s3_client.put_object(Bucket=bucket, Key="a.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key="a.knndid", Body=doc_id_blob(np.arange(100)))
    s3_client.put_object(Bucket=bucket, Key="t.knnvec", Body=vector_blob(vectors)[:-5])
    s3_client.put_object(Bucket=bucket, Key="t.knndid", Body=doc_id_blob(np.arange(100)))

    with pytest.raises(ObjectNotFoundError) as missing:
        workflow.run(request_for(bucket, "nope", 8, 100), object_store, CpuBuilder())
    assert bucket in str(missing.value) and "nope.knnvec" in str(missing.value)

    with pytest.raises(DatasetError, match=r"holds 3200 bytes, expected 6400 \(doc_count 100 x"):
        workflow.run(
            request_for(bucket, "a", 8, 100, dimension=8, doc_count=100).model_copy(
                update={"dimension": 16}
            ),
            object_store,
            CpuBuilder(),
        )
    with pytest.raises(DatasetError, match="3195 bytes, expected 3200"):
        workflow.run(request_for(bucket, "t", 8, 100), object_store, CpuBuilder())

    class CancelDuringUpload(workflow.Tracker):
        def stage(self, stage: workflow.Stage, total: int) -> None:
            if stage is workflow.Stage.UPLOAD:
                raise CancelledError("cancelled by operator")

    with pytest.raises(CancelledError):
        workflow.run(
            request_for(bucket, "a", 8, 100),
            object_store,
            CpuBuilder(),
            tracker=CancelDuringUpload(),
        )
    assert not {k for k in keys(s3_client, bucket) if k.endswith(".faiss")}
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_an_attempt_first_aborts_the_uploads_an_earlier_attempt_left(
    s3_client: Any, bucket: str, object_store: Any
) -> None:
    vectors = clustered(200, 8)
    s3_client.put_object(Bucket=bucket, Key="left/seg.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key="left/seg.knndid", Body=doc_id_blob(np.arange(200)))
    request = request_for(bucket, "left/seg", 8, 200)
    # What attempts killed (kill -9) during their overlapped upload leave behind: an
    # upload with parts sent; two of them. A key that only starts alike is not ours.
    for key in (request.index_key, request.index_key, f"{request.index_key}.other"):
        upload_id = s3_client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3_client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=10000, Body=b"x" * 1024
        )

    workflow.run(request, object_store, CpuBuilder())

    left = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [upload["Key"] for upload in left] == [f"{request.index_key}.other"]
    assert request.index_key in keys(s3_client, bucket)


def test_an_attempt_ends_by_aborting_an_upload_a_stale_attempt_opened_meanwhile(
    s3_client: Any, bucket: str, object_store: Any
) -> None:
    """A paused replica resumed after this attempt's first clean-up opens its own upload,
    and is killed before its commit check fences it: nothing else would abort that one."""
    vectors = clustered(200, 8)
    s3_client.put_object(Bucket=bucket, Key="stale/seg.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key="stale/seg.knndid", Body=doc_id_blob(np.arange(200)))
    request = request_for(bucket, "stale/seg", 8, 200)

    class StaleUploadMeanwhile(CpuBuilder):
        def build(self, *args: Any, **kwargs: Any) -> Any:
            s3_client.create_multipart_upload(Bucket=bucket, Key=request.index_key)
            return super().build(*args, **kwargs)

    workflow.run(request, object_store, StaleUploadMeanwhile())

    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert request.index_key in keys(s3_client, bucket)


def test_build_cli_against_local_s3(
    s3_client: Any,
    bucket: str,
    s3_config: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vectors, doc_ids = cohere_sample()
    s3_client.put_object(Bucket=bucket, Key="i/v_vectors/s_f_0.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key="i/v_vectors/s_f_0.knndid", Body=doc_id_blob(doc_ids))
    monkeypatch.setenv("RVIB_S3_PATH_STYLE", "true")
    code = cli.main(
        [
            "build",
            "--bucket",
            bucket,
            "--vector-path",
            "i/v_vectors/s_f_0.knnvec",
            "--doc-id-path",
            "i/v_vectors/s_f_0.knndid",
            "--dimension",
            "768",
            "--doc-count",
            "1000",
            "--device",
            "cpu",
            "--endpoint-url",
            s3_config.endpoint_url,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0] == "s_f_0.faiss"
    for stage in ("download", "parse", "build", "serialize+upload", "total"):
        assert stage in out
    raw = s3_client.get_object(Bucket=bucket, Key="i/v_vectors/s_f_0.faiss")["Body"].read()
    assert raw[:4] == b"IxMp" and raw[37:41] == b"IHNf"

    code = cli.main(
        [
            "build",
            "--bucket",
            bucket,
            "--vector-path",
            "i/none.knnvec",
            "--doc-id-path",
            "i/none.knndid",
            "--dimension",
            "768",
            "--doc-count",
            "1000",
            "--device",
            "cpu",
            "--endpoint-url",
            s3_config.endpoint_url,
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "build failed: " in err and "i/none.knnvec" in err and "does not exist" in err


def test_index_io_stream_equals_faiss_file(tmp_path: Any) -> None:
    vectors = clustered(300, 16)
    index = faiss.IndexIDMap(faiss.IndexHNSWFlat(16, 8))
    index.add_with_ids(vectors, np.arange(300, dtype=np.int64))
    sink = io.BytesIO()
    index_io.write(index, sink)
    faiss.write_index(index, str(tmp_path / "ref.faiss"))
    assert sink.getvalue() == (tmp_path / "ref.faiss").read_bytes()


# --------------------------------------------------------------------------------------
# The upload overlapped with the build (memory mode)
# --------------------------------------------------------------------------------------

# An 18 MB storage section (6,000 x 768 floats), so several 5 MiB parts go up early.
OVERLAP_DIM = 768
OVERLAP_N = {"float": 6000, "half_float": 12000, "byte": 24000}
SMALL_HNSW = {"space_type": "l2", "algorithm_parameters": {"m": 8, "ef_construction": 16}}


class KeepingBuilder(CpuBuilder):
    """The real CPU builder, keeping the index it built (to serialize it locally too)."""

    def __init__(self) -> None:
        super().__init__(add_batch_rows=1000)
        self.built: Any = None

    def build(self, *args: Any, **kwargs: Any) -> Any:
        self.built = super().build(*args, **kwargs)
        return self.built


class PartsDuringBuild(workflow.Tracker):
    """Counts the index's part uploads the proxy saw before the build stage ended."""

    def __init__(self, proxy: FaultProxy, cancel_after_rows: int | None = None) -> None:
        self.proxy = proxy
        self.cancel_after_rows = cancel_after_rows
        self.current: workflow.Stage | None = None
        self.rows = 0
        self.parts_in_build: list[str] = []

    def stage(self, stage: workflow.Stage, total: int) -> None:
        self.current = stage

    def advance(self, amount: int) -> None:
        if self.current is workflow.Stage.BUILD:
            self.rows += amount
            if self.cancel_after_rows is not None and self.rows >= self.cancel_after_rows:
                raise CancelledError("cancelled by the test")

    def stage_finished(self, stage: workflow.Stage, timing: workflow.StageTiming) -> None:
        if stage is workflow.Stage.BUILD:
            self.parts_in_build = [
                s.target for s in self.proxy.seen if s.method == "PUT" and "partNumber=" in s.target
            ]


def overlap_setup(
    s3_client: Any,
    s3_config: Any,
    bucket: str,
    proxy: FaultProxy,
    data_type: str = "float",
    n: int | None = None,
) -> tuple[BuildRequest, S3ObjectStore]:
    n = n or OVERLAP_N[data_type]
    vectors = clustered(n, OVERLAP_DIM, seed=11)
    if data_type == "byte":
        vectors = np.clip(np.rint(vectors * 40), -128, 127).astype(np.int8)
    stem = f"ov/{data_type}"
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knnvec", Body=vector_blob(vectors))
    ids = np.arange(n, dtype=np.int32) * 3 + 7
    s3_client.put_object(Bucket=bucket, Key=f"{stem}.knndid", Body=doc_id_blob(ids))
    config = s3_config.model_copy(update={"endpoint_url": proxy.url})
    store = S3ObjectStore(make_s3_client(config), config, sleep=lambda _: None)
    request = request_for(
        bucket,
        stem,
        OVERLAP_DIM,
        n,
        data_type=data_type,
        index_parameters=SMALL_HNSW,
    )
    return request, store


@pytest.mark.parametrize("data_type", ["float", "half_float", "byte"])
def test_overlapped_upload_is_the_sequential_file_byte_for_byte(
    s3_server: str, s3_client: Any, s3_config: Any, bucket: str, data_type: str
) -> None:
    with FaultProxy(s3_server) as proxy:
        request, store = overlap_setup(s3_client, s3_config, bucket, proxy, data_type)
        builder, tracker = KeepingBuilder(), PartsDuringBuild(proxy)
        result = workflow.run(request, store, builder, tracker=tracker)

    uploaded = s3_client.get_object(Bucket=bucket, Key=request.index_key)["Body"].read()
    sequential = io.BytesIO()
    index_io.write(builder.built, sequential)
    assert uploaded == sequential.getvalue()
    assert result.index_bytes == len(uploaded)
    # The storage section went up while the graph was built, as the highest part numbers.
    assert tracker.parts_in_build
    assert all(
        "partNumber=9" in target or "partNumber=10000" in target
        for target in tracker.parts_in_build
    )
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_overlapped_upload_is_aborted_when_the_build_is_cancelled(
    s3_server: str, s3_client: Any, s3_config: Any, bucket: str
) -> None:
    with FaultProxy(s3_server) as proxy:
        request, store = overlap_setup(s3_client, s3_config, bucket, proxy)
        tracker = PartsDuringBuild(proxy, cancel_after_rows=4000)
        with pytest.raises(CancelledError):
            workflow.run(request, store, KeepingBuilder(), tracker=tracker)
        parts_sent = [s for s in proxy.seen if s.method == "PUT" and "partNumber=" in s.target]
    assert parts_sent  # some parts were up when the job was cancelled...
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # ...and are gone
    assert request.index_key not in keys(s3_client, bucket)


def test_overlapped_upload_is_aborted_when_a_part_keeps_failing(
    s3_server: str, s3_client: Any, s3_config: Any, bucket: str
) -> None:
    with FaultProxy(s3_server) as proxy:
        request, store = overlap_setup(s3_client, s3_config, bucket, proxy)
        proxy.add(Fault("reset", "PUT", "partNumber=10000", at="request"))
        with pytest.raises(TransientStoreError, match="part 10000"):
            workflow.run(request, store, KeepingBuilder())
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert request.index_key not in keys(s3_client, bucket)


def test_overlap_falls_back_when_the_tail_is_too_small(
    s3_server: str, s3_client: Any, s3_config: Any, bucket: str
) -> None:
    vectors = clustered(500, 32, seed=2)
    s3_client.put_object(Bucket=bucket, Key="tiny.knnvec", Body=vector_blob(vectors))
    ids = np.arange(500, dtype=np.int32)
    s3_client.put_object(Bucket=bucket, Key="tiny.knndid", Body=doc_id_blob(ids))
    with FaultProxy(s3_server) as proxy:
        config = s3_config.model_copy(update={"endpoint_url": proxy.url})
        store = S3ObjectStore(make_s3_client(config), config)
        builder = KeepingBuilder()
        workflow.run(request_for(bucket, "tiny", 32, 500), store, builder)
        # No multipart upload (the only "?uploads" request lists an earlier attempt's).
        assert not [s for s in proxy.seen if "uploads" in s.target and s.method != "GET"]
    uploaded = s3_client.get_object(Bucket=bucket, Key="tiny.faiss")["Body"].read()
    sequential = io.BytesIO()
    index_io.write(builder.built, sequential)
    assert uploaded == sequential.getvalue()


# --------------------------------------------------------------------------------------
# Tracker.commit_check: right before the index becomes visible, on every upload path
# --------------------------------------------------------------------------------------


class CommitChecks(workflow.Tracker):
    """Notes how many requests the proxy had seen at each commit check; refuses if asked."""

    def __init__(self, proxy: FaultProxy, refuse: bool) -> None:
        self.proxy = proxy
        self.refuse = refuse
        self.seen_at: list[int] = []

    def commit_check(self) -> None:
        self.seen_at.append(len(self.proxy.seen))
        if self.refuse:
            raise CancelledError("this replica no longer owns the job")


# (serialization mode, overlapped, rows x dimension) of each way the index goes up:
# 300 x 16 is one PutObject; 2,700 x 512 (a 6 MB index) a multipart upload of 5 MiB
# parts; 6,000 x 768 floats (an 18 MB storage section) the overlapped upload.
UPLOAD_PATHS = {
    "memory-put": ("memory", True, (300, 16)),
    "memory-multipart": ("memory", False, (2700, 512)),
    "memory-overlapped": ("memory", True, (6000, 768)),
    "disk-put": ("disk", True, (300, 16)),
    "disk-multipart": ("disk", True, (2700, 512)),
}


@pytest.mark.parametrize("refuse", [False, True], ids=["passes", "raises"])
@pytest.mark.parametrize("path", list(UPLOAD_PATHS))
def test_commit_check_runs_right_before_the_index_becomes_visible(
    s3_server: str, s3_client: Any, s3_config: Any, bucket: str, path: str, refuse: bool
) -> None:
    mode, overlap, (n, dim) = UPLOAD_PATHS[path]
    vectors = clustered(n, dim, seed=4)
    s3_client.put_object(Bucket=bucket, Key="cc/seg.knnvec", Body=vector_blob(vectors))
    s3_client.put_object(Bucket=bucket, Key="cc/seg.knndid", Body=doc_id_blob(np.arange(n)))
    request = request_for(bucket, "cc/seg", dim, n, index_parameters=SMALL_HNSW)
    with FaultProxy(s3_server) as proxy:
        config = s3_config.model_copy(update={"endpoint_url": proxy.url})
        store = S3ObjectStore(make_s3_client(config), config)
        tracker = CommitChecks(proxy, refuse)
        run = functools.partial(
            workflow.run,
            request,
            store,
            CpuBuilder(),
            mode=SerializationMode(mode),
            tracker=tracker,
            overlap_upload=overlap,
        )
        if refuse:
            with pytest.raises(CancelledError, match="no longer owns"):
                run()
        else:
            run()
        seen = proxy.seen
    assert len(tracker.seen_at) == 1
    before, after = seen[: tracker.seen_at[0]], seen[tracker.seen_at[0] :]
    multipart = "put" not in path
    # Every part went up before the check...
    assert any("partNumber=" in s.target for s in before) == multipart
    if path == "memory-overlapped":
        assert any("partNumber=10000" in s.target for s in before)
    # ...and what follows it is the one request that makes the index visible (then the
    # listing of other attempts' uploads under its key), or, when the check raises, the
    # abort of the upload (nothing for a single PUT).
    if not refuse:
        assert [(s.method, "uploadId=" in s.target) for s in after] == [
            ("POST" if multipart else "PUT", multipart),
            ("GET", False),
        ]
        assert "?uploads" in after[-1].target
        assert request.index_key in keys(s3_client, bucket)
    else:
        assert [s.method for s in after] == (["DELETE"] if multipart else [])
        assert request.index_key not in keys(s3_client, bucket)
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_the_build_never_waits_for_an_early_part_in_flight(
    s3_server: str, s3_client: Any, s3_config: Any, bucket: str
) -> None:
    """Parts held in flight (a slow S3) do not hold the build: the parts that find no room
    go with a later batch or after the build."""
    released, held, gave_up = threading.Event(), threading.Event(), threading.Event()

    def hold(**_: Any) -> None:
        held.set()
        # The end of the build releases the parts; before the fix the build waited for
        # them, and only this bound ended the wait.
        if not released.wait(60):
            gave_up.set()

    class ReleaseAtBuildEnd(workflow.Tracker):
        built_while_held = False

        def stage_finished(self, stage: workflow.Stage, timing: workflow.StageTiming) -> None:
            if stage is workflow.Stage.BUILD:
                self.built_while_held = held.is_set() and not gave_up.is_set()
                released.set()

    with FaultProxy(s3_server) as proxy:
        # 9,000 rows: four 5 MiB parts are ready before the build ends, two fit in flight.
        request, _ = overlap_setup(s3_client, s3_config, bucket, proxy, n=9000)
        config = s3_config.model_copy(update={"endpoint_url": proxy.url})
        client = make_s3_client(config)
        client.meta.events.register("before-send.s3.UploadPart", hold)
        store = S3ObjectStore(client, config)
        tracker, builder = ReleaseAtBuildEnd(), KeepingBuilder()
        result = workflow.run(request, store, builder, tracker=tracker)
    assert tracker.built_while_held
    uploaded = s3_client.get_object(Bucket=bucket, Key=request.index_key)["Body"].read()
    sequential = io.BytesIO()
    index_io.write(builder.built, sequential)
    assert uploaded == sequential.getvalue() and len(uploaded) == result.index_bytes
