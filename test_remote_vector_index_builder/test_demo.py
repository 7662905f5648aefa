"""The one-command demo, end to end: SeaweedFS, the service, an HTTP build, the report;
and what a plain install needs of the command line (package data, light ``--help``)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from remote_vector_index_builder import demo

ROOT = Path(__file__).resolve().parents[1]


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


# Runs the command line as `python -m remote_vector_index_builder ARGS` does and prints
# which heavy modules it imported.
HELP = """
import runpy, sys
sys.argv = ["remote_vector_index_builder", *sys.argv[1:]]
try:
    runpy.run_module("remote_vector_index_builder", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("imported:", sorted(m for m in ("faiss", "boto3", "botocore") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["build", "--help"]])
def test_help_imports_neither_faiss_nor_boto3(args: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", HELP, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert "usage:" in done.stdout
    assert done.stdout.strip().endswith("imported: []"), done.stdout


def test_the_sample_is_package_data() -> None:
    assert demo.SAMPLE_DIR.is_relative_to(Path(demo.__file__).parent)
    assert (demo.SAMPLE_DIR / "vectors.knnvec").stat().st_size == 1000 * 768 * 4
    assert (demo.SAMPLE_DIR / "doc_ids.knndid").stat().st_size == 1000 * 4


@pytest.mark.slow
def test_the_wheel_carries_the_sample(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("remote_vector_index_builder-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    sample = "remote_vector_index_builder/samples/cohere-1k-768/"
    assert {sample + "vectors.knnvec", sample + "doc_ids.knndid"} <= names
