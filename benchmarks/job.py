"""One measurement in a fresh process: ``python -m benchmarks.job COMMAND ...`` prints JSON.

A fresh process per measurement gives each its own peak RSS (``VmHWM``) and
CPU time. ``baseline_rss`` is the resident memory after every import and after
the S3 client exists, just before the measured work starts: the part of the
peak that does not depend on the data. The peak is reset to it at that moment
(``baseline``), so ``peak_rss`` is the high-water mark of the measured work.

Commands:
  workflow   a full job through ``core.workflow.run`` (download .. upload)
  raw        faiss builds the same index from an in-memory array (one add)
  variant    the CPU builder with a storage / thread / batch variant, plus recall@10
  mode       the CPU builder in one build mode (standard / fast / auto), its quality
             report, and recall@10 over a range of ef_search
  download   one object with our store or with the reference service's boto3 settings
  upload     one object with our store (stream or file) or the reference settings
  get-flood  parallel ranged GETs with plain boto3, bytes discarded (server ceiling)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

import numpy as np

from benchmarks.common import BUCKET, GIB, MIB, REGION, vm_hwm_bytes
from benchmarks.measurement import cpu_seconds, emit, measured, omp_threads, reset_peak


def _server_cpu_seconds(pid: int | None) -> float:
    """CPU time of the local S3 server so far (0 when unknown)."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat; index 0 here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _s3(endpoint: str) -> tuple[Any, Any]:
    from remote_vector_index_builder.core.object_store import S3ObjectStore
    from remote_vector_index_builder.core.s3_calls import S3Config, make_s3_client

    config = S3Config(endpoint_url=endpoint, region=REGION, path_style=True)
    if os.environ.get("BENCH_PART_MIB"):  # for trying other part sizes by hand
        config = config.model_copy(update={"part_size": int(os.environ["BENCH_PART_MIB"]) * MIB})
    return S3ObjectStore(make_s3_client(config), config), config


