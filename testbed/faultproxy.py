"""A fault-injecting HTTP proxy on 127.0.0.1, for the object store's failure paths.

It sits between a client and the local S3 server and forwards each request
unchanged, except for the requests a ``Fault`` matches: those get an error
status, a connection reset (mid request body or mid response body), a body cut
short, a body with one bit flipped (its length and headers intact, as a
corrupting network path or disk would leave it), or a stall longer than the
client's read timeout. ``refuse()`` closes the
listening socket so connections are refused, ``blackhole()`` makes them hang
until the client's connect timeout; ``accept()`` opens the port again.

Every request is recorded (method, target, what the proxy did), so tests can
assert how many attempts a client made. Handler threads never wait longer than
a fault's ``stall_s``, and ``close()`` releases them at once.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

FaultKind = Literal["status", "reset", "truncate", "stall", "flip"]
# Hop-by-hop headers are the proxy's own business, never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te"}
_ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "NoSuchUpload": "The specified upload does not exist.",
}


@dataclass
class Fault:
    """What to do to matching requests; ``times=None`` means every one of them.

    ``kind``:
      * ``status``: answer ``status`` with an S3 XML error ``code`` (not forwarded);
      * ``reset``: ``at="request"`` resets after half the request body (not
        forwarded); ``at="response"`` forwards, sends the headers and half the
        body, then resets;
      * ``truncate``: forwards, sends the full ``Content-Length`` but half the
        body, then closes cleanly;
      * ``flip``: forwards and sends the whole response with one bit of its body
        inverted (bit 0 of the middle byte); the connection stays usable;
      * ``stall``: ``at="request"`` sends nothing for ``stall_s`` (not forwarded);
        ``at="response"`` forwards, sends the headers and half the body, then
        nothing for ``stall_s``; then the connection is closed.
    """

    kind: FaultKind
    method: str | None = None
    # A substring of the request target (path and query), e.g. "partNumber=" or ".knnvec".
    target: str | None = None
    times: int | None = None
    status: int = 503
    code: str = "SlowDown"
    at: Literal["request", "response"] = "response"
    stall_s: float = 5.0
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.target is None or self.target in target


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    outcome: str  # "forwarded" or the fault kind


@dataclass
class _State:
    upstream: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)
    connections: set[socket.socket] = field(default_factory=set)

    def pick(self, method: str, target: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                left = fault.times is None or fault.hits < fault.times
                if left and fault.matches(method, target):
                    fault.hits += 1
                    self.seen.append(Seen(method, target, fault.kind))
                    return fault
            self.seen.append(Seen(method, target, "forwarded"))
            return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections end after this long, so none outlives a test for long.
    timeout = 5
    state: _State  # set on the subclass each proxy makes

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.state.connections.add(self.connection)

    def finish(self) -> None:
        with self.state.lock:
            self.state.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    break
                chunks.append(chunk)
            # Trailers end with an empty line.
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(limit, length))

    def _proxy(self) -> None:
        fault = self.state.pick(self.command, self.path)
        if fault is not None and fault.at == "request" and fault.kind in ("reset", "stall"):
            length = int(self.headers.get("Content-Length") or 0)
            self._read_body(limit=length // 2)
            if fault.kind == "stall":
                self.state.released.wait(fault.stall_s)
                self._close(reset=False)
            else:
                self._close(reset=True)
            return
        body = self._read_body()
        if fault is not None and fault.kind == "status":
            self._send_error(fault)
            return
        status, reason, headers, payload = self._forward(body)
        if fault is not None and fault.kind == "flip":
            if payload:
                middle = len(payload) // 2
                payload = payload[:middle] + bytes([payload[middle] ^ 1]) + payload[middle + 1 :]
            fault = None  # otherwise a well-formed response
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if self.command == "HEAD":
            declared = {k.lower(): v for k, v in headers}.get("content-length", "0")
            self.send_header("Content-Length", declared)
        else:
            self.send_header("Content-Length", str(len(payload)))
        if fault is None:
            self.end_headers()
            self.wfile.write(payload)
            return
        # Every other fault ends this connection after part of the body.
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload[: len(payload) // 2])
        self.wfile.flush()
        if fault.kind == "stall":
            self.state.released.wait(fault.stall_s)
        self._close(reset=fault.kind == "reset")

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        host, port = self.state.upstream
        connection = http.client.HTTPConnection(host, port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            return response.status, response.reason, response.getheaders(), payload
        finally:
            connection.close()

    def _send_error(self, fault: Fault) -> None:
        message = _ERROR_MESSAGES.get(fault.code, "injected fault")
        payload = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code><Message>{message}</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _close(self, *, reset: bool) -> None:
        self.close_connection = True
        sock: socket.socket = self.connection
        try:
            self.wfile.flush()
            if reset:
                # Linger 0: close() sends an RST instead of a FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients give up on stalled or reset connections on purpose


class FaultProxy:
    """``with FaultProxy(upstream_url) as proxy:``; point the client at ``proxy.url``."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        assert parts.hostname is not None and parts.port is not None
        self._state = _State(upstream=(parts.hostname, parts.port))
        self._handler = type("Handler", (_Handler,), {"state": self._state})
        self._server: _Server | None = None
        self._blackhole: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self.port = 0
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[Seen]:
        with self._state.lock:
            return list(self._state.seen)

    def add(self, fault: Fault) -> Fault:
        with self._state.lock:
            self._state.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._state.lock:
            self._state.faults.clear()
            self._state.seen.clear()

    def _listen(self) -> None:
        self._server = _Server(("127.0.0.1", self.port), self._handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultproxy-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused until ``accept()``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def blackhole(self) -> None:
        """New connections hang until ``accept()``: only the client's connect timeout ends them.

        A listening socket that never accepts, with its accept queue (backlog 0)
        already full: Linux then drops further SYNs, as a firewall would.
        """
        self.refuse()
        if self._blackhole:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(0)
        filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self._blackhole = [listener, filler]

    def accept(self) -> None:
        for sock in self._blackhole:
            sock.close()
        self._blackhole = []
        if self._server is None:
            self._listen()

    def close(self) -> None:
        self._state.released.set()
        self.refuse()
        for sock in self._blackhole:
            sock.close()
        with self._state.lock:
            live = list(self._state.connections)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
