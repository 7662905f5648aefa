"""The chaos run's traffic: the requests it sends and the polls that follow them.

Drawn from the seed before the run starts: good jobs (2,000 x 64 float, and
one in five 6,000 x 768 float, whose 17.6 MiB storage section is over the
15 MiB at which the index upload overlaps the build) mixed with the bad
requests of ``BAD_KINDS``, each kind at least once. Every job gets its own copy
of the vectors (a server-side copy) and its own doc ids. The poller reads every
accepted job's ``/_status`` about once a second until it ends, as the k-NN
client does, and its ``/_jobs/{id}`` when it ends.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.chaos_checks import COMPLETED, FAILED, Answers, Tracked
from benchmarks.chaos_fleet import ChaosConfig
from testbed.data import clustered, doc_id_blob, vector_blob
from testbed.fleet_harness import request

BUCKET = "rvib-chaos"
SEGMENTS = {"small": (2000, 64), "large": (6000, 768)}
LARGE_SHARE = 0.2
# Seconds between good jobs (uniform); bad requests come on top, about one per
# BAD_EVERY_S seconds and each kind at least once. One good job a second was more
# than 3 one-slot replicas built under the faults on this 2-core machine (31 jobs
# queued after a minute, 29 s to drain): the run is about faults, not backlog.
GOOD_GAP_S = (1.0, 2.5)
BAD_EVERY_S = 6.0
POLL_ROUND_S = 1.0
HTTP_TIMEOUT_S = 15.0
# The k-NN client retries these answers (and a broken connection); so does the run.
RETRIED = {408, 409, 429, 500, 502, 503, 509}
POST_ATTEMPTS = 4
TERMINAL = {COMPLETED, FAILED}
BAD_KINDS = (
    "m1",
    "nested200",
    "nested260",
    "huge_ef",
    "wrong_count",
    "wrong_dim",
    "unknown_bucket",
    "missing_object",
    "bad_json",
    "bad_space",
)
BAD_DESCRIPTIONS = {
    "m1": "m: 1 (Faiss's HNSW crashes on it)",
    "nested200": "algorithm_parameters extra nested 200 deep",
    "nested260": "algorithm_parameters extra nested 260 deep",
    "huge_ef": "ef_search 2^31-1",
    "wrong_count": "doc_count 5 more than the blob holds",
    "wrong_dim": "dimension twice the blob's",
    "unknown_bucket": "a bucket that does not exist",
    "missing_object": "a vector blob that does not exist",
    "bad_json": "a body that is not JSON",
    "bad_space": "space_type cosine",
}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value}
    return value


class Data:
    """Seeded base vectors in the bucket; each job gets its own copy and doc ids."""

    def __init__(self, client: Any, seed: int) -> None:
        self.client = client
        self.vectors = {
            name: clustered(n, dim, seed=seed + i)
            for i, (name, (n, dim)) in enumerate(SEGMENTS.items())
        }
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=BUCKET)
        for name, rows in self.vectors.items():
            client.put_object(Bucket=BUCKET, Key=f"base/{name}.knnvec", Body=vector_blob(rows))

    def segment(self, seq: int, name: str, tag: str) -> tuple[str, str, np.ndarray]:
        """A job's own vector blob (a server-side copy) and doc ids (unique to the job)."""
        n = SEGMENTS[name][0]
        stem = f"chaos/{seq:05d}-{tag}/seg"
        self.client.copy_object(
            Bucket=BUCKET,
            Key=f"{stem}.knnvec",
            CopySource={"Bucket": BUCKET, "Key": f"base/{name}.knnvec"},
        )
        doc_ids = (np.arange(n, dtype=np.int64) * 7 + seq * 100_000).astype(np.int32)
        self.client.put_object(Bucket=BUCKET, Key=f"{stem}.knndid", Body=doc_id_blob(doc_ids))
        return f"{stem}.knnvec", f"{stem}.knndid", doc_ids


def schedule(config: ChaosConfig) -> list[tuple[float, str]]:
    """``(seconds after the start, kind)`` of every request, drawn from the seed."""
    rng = random.Random(f"{config.seed}-traffic")
    plan: list[tuple[float, str]] = []
    t = rng.uniform(*GOOD_GAP_S)
    while t < config.chaos_s:
        plan.append((t, "large" if rng.random() < LARGE_SHARE else "small"))
        t += rng.uniform(*GOOD_GAP_S)
    kinds = [k for k in BAD_KINDS if k not in config.exclude]
    if kinds:
        rounds = max(1, round(config.chaos_s / BAD_EVERY_S / len(kinds)))
        bad = kinds * rounds
        rng.shuffle(bad)
        plan += [(rng.uniform(1.0, max(1.5, config.chaos_s - 5.0)), kind) for kind in bad]
    return sorted(plan)