def _reference_client(endpoint: str) -> Any:
    """boto3's defaults, as the reference service creates its client."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=REGION)
    config = Config(s3={"addressing_style": "path"})
    return session.client("s3", endpoint_url=endpoint, config=config)


# --------------------------------------------------------------------------------------
# Builds
# --------------------------------------------------------------------------------------


def cmd_workflow(args: argparse.Namespace) -> None:
    from remote_vector_index_builder.core import workflow
    from remote_vector_index_builder.core.cpu_builder import CpuBuilder
    from remote_vector_index_builder.core.options import SerializationMode
    from remote_vector_index_builder.core.params import parse_request

    threads = omp_threads(args.threads)
    store, _ = _s3(args.endpoint)
    request = parse_request(json.loads(args.request))
    builder = CpuBuilder(add_batch_rows=args.batch_rows) if args.batch_rows else CpuBuilder()
    store.head(BUCKET, request.vector_path)  # the connection pool is warm in a service
    baseline = reset_peak()
    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured():
        result = workflow.run(
            request,
            store,
            builder,
            mode=SerializationMode(args.mode),
            overlap_upload=not args.no_overlap,
        )
    wall = time.perf_counter() - start
    emit(
        {
            "wall_s": wall,
            "cpu_s": cpu_seconds() - cpu0,
            "threads": threads,
            "stages": {s.stage: s.seconds for s in result.stages},
            "stage_peak_rss": {s.stage: s.peak_rss_bytes for s in result.stages},
            "index_bytes": result.index_bytes,
            "blob_bytes": request.vector_blob_bytes + request.doc_id_blob_bytes,
            "vector_blob_bytes": request.vector_blob_bytes,
            "baseline_rss": baseline,
        }
    )


def _index_for(storage: str, d: int, m: int, ef_construction: int) -> Any:
    import faiss

    if storage == "flat":
        inner = faiss.IndexHNSWFlat(d, m)
    else:
        qtype = {
            "fp16": faiss.ScalarQuantizer.QT_fp16,
            "int8": faiss.ScalarQuantizer.QT_8bit_direct_signed,
        }[storage]
        inner = faiss.IndexHNSWSQ(d, qtype, m)
    inner.hnsw.efConstruction = ef_construction
    return faiss.IndexIDMap(inner)


def cmd_raw(args: argparse.Namespace) -> None:
    """The yardstick: plain Faiss on the in-memory array, in one ``add_with_ids`` call or
    in ``--batch-rows`` calls with the storage grown to its final size first."""
    threads = omp_threads(args.threads)
    rows = np.fromfile(args.vectors, dtype=np.float32).reshape(-1, args.dim)
    ids = np.fromfile(args.doc_ids, dtype="<i4").astype(np.int64)
    baseline = reset_peak()
    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured():
        index = _index_for("flat", args.dim, 16, 100)
        if not args.batch_rows:
            index.add_with_ids(rows, ids)
        else:
            import faiss

            # Capacity for every row up front (std::vector keeps it on resize(0)), so
            # the adds never reallocate and copy the storage.
            storage = faiss.downcast_index(faiss.downcast_index(index.index).storage)
            storage.codes.resize(len(rows) * storage.code_size)
            storage.codes.resize(0)
            for first in range(0, len(rows), args.batch_rows):
                last = first + args.batch_rows
                index.add_with_ids(rows[first:last], ids[first:last])
    wall = time.perf_counter() - start
    emit(
        {
            "wall_s": wall,
            "cpu_s": cpu_seconds() - cpu0,
            "threads": threads,
            "ntotal": int(index.ntotal),
            "baseline_rss": baseline,
        }
    )


def cmd_variant(args: argparse.Namespace) -> None:
    """The service's CPU builder on in-memory rows, then recall@10 at ef_search 100."""
    from remote_vector_index_builder.core.cpu_builder import CpuBuilder
    from remote_vector_index_builder.core.dataset import Dataset
    from remote_vector_index_builder.core.params import parse_request
    from remote_vector_index_builder.core.quality import recall_at_k

    threads = omp_threads(args.threads)
    request = parse_request(json.loads(args.request))
    rows = np.fromfile(args.vectors, dtype=request.data_type.spec.blob_dtype).reshape(
        request.doc_count, -1
    )
    ids = np.fromfile(args.doc_ids, dtype="<i4")
    queries = np.load(args.queries)
    batch = args.batch_rows or request.doc_count
    builder = CpuBuilder(add_batch_rows=batch)
    baseline = reset_peak()
    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured():
        index = builder.build(request, Dataset(rows, ids, request.data_type))
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    peak = vm_hwm_bytes()
    recall = recall_at_k(index, rows, ids, queries, "l2")
    result: dict[str, Any] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "threads": threads,
        "batch_rows": batch,
        "recall": recall,
        "baseline_rss": baseline,
        "peak_rss": peak,
    }
    if args.float_rows:
        # Recall against exact search over the float rows the typed rows came from:
        # what quantization costs end to end, not only what the graph misses.
        from remote_vector_index_builder.core.quality import exact_neighbours

        base = np.load(args.float_rows)
        truth = ids[exact_neighbours(base, np.load(args.float_queries), 10, "l2")]
        _, found = index.search(queries.astype(np.float32), 10)
        hits = sum(
            len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True)
        )
        result["recall_vs_float"] = hits / truth.size
    emit(result)


def cmd_mode(args: argparse.Namespace) -> None:
    """One build in ``--mode`` over rows held like a download (released batch by batch)."""
    import mmap

    from remote_vector_index_builder.core import quality
    from remote_vector_index_builder.core.cpu_builder import CpuBuilder
    from remote_vector_index_builder.core.dataset import parse
    from remote_vector_index_builder.core.options import CpuBuildMode
    from remote_vector_index_builder.core.params import parse_request

    threads = omp_threads(args.threads)
    request = parse_request(json.loads(args.request))
    source = np.load(args.rows, mmap_mode="r")
    # Anonymous memory, as ``S3ObjectStore.download`` fills: the builder's
    # ``Dataset.release`` hands its pages back, so peak RSS is the service's.
    buffer = mmap.mmap(-1, source.nbytes)
    blob = np.frombuffer(buffer, dtype=np.uint8)
    blob[:] = np.ascontiguousarray(source).view(np.uint8).reshape(-1)
    del source
    id_blob = np.arange(request.doc_count, dtype="<i4").view(np.uint8)
    data = parse(request, blob, id_blob)
    builder = CpuBuilder(mode=CpuBuildMode(args.mode))
    prepared = builder.prepare(request)
    sample = quality.QuerySample.take(data.vectors)
    # Recall per ef_search on its own, larger seeded sample (not the report's rows).
    probe = quality.QuerySample.take(data.vectors, args.probe_queries, seed=99)
    baseline = reset_peak()
    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured():
        index = builder.build(request, data, prepared=prepared)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    report = quality.check(request, index, sample, prepared.notes)
    peak = vm_hwm_bytes()
    metric = quality.metric_of(request.space_type)
    efs = [int(e) for e in args.ef.split(",")]
    curve = {ef: quality.sample_recall(index, probe, 10, ef, metric) for ef in efs}
    emit(
        {
            "wall_s": wall,
            "cpu_s": cpu,
            "threads": threads,
            "check_s": report.seconds,
            "report": report.as_dict(),
            "recall_by_ef": curve,
            "baseline_rss": baseline,
            "peak_rss": peak,
            "vector_blob_bytes": int(blob.nbytes),
            "index_bytes": len(faiss_serialize(index)),
        }
    )


