"""Command line: ``serve`` runs the HTTP service, ``build`` runs one build without it.

``python -m remote_vector_index_builder build --bucket B --vector-path P.knnvec ...``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

# Written out so that --help imports neither Faiss nor boto3 (test_demo checks both,
# and that these match core.builder.Device and core.index_io.SerializationMode).
DEVICES = ("auto", "cpu", "gpu")
SERIALIZATION_MODES = ("memory", "disk")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remote_vector_index_builder",
        description="Build Faiss indexes for OpenSearch k-NN from vectors in S3.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (POST /_build, GET /_status)")
    serve.add_argument("--host", help="address to bind (default from RVIB_LISTEN_HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default from RVIB_LISTEN_PORT or 1025)")

    demo = sub.add_parser(
        "demo", help="local S3 + service + a real build of the shipped sample, with a report"
    )
    demo.add_argument("--exit", action="store_true", help="stop after the report")
    demo.add_argument("--port", type=int, help="service port (default: a free one)")

    build = sub.add_parser("build", help="one build: download, build, upload, report")
    build.add_argument("--bucket", required=True, help="bucket holding the blobs")
    build.add_argument("--vector-path", required=True, help="key of the .knnvec blob")
    build.add_argument("--doc-id-path", required=True, help="key of the .knndid blob")
    build.add_argument("--dimension", required=True, type=int)
    build.add_argument("--doc-count", required=True, type=int)
    build.add_argument(
        "--data-type", default="float", choices=["float", "half_float", "byte", "binary"]
    )
    build.add_argument(
        "--space-type",
        default=None,
        choices=["l2", "innerproduct", "hamming"],
        help="default: l2, or hamming for binary data",
    )
    build.add_argument("--m", type=int, default=16)
    build.add_argument("--ef-construction", type=int, default=100)
    build.add_argument("--ef-search", type=int, default=100)
    build.add_argument("--skip-stored-vectors", action="store_true")
    build.add_argument("--tenant-id", default="")
    build.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="default from RVIB_DEVICE or auto",
    )
    build.add_argument(
        "--serialization-mode",
        choices=SERIALIZATION_MODES,
        default=None,
        help="default from INDEX_SERIALIZATION_MODE or memory",
    )
    build.add_argument("--endpoint-url", help="S3 endpoint override (default S3_ENDPOINT_URL)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from remote_vector_index_builder import demo

        return demo.main(argv[1:])
    args = _build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v}
    else:
        for key, value in (
            ("device", args.device),
            ("index_serialization_mode", args.serialization_mode),
            ("s3_endpoint_url", args.endpoint_url),
        ):
            if value:
                overrides[key] = value
    from remote_vector_index_builder.app.logs import configure_logging
    from remote_vector_index_builder.app.settings import Settings

    settings = Settings(**overrides)
    configure_logging(settings)
    if args.command == "serve":
        from remote_vector_index_builder.app.main import serve

        serve(settings)
        return 0
    from remote_vector_index_builder import build_command
    from remote_vector_index_builder.core.errors import RvibError

    try:
        return build_command.run(args, settings)
    except RvibError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
