"""A fake Incus daemon for unit tests: HTTP/1.1 over a unix socket.

Routes map ``(method, path)`` (the path without its query) to canned replies;
every request is recorded so a test can check what the client sent. Replies
use Incus's JSON envelope (``sync``, ``async``, ``error``).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union
from urllib.parse import parse_qsl, urlsplit

# AF_UNIX paths are limited to 108 bytes; stay well below.
_MAX_SOCKET_PATH = 100
# How often the serving thread checks for shutdown (the default 0.5 s slows every test).
_POLL = 0.01


@dataclass(frozen=True)
class Reply:
    """One canned HTTP answer."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    close: bool = False  # drop the connection after this reply, without saying so
    delay: float = 0.0  # seconds the server takes to answer (a server-side wait)
    wire: bytes | None = None  # bytes sent verbatim instead of a well-formed reply


@dataclass(frozen=True)
class Request:
    """One request as the fake daemon received it."""

    method: str
    target: str  # path and query, as sent
    headers: Mapping[str, str]  # names lower-cased
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query, keep_blank_values=True))

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[Request], Reply]
Route = Union[Reply, list[Reply], Handler]


def _envelope(payload: Mapping[str, Any], status: int, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload).encode(),
                 {"Content-Type": "application/json", **(headers or {})})


def sync(metadata: Any = None, *, headers: Mapping[str, str] | None = None) -> Reply:
    return _envelope({"type": "sync", "status": "Success", "status_code": 200, "metadata": metadata},
                     200, headers)


def async_op(op_id: str, metadata: Any = None) -> Reply:
    """202: a background operation was started."""
    return _envelope({"type": "async", "status": "Operation created", "status_code": 100,
                      "operation": f"/1.0/operations/{op_id}",
                      "metadata": {"id": op_id, "status": "Running", "metadata": metadata}}, 202)


def error(reason: str, code: int) -> Reply:
    return _envelope({"type": "error", "error": reason, "error_code": code}, code)


def operation(op_id: str, status: str = "Success", *, metadata: Any = None, err: str = "") -> Reply:
    """The answer of ``GET /1.0/operations/<id>/wait``: the operation's state."""
    return sync({"id": op_id, "status": status, "err": err, "metadata": metadata})


class FakeIncus:
    """The fake daemon; use as a context manager (it serves on a thread)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[Request] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._server = _Server(path, self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_POLL,), daemon=True)

    def __enter__(self) -> FakeIncus:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def on(self, method: str, path: str, *replies: Reply | Handler) -> None:
        """Answer ``method path``: one reply, replies in turn (the last repeats), or a handler."""
        self.routes[(method, path)] = replies[0] if len(replies) == 1 else list(replies)

    def requests_to(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if (r.method, r.path) == (method, path)]

    def _answer(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            route = self.routes.get((request.method, request.path))
            if route is None:
                return error(f"fake Incus has no route for {request.method} {request.path}", 500)
            if isinstance(route, list):
                route = route.pop(0) if len(route) > 1 else route[0]
        return route if isinstance(route, Reply) else route(request)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, fake: FakeIncus) -> None:
        self.fake = fake
        super().__init__(path, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that refuses a body hangs up while it is sent: that is no fault of the fake.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 5  # a client that sends less than it announced fails the test instead of hanging it
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.fake.connections += 1

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                          self.rfile.read(length))
        reply = self.server.fake._answer(request)
        if reply.delay:
            threading.Event().wait(reply.delay)
        if reply.wire is not None:
            self.wfile.write(reply.wire)
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)
        if reply.close:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test reads ``requests`` instead


def socket_in(directory: Path, name: str = "unix.socket") -> str:
    """A socket path in ``directory``, or in a short temporary one if that is too long."""
    path = str(directory / name)
    if len(path) > _MAX_SOCKET_PATH:
        path = os.path.join(tempfile.mkdtemp(prefix="coi-"), name)
    return path


@contextmanager
def hang_up_listener(path: str) -> Iterator[None]:
    """A listener that accepts each connection and closes it at once."""
    server = socketserver.ThreadingUnixStreamServer(path, socketserver.BaseRequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(_POLL,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def stale_socket(path: str) -> None:
    """A socket file nobody listens on (a daemon that died)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