class Traffic:
    """Submits the schedule through the proxy, and polls what was accepted."""

    def __init__(self, url: str, data: Data, seed: int) -> None:
        self.url = url
        self.data = data
        self.rng = random.Random(f"{seed}-bodies")
        self.jobs: list[Tracked] = []
        self.answers = Answers()
        self.lock = threading.Lock()
        self.seq = 0

    # -- requests --------------------------------------------------------------------------

    def _body(self, name: str, tag: str) -> tuple[dict[str, Any], np.ndarray]:
        self.seq += 1
        vector_key, doc_id_key, doc_ids = self.data.segment(self.seq, name, tag)
        n, dim = SEGMENTS[name]
        body = {
            "repository_type": "s3",
            "container_name": BUCKET,
            "vector_path": vector_key,
            "doc_id_path": doc_id_key,
            "tenant_id": "chaos",
            "dimension": dim,
            "doc_count": n,
            "data_type": "float",
            "index_parameters": {
                "space_type": self.rng.choice(["l2", "innerproduct"]),
                "algorithm_parameters": {
                    "m": self.rng.choice([8, 16, 24]),
                    "ef_construction": self.rng.choice([40, 64, 100]),
                    "ef_search": self.rng.choice([16, 50, 100]),
                },
            },
        }
        return body, doc_ids

    def submit(self, kind: str) -> None:
        name = "large" if kind == "large" else "small"
        body, doc_ids = self._body(name, kind)
        algorithm = body["index_parameters"]["algorithm_parameters"]
        segment: str | None = name
        raw: bytes | None = None
        if kind == "m1":
            algorithm["m"] = 1
        elif kind in ("nested200", "nested260"):
            algorithm["future_option"] = _nested(int(kind[-3:]))
        elif kind == "huge_ef":
            algorithm["ef_search"] = 2**31 - 1
        elif kind == "wrong_count":
            body["doc_count"] += 5
            segment = None
        elif kind == "wrong_dim":
            body["dimension"] *= 2
            segment = None
        elif kind == "unknown_bucket":
            body["container_name"] = "rvib-chaos-no-such-bucket"
            segment = None
        elif kind == "missing_object":
            body["vector_path"] = body["vector_path"].replace("/seg.", "/missing.")
            segment = None
        elif kind == "bad_json":
            raw = json.dumps(body).encode()[:-7]
        elif kind == "bad_space":
            body["index_parameters"]["space_type"] = "cosine"
        code, answer = self._post(kind, body, raw)
        if kind in BAD_KINDS:
            with self.lock:
                self.answers.posts.append((kind, code, str(body["vector_path"])))
        if code == "200" and isinstance(answer, dict) and "job_id" in answer:
            job = Tracked(
                job_id=str(answer["job_id"]),
                kind=kind,
                body=body,
                segment=segment,
                doc_ids=doc_ids,
                accepted_at=time.time(),
            )
            with self.lock:
                self.jobs.append(job)

    def _post(self, kind: str, body: dict[str, Any], raw: bytes | None) -> tuple[str, Any]:
        label = "POST /_build " + ("good" if kind in ("small", "large", "final") else kind)
        code, answer = "error", None
        for _ in range(POST_ATTEMPTS):
            try:
                status, headers, answer = _send(self.url, "POST", "/_build", raw or body)
                code = str(status)
            except (OSError, http.client.HTTPException):
                status, headers, code = 0, {}, "error"
            self._count(label, code, headers, kind)
            if status and status not in RETRIED:
                break
            time.sleep(min(float(headers.get("retry-after", 0.5)), 3.0))
        return code, answer

    def _count(self, label: str, code: str, headers: dict[str, str], kind: str) -> None:
        with self.lock:
            self.answers.counts[(label, code)] += 1
            if code == "500":
                self.answers.odd[f"{label} answered 500 for a {kind} job"] += 1
            elif code == "503" and "retry-after" not in headers:
                self.answers.odd[f"{label} answered 503 without Retry-After ({kind})"] += 1

    # -- polls -----------------------------------------------------------------------------

    def live(self) -> list[Tracked]:
        with self.lock:
            return [job for job in self.jobs if job.status is None]

    def poll(self, job: Tracked) -> None:
        try:
            status, headers, answer = _send(self.url, "GET", f"/_status/{job.job_id}")
            code = str(status)
        except (OSError, http.client.HTTPException):
            status, headers, answer, code = 0, {}, None, "error"
        job.polls += 1
        self._count("GET /_status", code, headers, job.kind)
        if status == 404:
            job.lost.append(time.time())
        if status != 200 or not isinstance(answer, dict):
            return
        if answer.get("task_status") in TERMINAL:
            detail = self.detail(job)
            with self.lock:
                job.detail = detail
                job.status = str(answer["task_status"])
                job.ended_at = time.time()

    def detail(self, job: Tracked) -> dict[str, Any] | None:
        for _ in range(5):
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, headers, answer = _send(self.url, "GET", f"/_jobs/{job.job_id}")
                self._count("GET /_jobs/{id}", str(status), headers, job.kind)
                if status == 200 and isinstance(answer, dict):
                    return answer
            time.sleep(0.5)
        return None


def _send(
    url: str, method: str, path: str, body: dict[str, Any] | bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    if isinstance(body, bytes):  # not JSON on purpose
        host, _, port = url[len("http://") :].partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        with contextlib.suppress(ValueError):
            return response.status, headers, json.loads(raw)
        return response.status, headers, raw.decode(errors="replace")
    return request(method, url + path, body, timeout=HTTP_TIMEOUT_S)


class Poller(threading.Thread):
    """Polls every live job about once a second until ``stop`` is set."""

    def __init__(self, traffic: Traffic, stop: threading.Event) -> None:
        super().__init__(name="chaos-poller", daemon=True)
        self.traffic = traffic
        self.stop = stop

    def run(self) -> None:
        with ThreadPoolExecutor(4, thread_name_prefix="chaos-poll") as pool:
            while True:
                begun = time.monotonic()
                list(pool.map(self.traffic.poll, self.traffic.live()))
                if self.stop.wait(max(0.0, POLL_ROUND_S - (time.monotonic() - begun))):
                    return


def wait_ended(traffic: Traffic, jobs: list[Tracked], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(job.status is None for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
