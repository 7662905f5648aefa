"""The whole pipeline against a local S3 server and real faiss-cpu."""

from __future__ import annotations

import io
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
)
from remote_vector_index_builder.core.index_io import SerializationMode
from remote_vector_index_builder.core.params import BuildRequest
from test_remote_vector_index_builder.data import (
    clustered,
    cohere_sample,
    doc_id_blob,
    recall_at_k,
    vector_blob,
)


def request_for(bucket: str, stem: str, dim: int, n: int, **kw: Any) -> BuildRequest:
    return BuildRequest.model_validate(
        {
            "repository_type": "s3",
            "container_name": bucket,
            "vector_path": f"{stem}.knnvec",
            "doc_id_path": f"{stem}.knndid",
            "dimension": dim,
            "doc_count": n,
            **kw,
        }
    )


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