@dataclass
class _Node:
    kind: str  # "file", "directory", "symlink"
    mode: int
    content: bytes = b""  # a file's content, a link's target
    entries: dict[str, None] = field(default_factory=dict)  # a directory's names, in order
    announced: int | None = None  # a file whose reply announces this size and sends nothing


class FakeFiles:
    """A container's files as the files API serves them (``GET .../files?path=``).

    Use it as a route handler of FakeIncus, or pass it where coi wants an Incus
    client: ``pull_file`` answers in-process as the real client would.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {"/": _Node("directory", 0o755)}
        self.pulled: list[str] = []

    def _add(self, path: str, node: _Node) -> None:
        parent, _, name = path.rstrip("/").rpartition("/")
        parent = parent or "/"
        if parent not in self.nodes:
            self.dir(parent)
        self.nodes[parent].entries[name] = None
        self.nodes[path] = node

    def dir(self, path: str, mode: int = 0o755) -> None:
        if path not in self.nodes:
            self._add(path, _Node("directory", mode))
        self.nodes[path].mode = mode

    def file(self, path: str, content: bytes = b"", mode: int = 0o644, *, announced: int | None = None) -> None:
        self._add(path, _Node("file", mode, content, announced=announced))

    def link(self, path: str, target: str) -> None:
        self._add(path, _Node("symlink", 0o777, target.encode()))

    def special(self, path: str, kind: str, content: bytes = b"") -> None:
        """Put a node of any type at ``path`` ("fifo", "socket"...), replacing what is there."""
        self._add(path, _Node(kind, 0o666, content))

    def listing(self, path: str, names: list[str]) -> None:
        """Make directory ``path`` list ``names`` as they are (names a file system would refuse too)."""
        self.dir(path)
        self.nodes[path].entries = dict.fromkeys(names)

    def _headers(self, node: _Node) -> dict[str, str]:
        return {"X-Incus-type": node.kind, "X-Incus-mode": f"{node.mode:04o}", "X-Incus-uid": "1000",
                "X-Incus-gid": "1000"}

    def __call__(self, request: Request) -> Reply:
        path = request.query.get("path", "")
        self.pulled.append(path)
        node = self.nodes.get(path)
        if node is None:
            return error("Not Found", 404)
        if node.kind == "directory":
            return sync(list(node.entries), headers=self._headers(node))
        headers = {**self._headers(node), "Content-Type": "application/octet-stream"}
        if node.announced is not None:  # a huge file: the client must refuse it on its size alone
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            return Reply(wire=f"HTTP/1.1 200 OK\r\n{head}Content-Length: {node.announced}\r\n\r\n".encode())
        return Reply(body=node.content, headers=headers)

    def pull_file(self, name: str, path: str, *, max_bytes: int | None = None) -> tuple[bytes, dict[str, Any]]:
        """What ``Incus.pull_file`` returns or raises for this tree."""
        from coi.errors import NotFoundError, TooLargeError

        self.pulled.append(path)
        node = self.nodes.get(path)
        if node is None:
            raise NotFoundError(f"read {path} in container {name}: not found")
        info: dict[str, Any] = {"type": node.kind, "mode": node.mode, "uid": 1000, "gid": 1000}
        if node.kind == "directory":
            return b"", {**info, "entries": sorted(node.entries)}
        size = len(node.content) if node.announced is None else node.announced
        if max_bytes is not None and size > max_bytes:
            raise TooLargeError(f"read {path} in container {name}: more than {max_bytes} bytes")
        return node.content, info
