"""Fakes of Incus for unit tests, at its two layers.

* ``FakeIncus``: the one in-memory Incus for tests of coi's services. It satisfies
  ``coi.incus.IncusClient`` (a test checks that it keeps doing so): instances,
  images, networks, ACLs, profiles and files live in dicts, every call is recorded
  in ``calls``, and ``on(method, handler)`` replaces what one method does.
* ``FakeDaemon``: a daemon speaking HTTP/1.1 over a unix socket, for tests of the
  real client (``coi.incus``) itself. Routes map ``(method, path)`` (the path
  without its query) to canned replies; every request is recorded so a test can
  check what the client sent. Replies use Incus's JSON envelope (``sync``,
  ``async``, ``error``). ``FakeFiles`` serves a container's files through it.
"""

from __future__ import annotations

import functools
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


class FakeDaemon:
    """The fake daemon; use as a context manager (it serves on a thread)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[Request] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._server = _Server(path, self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_POLL,), daemon=True)

    def __enter__(self) -> FakeDaemon:
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

    def __init__(self, path: str, fake: FakeDaemon) -> None:
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

    Use it as a route handler of FakeDaemon, or pass it where coi wants an Incus
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


# ---- the in-memory Incus ------------------------------------------------------------

DEFAULT = object()  # what a handler given to ``FakeIncus.on`` returns to let the fake answer


class Call(tuple):
    """One recorded call: ``(method, *positional arguments)``, keyword arguments in ``kwargs``."""

    kwargs: dict[str, Any]

    def __new__(cls, method: str, args: tuple, kwargs: dict[str, Any]) -> Call:
        call = super().__new__(cls, (method, *args))
        call.kwargs = kwargs
        return call


def _recorded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Record the call, then let a handler given to ``on`` answer it, else the fake."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: FakeIncus, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(Call(name, args, kwargs))
        handler = self.handlers.get(name)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not DEFAULT:
                return result
        return method(self, *args, **kwargs)
    return wrapper


def _not_found(what: str) -> Exception:
    from coi.errors import NotFoundError

    return NotFoundError(f"{what}: not found")


class FakeIncus:
    """An Incus daemon and client in one, in memory (see the module's docstring).

    Instances are dicts as the API returns them (``name``, ``status``, ``config``,
    ``devices``, ``expanded_devices``, ``profiles``); ``instance_state`` answers with
    ``states[name]`` when set, else a running container at ``address``. Files are a
    ``FakeFiles`` per container (``files_of``). ``exec`` answers exit code 0 with no
    output unless a handler says otherwise; ``exec_argv`` gives ``sh -c true``.
    """

    project = "default"
    path = "/nonexistent/coi-fake/unix.socket"

    def __init__(self) -> None:
        self.instances_by_name: dict[str, dict[str, Any]] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.images_by_fp: dict[str, dict[str, Any]] = {}
        self.networks_by_name: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, list[dict[str, Any]]] = {}
        self.acls: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, dict[str, Any]] = {}
        self.pools: dict[str, dict[str, Any]] = {}
        self.files: dict[str, FakeFiles] = {}
        self.snapshots_of: dict[str, dict[str, dict[str, Any]]] = {}  # instance -> snapshot name -> record
        self.server_info: dict[str, Any] = {"environment": {"kernel_features": {}}, "config": {}}
        self.address = "10.1.2.3"
        self.calls: list[Call] = []
        self.handlers: dict[str, Callable[..., Any]] = {}
        self._fingerprints = (f"{i:064x}" for i in range(1, 1 << 30))

    def on(self, method: str, handler: Callable[..., Any]) -> None:
        """Let ``handler`` answer ``method`` (same arguments); returning DEFAULT lets the fake answer."""
        self.handlers[method] = handler

    def called(self, method: str) -> list[Call]:
        return [c for c in self.calls if c[0] == method]

    def files_of(self, name: str) -> FakeFiles:
        return self.files.setdefault(name, FakeFiles())

    def add_image(self, aliases: list[str], created: str = "2026-01-01T00:00:00Z",
                  properties: dict[str, str] | None = None, size: int = 1000) -> str:
        """An image already there (not a call of coi's)."""
        fp = next(self._fingerprints)
        self.images_by_fp[fp] = {"fingerprint": fp, "aliases": [{"name": a} for a in aliases], "size": size,
                                 "created_at": created, "properties": dict(properties or {})}
        return fp

    # ---- client ----
    @classmethod
    def from_environment(cls, *, project: str = "default") -> FakeIncus:
        return cls()

    @_recorded
    def close(self) -> None:
        pass

    # ---- server, storage, networks, profiles ----
    @_recorded
    def server(self) -> dict[str, Any]:
        return self.server_info

    @_recorded
    def storage_pools(self) -> list[dict[str, Any]]:
        return list(self.pools.values())

    @_recorded
    def create_storage_pool(self, name: str, driver: str, config: Mapping[str, str]) -> None:
        self.pools[name] = {"name": name, "driver": driver, "config": dict(config)}

    @_recorded
    def networks(self) -> list[dict[str, Any]]:
        return list(self.networks_by_name.values())

    @_recorded
    def network(self, name: str) -> dict[str, Any]:
        if name not in self.networks_by_name:
            raise _not_found(f"network {name}")
        return self.networks_by_name[name]

    @_recorded
    def network_leases(self, name: str) -> list[dict[str, Any]]:
        return list(self.leases.get(name, []))

    @_recorded
    def create_network(self, name: str, config: Mapping[str, str], *, type: str = "bridge",
                       description: str = "") -> None:
        self.networks_by_name[name] = {"name": name, "type": type, "config": dict(config), "managed": True}

    @_recorded
    def update_network(self, name: str, config: Mapping[str, str]) -> None:
        self.network(name)["config"].update(config)

    @_recorded
    def delete_network(self, name: str) -> None:
        self.network(name)
        del self.networks_by_name[name]

    @_recorded
    def network_acls(self) -> list[dict[str, Any]]:
        return [{**body, "name": name} for name, body in self.acls.items()]

    @_recorded
    def create_network_acl(self, name: str, *, egress: list[dict[str, str]],
                           ingress: list[dict[str, str]] | None = None, description: str = "") -> None:
        from coi.errors import ConflictError

        if name in self.acls:
            raise ConflictError(f"network ACL {name}: already exists")
        self.acls[name] = {"name": name, "egress": egress, "ingress": ingress or [], "description": description}

    @_recorded
    def put_network_acl(self, name: str, *, egress: list[dict[str, str]],
                        ingress: list[dict[str, str]] | None = None, description: str = "") -> None:
        if name not in self.acls:
            raise _not_found(f"network ACL {name}")
        self.acls[name] = {"name": name, "egress": egress, "ingress": ingress or [], "description": description}

    @_recorded
    def delete_network_acl(self, name: str) -> None:
        if self.acls.pop(name, None) is None:
            raise _not_found(f"network ACL {name}")

    @_recorded
    def profile(self, name: str) -> dict[str, Any]:
        if name not in self.profiles:
            raise _not_found(f"profile {name}")
        return self.profiles[name]

    def _put_profile(self, name: str, config: Mapping[str, str], devices: Mapping[str, Any],
                     description: str) -> None:
        self.profiles[name] = {"name": name, "config": dict(config), "devices": dict(devices),
                               "description": description}

    @_recorded
    def create_profile(self, name: str, *, config: Mapping[str, str], devices: Mapping[str, Any],
                       description: str = "") -> None:
        self._put_profile(name, config, devices, description)

    @_recorded
    def update_profile(self, name: str, *, config: Mapping[str, str], devices: Mapping[str, Any],
                       description: str = "") -> None:
        if name not in self.profiles:
            raise _not_found(f"profile {name}")
        self._put_profile(name, config, devices, description)

    @_recorded
    def projects(self) -> list[str]:
        return ["default"]

    # ---- instances ----
    @_recorded
    def instances(self, *, recursion: int = 1, filter: str | None = None,
                  all_projects: bool = False) -> list[Any]:
        if recursion == 0:
            return [f"/1.0/instances/{n}" for n in self.instances_by_name]
        found = [dict(i) for i in self.instances_by_name.values()]
        if recursion >= 2:
            for inst in found:
                inst["state"] = self._state(inst["name"])
        return found

    @_recorded
    def instance(self, name: str) -> dict[str, Any]:
        if name not in self.instances_by_name:
            raise _not_found(f"container {name}")
        return self.instances_by_name[name]

    def _state(self, name: str) -> dict[str, Any]:
        if name in self.states:
            return self.states[name]
        status = self.instances_by_name[name]["status"] if name in self.instances_by_name else "Running"
        return {"status": status, "network": {"eth0": {"host_name": "veth1234abcd", "addresses": [
            {"family": "inet", "scope": "global", "address": self.address}]}}}

    @_recorded
    def instance_state(self, name: str) -> dict[str, Any]:
        return self._state(name)

    @_recorded
    def exists(self, name: str) -> bool:
        return name in self.instances_by_name

    @_recorded
    def create_instance(self, name: str, *, image: str | None = None, source: Mapping[str, Any] | None = None,
                        config: Mapping[str, str] | None = None,
                        devices: Mapping[str, Mapping[str, str]] | None = None,
                        profiles: list[str] | None = None, ephemeral: bool = False, start: bool = False) -> None:
        from coi.errors import ConflictError

        if name in self.instances_by_name:
            raise ConflictError(f"container {name}: already exists")
        self.instances_by_name[name] = {
            "name": name, "status": "Running" if start else "Stopped", "config": dict(config or {}),
            "devices": {k: dict(v) for k, v in (devices or {}).items()},
            "expanded_devices": {k: dict(v) for k, v in (devices or {}).items()},
            "profiles": list(profiles or []), "ephemeral": ephemeral}

    @_recorded
    def set_state(self, name: str, action: str, *, force: bool = False, timeout: int = -1) -> None:
        self.instance(name)["status"] = "Running" if action in ("start", "restart") else "Stopped"

    @_recorded
    def start(self, name: str) -> None:
        self.instance(name)["status"] = "Running"

    @_recorded
    def stop(self, name: str, *, force: bool = False, timeout: int = -1) -> None:
        self.instance(name)["status"] = "Stopped"

    @_recorded
    def delete(self, name: str) -> None:
        from coi.errors import OperationFailedError

        if self.instance(name)["status"] != "Stopped":
            raise OperationFailedError(f"delete container {name}: the instance is running")
        del self.instances_by_name[name]

    @_recorded
    def update_instance(self, name: str, *, config: Mapping[str, str] | None = None,
                        devices: Mapping[str, Mapping[str, str]] | None = None) -> None:
        inst = self.instance(name)
        if config is not None:
            inst["config"].update(config)
        if devices is not None:  # PATCH: the given devices replace theirs, the others stay
            inst["devices"].update({k: dict(v) for k, v in devices.items()})

    @_recorded
    def add_device(self, name: str, device: str, spec: Mapping[str, str]) -> None:
        self.instance(name)["devices"][device] = dict(spec)

    @_recorded
    def remove_device(self, name: str, device: str) -> None:
        if self.instance(name)["devices"].pop(device, None) is None:
            raise _not_found(f"device {device} of container {name}")

    # ---- snapshots ----
    @_recorded
    def snapshots(self, name: str) -> list[dict[str, Any]]:
        self.instance(name)
        taken = self.snapshots_of.get(name, {}).values()
        return [{k: v for k, v in s.items() if not k.startswith("_")} for s in taken]

    @_recorded
    def create_snapshot(self, name: str, snapshot: str, *, stateful: bool = False) -> None:
        import copy

        from coi.errors import ConflictError

        inst = self.instance(name)
        taken = self.snapshots_of.setdefault(name, {})
        if snapshot in taken:
            raise ConflictError(f"snapshot {snapshot} of container {name}: already exists")
        files = copy.deepcopy(self.files_of(name).nodes)
        taken[snapshot] = {"name": snapshot, "created_at": f"2026-01-01T00:00:{len(taken):02d}Z",
                           "stateful": stateful, "config": dict(inst["config"]),
                           "devices": copy.deepcopy(inst["devices"]), "_files": files}

    @_recorded
    def delete_snapshot(self, name: str, snapshot: str) -> None:
        self.instance(name)
        if self.snapshots_of.get(name, {}).pop(snapshot, None) is None:
            raise _not_found(f"snapshot {snapshot} of container {name}")

    @_recorded
    def restore_snapshot(self, name: str, snapshot: str) -> None:
        """Config, devices and files as in the snapshot (Incus would also stop a running
        instance and start it again; the fake leaves its status as it is)."""
        import copy

        inst = self.instance(name)
        snap = self.snapshots_of.get(name, {}).get(snapshot)
        if snap is None:
            raise _not_found(f"restore container {name} to {snapshot}")
        inst["config"] = dict(snap["config"])
        inst["devices"] = copy.deepcopy(snap["devices"])
        self.files_of(name).nodes = copy.deepcopy(snap["_files"])

    # ---- exec ----
    @_recorded
    def exec(self, name: str, command: list[str], *, env: Mapping[str, str] | None = None,
             user: int = 0, group: int = 0, cwd: str | None = None, capture: bool = True,
             retry: bool = True) -> Any:
        from coi.incus import ExecResult

        self.instance(name)
        return ExecResult(0, "", "")

    @_recorded
    def exec_argv(self, name: str, command: list[str], *, user: int | None = None, group: int | None = None,
                  cwd: str | None = None, env: Mapping[str, str] | None = None, terminal: bool = False) -> list[str]:
        return ["sh", "-c", "true"]

    # ---- files ----
    @_recorded
    def push_file(self, name: str, path: str, content: bytes, *, uid: int = 0, gid: int = 0,
                  mode: int = 0o644) -> None:
        self.files_of(name).file(path, content, mode)

    @_recorded
    def make_dir(self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        self.files_of(name).dir(path, mode)

    @_recorded
    def pull_file(self, name: str, path: str, *, max_bytes: int | None = None) -> tuple[bytes, dict[str, Any]]:
        return self.files_of(name).pull_file(name, path, max_bytes=max_bytes)

    @_recorded
    def push_tree(self, name: str, local: Path, remote: str, *, uid: int | None = None,
                  gid: int | None = None) -> None:
        for item in sorted(local.rglob("*")):
            target = f"{remote}/{item.relative_to(local)}"
            if item.is_dir():
                self.files_of(name).dir(target)
            elif item.is_file():
                self.files_of(name).file(target, item.read_bytes())

    @_recorded
    def pull_tree(self, name: str, remote: str, local: Path) -> None:
        raise NotImplementedError("FakeIncus.pull_tree: give a handler")

    @_recorded
    def delete_file(self, name: str, path: str) -> None:
        files = self.files_of(name)
        if path not in files.nodes:
            raise _not_found(f"delete {path} in container {name}")
        del files.nodes[path]

    # ---- images ----
    @_recorded
    def images(self) -> list[dict[str, Any]]:
        return list(self.images_by_fp.values())

    @_recorded
    def image(self, fingerprint: str) -> dict[str, Any]:
        if fingerprint not in self.images_by_fp:
            raise _not_found(f"image {fingerprint}")
        return self.images_by_fp[fingerprint]

    @_recorded
    def image_alias(self, alias: str) -> dict[str, Any]:
        for img in self.images_by_fp.values():
            if any(a["name"] == alias for a in img["aliases"]):
                return {"name": alias, "target": img["fingerprint"]}
        raise _not_found(f"image {alias}")

    @_recorded
    def image_by_alias(self, alias: str) -> dict[str, Any]:
        return self.image(self.image_alias(alias)["target"])

    @_recorded
    def image_exists(self, alias: str) -> bool:
        return any(a["name"] == alias for img in self.images_by_fp.values() for a in img["aliases"])

    @_recorded
    def create_alias(self, alias: str, fingerprint: str, description: str = "") -> None:
        from coi.errors import ConflictError

        if self.image_exists(alias):
            raise ConflictError(f"alias {alias}: already exists")
        self.image(fingerprint)["aliases"].append({"name": alias})

    @_recorded
    def point_alias(self, alias: str, fingerprint: str) -> None:
        for img in self.images_by_fp.values():
            img["aliases"] = [a for a in img["aliases"] if a["name"] != alias]
        self.image(fingerprint)["aliases"].append({"name": alias})

    @_recorded
    def delete_alias(self, alias: str) -> None:
        for img in self.images_by_fp.values():
            img["aliases"] = [a for a in img["aliases"] if a["name"] != alias]

    @_recorded
    def delete_image(self, fingerprint: str) -> None:
        self.image(fingerprint)
        del self.images_by_fp[fingerprint]

    @_recorded
    def update_image_properties(self, fingerprint: str, properties: Mapping[str, str]) -> None:
        self.image(fingerprint)["properties"].update(properties)

    @_recorded
    def publish(self, instance: str, *, properties: Mapping[str, str] | None = None,
                compression: str = "none") -> str:
        from coi.errors import OperationFailedError

        if self.instance(instance)["status"] != "Stopped":
            raise OperationFailedError(f"publish container {instance}: the instance is running")
        return self.add_image([], created="2026-02-01T00:00:00Z", properties=dict(properties or {}), size=4096)

    @_recorded
    def import_split_image(self, metadata: Path, rootfs: Path, *,
                           properties: Mapping[str, str] | None = None) -> str:
        return self.add_image([], properties=dict(properties or {}))
