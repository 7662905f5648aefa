"""The one-command demo, end to end: SeaweedFS, the service, an HTTP build, the report;
and what a plain install needs of the command line (package data, light ``--help``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_vector_index_builder import __version__, cli, demo
from remote_vector_index_builder.local_s3 import free_port
from test_remote_vector_index_builder.support import upload
from testbed.data import clustered

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


def run_cli(*args: str, env: dict[str, str] | None = None, prelude: str = "") -> Any:
    """The command line in a fresh interpreter, as the console script runs it."""
    code = (
        f"{prelude}\nimport sys\nfrom remote_vector_index_builder.cli import main\nsys.exit(main())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_usage_names_the_console_script_and_version_prints() -> None:
    assert run_cli("--help").stdout.startswith(f"usage: {cli.PROG} ")
    assert run_cli("build", "--help").stdout.startswith(f"usage: {cli.PROG} build ")
    version = run_cli("--version")
    assert version.stdout.strip() == f"{cli.PROG} {__version__}"


def test_every_option_has_help() -> None:
    parser = cli._build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    undocumented = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert undocumented == []


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CPU_MEMORY_LIMIT": "32.0"}, "CPU_MEMORY_LIMIT=32.0 has no unit"),
        ({"LOG_LEVEL": "verbose"}, "unknown log level 'verbose' in LOG_LEVEL"),
        ({"RVIB_AUTH_USERNAME": "rvib"}, "set both RVIB_AUTH_USERNAME and RVIB_AUTH_PASSWORD"),
        ({"RVIB_S3_PART_SIZE": "1024"}, "RVIB_S3_PART_SIZE must be between 5 MiB"),
    ],
)
def test_a_configuration_mistake_is_one_line(env: dict[str, str], fragment: str) -> None:
    done = run_cli("serve", env=env)
    assert done.returncode == cli.CONFIG_ERROR
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"{cli.PROG}: configuration error: ") and fragment in done.stderr


@pytest.mark.parametrize(
    ("module", "env", "extra"),
    [
        ("faiss", {}, "cpu"),
        ("redis", {"RVIB_REDIS_URL": "redis://127.0.0.1:1/0"}, "fleet"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    module: str, env: dict[str, str], extra: str
) -> None:
    # None in sys.modules: importing the module fails as if it were not installed.
    done = run_cli("serve", env=env, prelude=f"import sys; sys.modules[{module!r}] = None")
    assert done.returncode == cli.CONFIG_ERROR
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"pip install '{cli.PROG}[{extra}]'" in done.stderr and module in done.stderr


def test_local_s3_serves_until_interrupted(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "remote_vector_index_builder", "local-s3", "--bucket", "hand"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=tmp_path) as process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            assert first.startswith("local S3 (SeaweedFS) at http://127.0.0.1:"), first
            endpoint = first.split(" at ")[1].split(",")[0]
            lines = [process.stdout.readline() for _ in range(4)]
            assert lines[0] == "bucket hand\n"
            settings = f"S3_ENDPOINT_URL={endpoint} RVIB_S3_PATH_STYLE=true RVIB_S3_UNSIGNED=true"
            assert settings in lines[2]
            data = b"\0" * 64
            put = urllib.request.Request(f"{endpoint}/hand/v.knnvec", data=data, method="PUT")
            with urllib.request.urlopen(put, timeout=30) as answer:
                assert answer.status == 200
            with urllib.request.urlopen(f"{endpoint}/hand/v.knnvec", timeout=30) as answer:
                assert answer.read() == data
        finally:
            process.send_signal(signal.SIGINT)
            try:
                code = process.wait(timeout=60)
            finally:
                process.kill()  # no-op once it has exited; never leaves the test waiting
        assert code == 0


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


def _build_args(bucket: str, endpoint: str, stem: str, dim: int, n: int) -> list[str]:
    return [
        "build",
        "--bucket",
        bucket,
        "--vector-path",
        f"{stem}.knnvec",
        "--doc-id-path",
        f"{stem}.knndid",
        "--dimension",
        str(dim),
        "--doc-count",
        str(n),
        "--device",
        "cpu",
        "--m",
        "8",
        "--endpoint-url",
        endpoint,
    ]


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """What ``cli.main`` changes in this process's logging, put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    workflow = logging.getLogger("remote_vector_index_builder.core.workflow")
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        workflow.setLevel(logging.NOTSET)


@pytest.mark.usefixtures("cli_logging")
def test_build_without_a_terminal_prints_each_stage_once(
    s3_client: Any,
    bucket: str,
    s3_config: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upload(s3_client, bucket, "cli/once", clustered(400, 16))
    monkeypatch.setenv("RVIB_S3_PATH_STYLE", "true")
    code = cli.main(_build_args(bucket, s3_config.endpoint_url, "cli/once", 16, 400))
    err = capsys.readouterr().err
    assert code == 0, err
    # The progress lines alone: the workflow's own per-stage lines would repeat each stage.
    assert "stage download" not in err and "started (" not in err
    done = [line.split()[0] for line in err.splitlines() if " done in " in line]
    assert done == ["download", "parse", "build", "upload"]


@pytest.mark.usefixtures("cli_logging")
def test_a_refused_connection_is_not_called_transient(
    s3_config: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RVIB_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("RVIB_S3_PATH_STYLE", "true")
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = cli.main(_build_args("b", nobody, "cli/none", 16, 400))
    err = capsys.readouterr().err
    assert code == 1
    assert "could not connect to the S3 endpoint after 1 attempt(s)" in err
    assert "check S3_ENDPOINT_URL (--endpoint-url)" in err and "transient" not in err
