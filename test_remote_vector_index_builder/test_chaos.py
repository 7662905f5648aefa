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

import pytest

from benchmarks.chaos import run_chaos
from benchmarks.chaos_checks import table
from benchmarks.chaos_fleet import ChaosConfig
from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client
from remote_vector_index_builder.local_s3 import LocalS3

pytestmark = pytest.mark.slow

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
