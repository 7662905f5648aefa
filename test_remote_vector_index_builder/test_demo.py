"""The one-command demo, end to end: SeaweedFS, the service, an HTTP build, the report."""

from __future__ import annotations

import pytest

from remote_vector_index_builder import demo


def test_demo_builds_the_shipped_sample_over_http(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo's settings are arguments: an endpoint in the environment must not win,
    # and the user's credentials must not reach (and lock) the demo's S3 server.
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "users-own-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "users-own-secret")
    assert demo.main(["--exit"]) == 0
    report = capsys.readouterr().out
    assert "COMPLETED_INDEX_BUILD" in report
    assert "IxMp > IHNf" in report
    assert "ids match: True" in report
    recall = float(report.split("recall@10", 1)[1].split()[0])
    assert recall >= 0.9