def faiss_serialize(index: Any) -> Any:
    import faiss

    return faiss.serialize_index(index)


# --------------------------------------------------------------------------------------
# Transfers
# --------------------------------------------------------------------------------------


def _reference_transfer_config(download: bool) -> Any:
    """The reference service's TransferConfig (50 MiB parts; concurrency from the CPU count)."""
    from boto3.s3.transfer import TransferConfig

    cpus = os.cpu_count() or 1
    if download:
        return TransferConfig(
            multipart_threshold=50 * MIB,
            multipart_chunksize=50 * MIB,
            max_concurrency=max(8, int(cpus * 0.625)),
            io_chunksize=sys.maxsize,
        )
    return TransferConfig(
        multipart_threshold=50 * MIB,
        multipart_chunksize=50 * MIB,
        max_concurrency=max(8, int(cpus * 0.5)),
    )


def cmd_download(args: argparse.Namespace) -> None:
    """One timed download; with ``--warm`` after an untimed one (a long-lived client)."""
    if args.impl == "ours":
        store, config = _s3(args.endpoint)
        store.head(BUCKET, args.key)

        def transfer() -> int:
            return int(store.download(BUCKET, args.key).nbytes)

        extra: dict[str, Any] = {"concurrency": config.concurrency, "part_bytes": config.part_size}
    else:
        client = _reference_client(args.endpoint)
        client.head_object(Bucket=BUCKET, Key=args.key)
        config = _reference_transfer_config(download=True)

        def transfer() -> int:
            sink = io.BytesIO()
            client.download_fileobj(
                BUCKET, args.key, sink, ExtraArgs={"ChecksumMode": "ENABLED"}, Config=config
            )
            return sink.tell()

        extra = {"concurrency": config.max_concurrency, "part_bytes": 50 * MIB}
    if args.warm:
        transfer()
    baseline = reset_peak()
    server0 = _server_cpu_seconds(args.server_pid)
    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured():
        size = transfer()
    wall = time.perf_counter() - start
    emit(
        {
            "wall_s": wall,
            "server_cpu_s": _server_cpu_seconds(args.server_pid) - server0,
            "cpu_s": cpu_seconds() - cpu0,
            "bytes": size,
            "baseline_rss": baseline,
            **extra,
        }
    )


def _random_bytes(size: int) -> bytes:
    return np.random.default_rng(3).bytes(size)


def cmd_upload(args: argparse.Namespace) -> None:
    """One timed upload; with ``--warm`` after an untimed one of 64 MiB (a long-lived client)."""
    size = args.size
    extra: dict[str, Any] = {}
    if args.impl == "reference":
        client = _reference_client(args.endpoint)
        data = _random_bytes(size)
        client.head_bucket(Bucket=BUCKET)
        config = _reference_transfer_config(download=False)

        def transfer(key: str, length: int) -> None:
            # BytesIO shares a whole bytes object: the timed run copies nothing up front.
            source = io.BytesIO(data if length == len(data) else data[:length])
            client.upload_fileobj(
                source, BUCKET, key, ExtraArgs={"ChecksumAlgorithm": "CRC32"}, Config=config
            )

        extra = {"concurrency": config.max_concurrency, "part_bytes": 50 * MIB}
    else:
        from remote_vector_index_builder.core.errors import ObjectNotFoundError

        store, s3_config = _s3(args.endpoint)
        with suppress(ObjectNotFoundError):  # the client's set-up, as before the reference's
            store.head(BUCKET, args.key)
        extra = {"concurrency": s3_config.concurrency, "part_bytes": s3_config.part_size}
        if args.impl == "ours-file":
            path = Path(args.source)
            size = path.stat().st_size
            # Warm the page cache, as for a just-written index file, without a big buffer.
            with path.open("rb", buffering=0) as file:
                scratch = bytearray(MIB)
                while file.readinto(scratch):
                    pass

            def transfer(key: str, length: int) -> None:
                if length == size:
                    store.upload_file(BUCKET, key, path)
                else:
                    with path.open("rb") as file, store.open_upload(BUCKET, key) as upload:
                        upload.write(file.read(length))

        else:
            data = _random_bytes(size)

            def transfer(key: str, length: int) -> None:
                view = memoryview(data)[:length]
                # Like index_io: Faiss hands the sink 4 MiB bytes objects.
                with store.open_upload(BUCKET, key, size_hint=length) as upload:
                    for first in range(0, length, 4 * MIB):
                        upload.write(bytes(view[first : first + 4 * MIB]))

    if args.warm:
        transfer(args.key + ".warm-up", min(size, 64 * MIB))
    baseline = reset_peak()
    server0 = _server_cpu_seconds(args.server_pid)
    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured():
        transfer(args.key, size)
    wall = time.perf_counter() - start
    emit(
        {
            "wall_s": wall,
            "server_cpu_s": _server_cpu_seconds(args.server_pid) - server0,
            "cpu_s": cpu_seconds() - cpu0,
            "bytes": size,
            "baseline_rss": baseline,
            **extra,
        }
    )


def cmd_get_flood(args: argparse.Namespace) -> None:
    """Ranged GETs on ``concurrency`` threads, read in 1 MiB chunks and thrown away."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=REGION)
    config = Config(s3={"addressing_style": "path"}, max_pool_connections=args.concurrency)
    client = session.client("s3", endpoint_url=args.endpoint, config=config)
    size = client.head_object(Bucket=BUCKET, Key=args.key)["ContentLength"]
    part = args.part_bytes

    def get(first: int) -> int:
        last = min(first + part, size) - 1
        body = client.get_object(Bucket=BUCKET, Key=args.key, Range=f"bytes={first}-{last}")
        scratch, got, stream = bytearray(MIB), 0, cast(Any, body["Body"])
        with stream:
            while n := stream.readinto(scratch):
                got += n
        return got

    cpu0, start = cpu_seconds(), time.perf_counter()
    with measured(), ThreadPoolExecutor(args.concurrency) as pool:
        total = sum(pool.map(get, range(0, size, part)))
    wall = time.perf_counter() - start
    emit({"wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "bytes": total})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.job")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("workflow")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--request", required=True, help="the POST /_build body as JSON")
    p.add_argument("--mode", choices=["memory", "disk"], default="memory")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-rows", type=int, default=0, help="0: the builder's default")
    p.add_argument("--no-overlap", action="store_true", help="upload after the build (memory)")
    p.set_defaults(func=cmd_workflow)

    p = sub.add_parser("raw")
    p.add_argument("--vectors", required=True)
    p.add_argument("--doc-ids", required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-rows", type=int, default=0, help="0: one add of every row")
    p.set_defaults(func=cmd_raw)

    p = sub.add_parser("variant")
    p.add_argument("--request", required=True)
    p.add_argument("--vectors", required=True)
    p.add_argument("--doc-ids", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--float-rows")
    p.add_argument("--float-queries")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-rows", type=int, default=0, help="0: one add of every row")
    p.set_defaults(func=cmd_variant)

    p = sub.add_parser("mode")
    p.add_argument("--request", required=True)
    p.add_argument("--rows", required=True, help=".npy of the rows as the blob holds them")
    p.add_argument("--mode", choices=["standard", "fast", "auto"], required=True)
    p.add_argument("--ef", default="10,16,24,32,48,64,100,150,200")
    p.add_argument("--probe-queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_mode)

    p = sub.add_parser("download")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--impl", choices=["ours", "reference"], required=True)
    p.add_argument("--warm", action="store_true", help="time a second transfer, not the first")
    p.add_argument("--server-pid", type=int, help="the S3 server, for its CPU time")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("upload")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--impl", choices=["ours-stream", "ours-file", "reference"], required=True)
    p.add_argument("--size", type=int, default=GIB)
    p.add_argument("--source", help="file for ours-file")
    p.add_argument("--warm", action="store_true", help="upload 64 MiB untimed first")
    p.add_argument("--server-pid", type=int, help="the S3 server, for its CPU time")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("get-flood")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--part-bytes", type=int, default=16 * MIB)
    p.set_defaults(func=cmd_get_flood)

    from benchmarks import graph_job

    graph_job.add_parser(sub)

    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
