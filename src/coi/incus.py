"""The Incus client: the only module in coi that talks to Incus.

It speaks the REST API over the daemon's unix socket (a small HTTP/1.1 client,
no third-party code) and builds the argv of the ``incus`` command-line client for
the one path that needs a real terminal (``incus exec -t``). Background
operations are awaited with ``/1.0/operations/<id>/wait``; every HTTP or
socket failure becomes a ``coi.errors`` exception in ``_raise_for``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import quote, urlencode

from coi.wait import wait_for
from coi.errors import (
    CoiError,
    CommandNotFoundError,
    ConflictError,
    DaemonUnavailableError,
    ExecLostError,
    ImageNotFoundError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    TooLargeError,
)

DEFAULT_SOCKET = "/var/lib/incus/unix.socket"
SETUP_HINT = "run 'sudo coi setup' to install and start Incus"
GROUP_HINT = (
    "join the Incus admin group ('sudo usermod -aG incus-admin $USER'), "
    "then log out and in again"
)
# What Incus says when it lost the PID of a command it was starting (seen while
# a container boots, and under load). Usually the command did not run, but not
# always: only a command that is safe to run twice may simply be tried again.
EXEC_NOT_STARTED = "Failed to retrieve PID of executing child process"
# One operation wait call blocks at most this long on the server; longer
# operations are simply waited on again.
_WAIT_CHUNK = 60


def socket_path(env: Mapping[str, str] | None = None) -> str:
    """The daemon socket: ``INCUS_SOCKET``, else ``$INCUS_DIR/unix.socket``."""
    env = os.environ if env is None else env
    if env.get("INCUS_SOCKET"):
        return env["INCUS_SOCKET"]
    if env.get("INCUS_DIR"):
        return os.path.join(env["INCUS_DIR"], "unix.socket")
    return DEFAULT_SOCKET


@dataclass(frozen=True)
class ExecResult:
    """Captured result of a command run inside an instance."""

    exit_code: int
    stdout: str
    stderr: str


class _BadReply(Exception):
    """The daemon's answer is not the HTTP/1.1 it should be."""


class _BodyTooLarge(Exception):
    """A reply body is over the caller's limit; the rest of it was not read."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


_MAX_LINE = 65536
# The most body bytes to accept for a reply, given its status and headers (None: any).
BodyLimit = Callable[[int, Mapping[str, str]], "int | None"]
# Bounds of the files API when a caller limits file content (pull_file's max_bytes):
# a directory listing (~250,000 long names) and an error reply have their own.
_MAX_LISTING = 64 << 20
_MAX_ERROR_BODY = 1 << 20


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    will_close: bool = False

    def json(self) -> dict[str, Any]:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            return {}


class _UnixConnection:
    """HTTP/1.1 on the daemon's unix socket: just what the Incus API needs (keep-alive,
    Content-Length and chunked bodies, streamed uploads). ``http.client`` would
    do, but it imports the ``email`` package and ``ssl``: 20 ms on every command."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self._path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._in: Any = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock, self._in = sock, sock.makefile("rb")

    def close(self) -> None:
        for part in (self._in, self.sock):
            if part is not None:
                part.close()
        self.sock = self._in = None

    def exchange(self, method: str, url: str, body: bytes | Iterable[bytes] | None,
                 headers: Mapping[str, str], limit: BodyLimit | None = None) -> _Response:
        """Send one request and read its reply; a body over ``limit`` raises _BodyTooLarge
        with the rest of it unread (the caller must close the connection)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        head = {"Host": "incus", "Accept-Encoding": "identity", **headers}
        if isinstance(body, (bytes, bytearray)):
            head["Content-Length"] = str(len(body))
        elif body is None and method in ("POST", "PUT", "PATCH"):
            head["Content-Length"] = "0"
        lines = [f"{method} {url} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if isinstance(body, (bytes, bytearray)):
            self.sock.sendall(body)
        elif body is not None:  # streamed; the caller sent Content-Length
            for chunk in body:
                self.sock.sendall(chunk)
        return self._read_response(method, limit)

    def _line(self) -> bytes:
        line = self._in.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _BadReply("header line too long")
        return line

    def _read_response(self, method: str, limit: BodyLimit | None = None) -> _Response:
        status_line = self._line()
        if not status_line:
            raise ConnectionResetError("the daemon closed the connection")
        version, _, rest = status_line.decode("latin-1").partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise _BadReply(f"bad status line {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while (line := self._line()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip()] = value.strip()
        h = {k.lower(): v.lower() for k, v in headers.items()}
        status = int(code)
        will_close = h.get("connection") == "close" or version == "HTTP/1.0"
        most = limit(status, headers) if limit else None
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif h.get("transfer-encoding") == "chunked":
            body = self._read_chunked(most)
        elif "content-length" in h:
            size = int(h["content-length"])
            if most is not None and size > most:
                raise _BodyTooLarge(most)  # refused before a byte of it is read
            body = self._read_exactly(size)
        else:  # delimited by the end of the connection
            body, will_close = self._in.read(-1 if most is None else most + 1), True
            if most is not None and len(body) > most:
                raise _BodyTooLarge(most)
        return _Response(status, headers, body, will_close)

    def _read_exactly(self, size: int) -> bytes:
        if size < 0:
            raise _BadReply(f"negative body size {size}")
        data = self._in.read(size)
        if len(data) != size:
            raise _BadReply(f"body ended after {len(data)} of {size} bytes")
        return data

    def _read_chunked(self, most: int | None = None) -> bytes:
        """A chunked body; past ``most`` bytes in all, _BodyTooLarge before the next chunk is read."""
        parts = []
        total = 0
        while True:
            size = int(self._line().split(b";", 1)[0].strip() or b"x", 16)
            total += size
            if most is not None and total > most:
                raise _BodyTooLarge(most)
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self._read_exactly(size))
            self._line()


def _raise_for(status: int, payload: Mapping[str, Any], what: str) -> None:
    """Map an Incus error response to coi's error tree (the one place)."""
    reason = str(payload.get("error") or f"HTTP {status}")
    lowered = reason.lower()
    if status == 404:
        raise NotFoundError(f"{what}: not found")
    if "command not found" in lowered:
        raise CommandNotFoundError(f"{what}: {reason}")
    if "not found" in lowered:
        raise NotFoundError(f"{what}: {reason}")
    if EXEC_NOT_STARTED in reason:
        raise ExecLostError(f"{what}: {reason}")
    if "image not provided" in lowered:
        raise ImageNotFoundError(f"{what}: {reason}")
    if status == 409 or "already exists" in lowered or "unique constraint failed" in lowered:
        raise ConflictError(f"{what}: {reason}")
    if status == 403:
        raise PermissionDeniedError(f"{what}: {reason}", GROUP_HINT)
    raise OperationFailedError(f"{what}: {reason}")


class Incus:
    """A connection to one Incus daemon, scoped to one Incus project."""

    def __init__(self, path: str = DEFAULT_SOCKET, *, project: str = "default",
                 timeout: float | None = 120) -> None:
        self.path = path
        self.project = project
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    @classmethod
    def from_environment(cls, *, project: str = "default") -> Incus:
        return cls(socket_path(), project=project)

    # ---- transport -------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, Any] | None) -> str:
        query = {"project": self.project} if self.project != "default" else {}
        query.update({k: v for k, v in (params or {}).items() if v is not None})
        return path + ("?" + urlencode(query) if query else "")

    def _connection_error(self, exc: OSError) -> CoiError:
        if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
            return PermissionDeniedError(f"permission denied on the Incus socket {self.path}", GROUP_HINT)
        if not os.path.exists(self.path):
            if not (os.path.exists("/usr/libexec/incus/incusd") or os.path.exists("/usr/bin/incus")):
                return DaemonUnavailableError("Incus is not installed", SETUP_HINT)
            return DaemonUnavailableError(
                f"the Incus daemon is not running (no socket at {self.path})", SETUP_HINT)
        return DaemonUnavailableError(
            f"the Incus daemon is not answering on {self.path} ({exc.strerror or exc})", SETUP_HINT)

    def raw(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
            body: bytes | None = None, headers: Mapping[str, str] | None = None,
            timeout: float | None = None, limit: BodyLimit | None = None) -> _Response:
        """One HTTP request; reconnects once if a kept-alive connection dropped.

        A reply body over ``limit`` is not read: TooLargeError, and the
        connection is closed (the rest of the body would put it out of step).
        """
        url = self._url(path, params)
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = _UnixConnection(self.path, timeout or self.timeout)
            else:
                self._conn.timeout = timeout or self.timeout
                if self._conn.sock is not None:
                    self._conn.sock.settimeout(self._conn.timeout)
            try:
                result = self._conn.exchange(method, url, body, headers or {}, limit)
                if result.will_close:
                    self.close()
                return result
            except (BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise DaemonUnavailableError(
                        f"the Incus daemon closed the connection on {self.path}", SETUP_HINT) from None
            except OSError as exc:
                self.close()
                raise self._connection_error(exc) from None
            except _BodyTooLarge as exc:
                self.close()
                raise TooLargeError(f"more than {exc.limit} bytes") from None
            except (_BadReply, ValueError) as exc:
                self.close()
                raise DaemonUnavailableError(
                    f"the Incus daemon sent a broken reply on {self.path} ({exc!r})", SETUP_HINT) from None
            except BaseException:
                self.close()  # interrupted mid-exchange: the connection is out of step
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, path: str, what: str, *, params: Mapping[str, Any] | None = None,
             json_body: Any = None, body: bytes | None = None,
             headers: Mapping[str, str] | None = None, wait: bool = True) -> Any:
        """A request whose answer is Incus's JSON envelope; returns ``metadata``.

        An ``async`` answer is a background operation: with ``wait`` it is
        awaited and its final metadata returned, otherwise its id.
        """
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        resp = self.raw(method, path, params=params, body=body, headers=hdrs)
        payload = resp.json()
        if resp.status >= 400 or payload.get("type") == "error":
            _raise_for(int(payload.get("error_code") or resp.status), payload, what)
        if payload.get("type") == "async":
            op_id = payload["operation"].rsplit("/", 1)[-1]
            return self.wait_operation(op_id, what) if wait else op_id
        return payload.get("metadata")

    def wait_operation(self, op_id: str, what: str, timeout: float | None = None) -> dict[str, Any]:
        """Block on the server until the operation ends; raise on failure."""
        remaining = timeout
        while True:
            chunk = _WAIT_CHUNK if remaining is None else max(1, min(_WAIT_CHUNK, int(remaining)))
            resp = self.raw("GET", f"/1.0/operations/{op_id}/wait", params={"timeout": chunk},
                            timeout=chunk + 30)
            payload = resp.json()
            if resp.status >= 400 or payload.get("type") == "error":
                # A failed operation answers with an error envelope (often HTTP 200).
                code = int(payload.get("error_code") or resp.status)
                if code == 404 and "operation" in str(payload.get("error", "")).lower():
                    raise OperationFailedError(f"{what}: the operation ended before its result was read")
                _raise_for(code, payload, what)
            op = payload.get("metadata") or {}
            status = op.get("status")
            if status == "Success":
                return op
            if status not in ("Running", "Pending"):
                _raise_for(500, {"error": op.get("err") or status}, what)
            if remaining is not None:
                remaining -= chunk
                if remaining <= 0:
                    raise OperationFailedError(f"{what}: still running after {timeout:.0f}s")

    # ---- server, storage, networks, profiles --------------------------------

    def server(self) -> dict[str, Any]:
        return self.call("GET", "/1.0", "Incus server")

    def storage_pools(self) -> list[dict[str, Any]]:
        return self.call("GET", "/1.0/storage-pools", "storage pools", params={"recursion": 1})

    def create_storage_pool(self, name: str, driver: str, config: Mapping[str, str]) -> None:
        self.call("POST", "/1.0/storage-pools", f"storage pool {name}",
                  json_body={"name": name, "driver": driver, "config": dict(config)})

    def networks(self) -> list[dict[str, Any]]:
        return self.call("GET", "/1.0/networks", "networks", params={"recursion": 1})

    def network(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/1.0/networks/{quote(name, safe='')}", f"network {name}")

    def network_leases(self, name: str) -> list[dict[str, Any]]:
        """DHCP leases of a managed network (dynamic ones and instances' fixed addresses)."""
        return self.call("GET", f"/1.0/networks/{quote(name, safe='')}/leases", f"leases of network {name}") or []

    def create_network(self, name: str, config: Mapping[str, str], *, type: str = "bridge",
                       description: str = "") -> None:
        self.call("POST", "/1.0/networks", f"network {name}",
                  json_body={"name": name, "type": type, "config": dict(config),
                             "description": description})

    def update_network(self, name: str, config: Mapping[str, str]) -> None:
        self.call("PATCH", f"/1.0/networks/{quote(name, safe='')}", f"network {name}",
                  json_body={"config": dict(config)})

    def delete_network(self, name: str) -> None:
        self.call("DELETE", f"/1.0/networks/{quote(name, safe='')}", f"network {name}")

    def network_acls(self) -> list[dict[str, Any]]:
        return self.call("GET", "/1.0/network-acls", "network ACLs", params={"recursion": 1})

    def create_network_acl(self, name: str, *, egress: list[dict[str, str]],
                           ingress: list[dict[str, str]] | None = None, description: str = "") -> None:
        self.call("POST", "/1.0/network-acls", f"network ACL {name}",
                  json_body={"name": name, "egress": egress, "ingress": ingress or [],
                             "description": description, "config": {}})

    def delete_network_acl(self, name: str) -> None:
        self.call("DELETE", f"/1.0/network-acls/{quote(name, safe='')}", f"network ACL {name}")

    def profile(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/1.0/profiles/{quote(name, safe='')}", f"profile {name}")

    def create_profile(self, name: str, *, config: Mapping[str, str], devices: Mapping[str, Any],
                       description: str = "") -> None:
        self.call("POST", "/1.0/profiles", f"profile {name}",
                  json_body={"name": name, "config": dict(config), "devices": dict(devices),
                             "description": description})

    def update_profile(self, name: str, *, config: Mapping[str, str], devices: Mapping[str, Any],
                       description: str = "") -> None:
        self.call("PUT", f"/1.0/profiles/{quote(name, safe='')}", f"profile {name}",
                  json_body={"config": dict(config), "devices": dict(devices),
                             "description": description})

    def projects(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in self.call("GET", "/1.0/projects", "projects")]

    # ---- instances -------------------------------------------------------

    def instances(self, *, recursion: int = 1, filter: str | None = None, all_projects: bool = False) -> list[Any]:
        """Instances of the project (of every project with ``all_projects``); recursion 2
        includes state (addresses)."""
        return self.call("GET", "/1.0/instances", "instances",
                         params={"recursion": recursion, "filter": filter,
                                 "all-projects": "true" if all_projects else None}) or []

    def instance(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/1.0/instances/{quote(name, safe='')}", f"container {name}")

    def instance_state(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/1.0/instances/{quote(name, safe='')}/state", f"container {name}")

    def exists(self, name: str) -> bool:
        try:
            self.instance(name)
        except NotFoundError:
            return False
        return True

    def create_instance(self, name: str, *, image: str | None = None,
                        source: Mapping[str, Any] | None = None,
                        config: Mapping[str, str] | None = None,
                        devices: Mapping[str, Mapping[str, str]] | None = None,
                        profiles: list[str] | None = None, ephemeral: bool = False,
                        start: bool = False) -> None:
        """Create a container from a local image alias (or an explicit source)."""
        body: dict[str, Any] = {
            "name": name,
            "type": "container",
            "source": dict(source) if source else {"type": "image", "alias": image},
            "config": dict(config or {}),
            "devices": {k: dict(v) for k, v in (devices or {}).items()},
            "ephemeral": ephemeral,
            "start": start,
        }
        if profiles is not None:
            body["profiles"] = profiles
        self.call("POST", "/1.0/instances", f"container {name}", json_body=body)

    def set_state(self, name: str, action: str, *, force: bool = False, timeout: int = -1) -> None:
        """start, stop, restart, freeze or unfreeze an instance."""
        self.call("PUT", f"/1.0/instances/{quote(name, safe='')}/state", f"{action} container {name}",
                  json_body={"action": action, "force": force, "timeout": timeout})

    def start(self, name: str) -> None:
        self.set_state(name, "start")

    def stop(self, name: str, *, force: bool = False, timeout: int = -1) -> None:
        self.set_state(name, "stop", force=force, timeout=timeout)

    def delete(self, name: str) -> None:
        self.call("DELETE", f"/1.0/instances/{quote(name, safe='')}", f"delete container {name}")

    def update_instance(self, name: str, *, config: Mapping[str, str] | None = None,
                        devices: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """PATCH: only the given config keys and devices change."""
        body: dict[str, Any] = {}
        if config is not None:
            body["config"] = dict(config)
        if devices is not None:
            body["devices"] = {k: dict(v) for k, v in devices.items()}
        self.call("PATCH", f"/1.0/instances/{quote(name, safe='')}", f"container {name}", json_body=body)

    def add_device(self, name: str, device: str, spec: Mapping[str, str]) -> None:
        self.update_instance(name, devices={device: spec})

    def remove_device(self, name: str, device: str) -> None:
        inst = self.instance(name)
        devices = dict(inst.get("devices") or {})
        if device not in devices:
            raise NotFoundError(f"device {device} of container {name}: not found")
        del devices[device]
        body = {k: inst[k] for k in ("architecture", "config", "profiles", "ephemeral", "description")
                if k in inst}
        body["devices"] = devices
        self.call("PUT", f"/1.0/instances/{quote(name, safe='')}", f"container {name}", json_body=body)

    # ---- exec ------------------------------------------------------------

    def exec(self, name: str, command: list[str], *, env: Mapping[str, str] | None = None,
             user: int = 0, group: int = 0, cwd: str | None = None, capture: bool = True,
             retry: bool = True) -> ExecResult:
        """Run ``command`` (an argv list, no shell) and capture its output.

        ``capture=False`` keeps only the exit code: 2 requests instead of 6
        (no output logs to fetch and remove). With ``retry`` the command is run
        again when Incus lost its PID (``EXEC_NOT_STARTED``): pass False unless
        running it twice is harmless.
        """
        what = f"exec in container {name}"
        body: dict[str, Any] = {
            "command": list(command),
            "environment": dict(env or {}),
            "wait-for-websocket": False,
            "interactive": False,
            "record-output": capture,
            "user": user,
            "group": group,
        }
        if cwd:
            body["cwd"] = cwd

        def attempt() -> dict[str, Any] | None:
            try:
                return self.call("POST", f"/1.0/instances/{quote(name, safe='')}/exec", what, json_body=body)
            except ExecLostError:
                if retry:
                    return None
                raise
        op = wait_for(attempt, timeout=20, what=f"{name} to run a command")
        meta = op.get("metadata") or {}
        outputs = meta.get("output") or {}
        captured = [self._take_log(outputs.get(fd)) for fd in ("1", "2")]
        return ExecResult(int(meta.get("return", -1)), captured[0], captured[1])

    def _take_log(self, url: str | None) -> str:
        """Read an exec output log, then remove it from the server."""
        if not url:
            return ""
        path = url.split("?", 1)[0]
        resp = self.raw("GET", path)
        self.raw("DELETE", path)
        return resp.body.decode("utf-8", "replace")

    def exec_argv(self, name: str, command: list[str], *, user: int | None = None,
                  group: int | None = None, cwd: str | None = None,
                  env: Mapping[str, str] | None = None, terminal: bool | None = None) -> list[str]:
        """argv for ``incus exec`` (the interactive path: a real terminal)."""
        argv = ["incus", "exec", "--project", self.project, name]
        if terminal is True:
            argv.append("-t")
        elif terminal is False:
            argv.append("-T")
        if user is not None:
            argv += ["--user", str(user)]
        if group is not None:
            argv += ["--group", str(group)]
        if cwd:
            argv += ["--cwd", cwd]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        return argv + ["--", *command]

    # ---- files -----------------------------------------------------------

    def _files_path(self, name: str) -> str:
        return f"/1.0/instances/{quote(name, safe='')}/files"

    def push_file(self, name: str, path: str, content: bytes, *, uid: int = 0, gid: int = 0,
                  mode: int = 0o644) -> None:
        self.call("POST", self._files_path(name), f"write {path} in container {name}",
                  params={"path": path}, body=content,
                  headers={"X-Incus-type": "file", "X-Incus-uid": str(uid), "X-Incus-gid": str(gid),
                           "X-Incus-mode": f"{mode:04o}", "X-Incus-write": "overwrite",
                           "Content-Type": "application/octet-stream"})

    def make_dir(self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        try:
            self.call("POST", self._files_path(name), f"create {path} in container {name}",
                      params={"path": path}, body=b"",
                      headers={"X-Incus-type": "directory", "X-Incus-uid": str(uid),
                               "X-Incus-gid": str(gid), "X-Incus-mode": f"{mode:04o}"})
        except ConflictError:
            pass  # already there

    def pull_file(self, name: str, path: str, *, max_bytes: int | None = None) -> tuple[bytes, dict[str, Any]]:
        """Content and ``{"type", "mode", "uid", "gid"}`` of one file.

        For a directory the content is empty and ``entries`` lists its names.
        With ``max_bytes``, content larger than that is refused (TooLargeError)
        without being read; a directory listing is then bounded too (64 MiB).
        """
        what = f"read {path} in container {name}"
        try:
            resp = self.raw("GET", self._files_path(name), params={"path": path},
                            limit=None if max_bytes is None else _files_limit(max_bytes))
        except TooLargeError as exc:
            raise TooLargeError(f"{what}: {exc.message}") from None
        if resp.status >= 400:
            _raise_for(resp.status, resp.json(), what)
        h = {k.lower(): v for k, v in resp.headers.items()}
        info: dict[str, Any] = {
            "type": h.get("x-incus-type", "file"),
            "mode": int(h.get("x-incus-mode", "0644"), 8),
            "uid": int(h.get("x-incus-uid", "0")),
            "gid": int(h.get("x-incus-gid", "0")),
        }
        if info["type"] == "directory":
            info["entries"] = sorted(resp.json().get("metadata") or [])
            return b"", info
        return resp.body, info

    def push_tree(self, name: str, local: Path, remote: str, *, uid: int | None = None,
                  gid: int | None = None) -> None:
        """Copy a host file or directory tree into the instance, keeping modes.

        Owner: ``uid``/``gid`` when given, else root.
        """
        for src, dst in _walk_local(local, PurePosixPath(remote)):
            if src.is_symlink():
                continue  # never copy what a link points at, which may be outside the tree
            st = src.lstat()
            mode = stat.S_IMODE(st.st_mode)
            owner = {"uid": uid or 0, "gid": gid or 0}
            if src.is_dir():
                self.make_dir(name, str(dst), mode=mode, **owner)
            elif src.is_file():
                self.push_file(name, str(dst), src.read_bytes(), mode=mode, **owner)

    def pull_tree(self, name: str, remote: str, local: Path) -> None:
        """Copy a file or directory tree out of the instance, keeping modes."""
        content, info = self.pull_file(name, remote)
        if info["type"] == "directory":
            local.mkdir(parents=True, exist_ok=True)
            for entry in info["entries"]:
                self.pull_tree(name, str(PurePosixPath(remote) / entry), local / entry)
            os.chmod(local, info["mode"])
        elif info["type"] == "file":
            local.write_bytes(content)
            os.chmod(local, info["mode"])
        # symlinks and special files are skipped on purpose: nothing from the
        # container may point a host path somewhere else.

    def delete_file(self, name: str, path: str) -> None:
        self.call("DELETE", self._files_path(name), f"delete {path} in container {name}",
                  params={"path": path})

    # ---- images ----------------------------------------------------------

    def images(self) -> list[dict[str, Any]]:
        return self.call("GET", "/1.0/images", "images", params={"recursion": 1}) or []

    def image(self, fingerprint: str) -> dict[str, Any]:
        return self.call("GET", f"/1.0/images/{fingerprint}", f"image {fingerprint}")

    def image_alias(self, alias: str) -> dict[str, Any]:
        """``{"name", "target"}`` of an alias; NotFoundError when missing."""
        return self.call("GET", f"/1.0/images/aliases/{quote(alias, safe='')}", f"image {alias}")

    def image_by_alias(self, alias: str) -> dict[str, Any]:
        return self.image(self.image_alias(alias)["target"])

    def image_exists(self, alias: str) -> bool:
        try:
            self.image_alias(alias)
        except NotFoundError:
            return False
        return True

    def create_alias(self, alias: str, fingerprint: str, description: str = "") -> None:
        self.call("POST", "/1.0/images/aliases", f"image alias {alias}",
                  json_body={"name": alias, "target": fingerprint, "description": description})

    def point_alias(self, alias: str, fingerprint: str) -> None:
        """Create ``alias`` or move it to ``fingerprint``."""
        try:
            self.call("PATCH", f"/1.0/images/aliases/{quote(alias, safe='')}", f"image alias {alias}",
                      json_body={"target": fingerprint})
        except NotFoundError:
            self.create_alias(alias, fingerprint)

    def delete_alias(self, alias: str) -> None:
        self.call("DELETE", f"/1.0/images/aliases/{quote(alias, safe='')}", f"image alias {alias}")

    def delete_image(self, fingerprint: str) -> None:
        self.call("DELETE", f"/1.0/images/{fingerprint}", f"delete image {fingerprint}")

    def update_image_properties(self, fingerprint: str, properties: Mapping[str, str]) -> None:
        img = self.image(fingerprint)
        props = dict(img.get("properties") or {})
        props.update(properties)
        self.call("PUT", f"/1.0/images/{fingerprint}", f"image {fingerprint}",
                  json_body={"auto_update": img.get("auto_update", False),
                             "public": img.get("public", False), "properties": props,
                             "expires_at": img.get("expires_at")})

    def publish(self, instance: str, *, properties: Mapping[str, str] | None = None,
                compression: str = "none") -> str:
        """Publish a stopped instance as a new image; returns its fingerprint."""
        op = self.call("POST", "/1.0/images", f"publish container {instance}",
                       json_body={"source": {"type": "instance", "name": instance},
                                  "properties": dict(properties or {}),
                                  "compression_algorithm": compression,
                                  "public": False})
        return op["metadata"]["fingerprint"]

    def import_split_image(self, metadata: Path, rootfs: Path, *,
                           properties: Mapping[str, str] | None = None) -> str:
        """Import a split image (metadata tarball + rootfs tarball); returns its fingerprint.

        The body is streamed as multipart/form-data, never read into memory whole.
        """
        boundary = "coi-" + os.urandom(12).hex()
        heads = [
            (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; "
             f"filename=\"{path.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
            for part, path in (("metadata", metadata), ("rootfs", rootfs))
        ]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = (sum(map(len, heads)) + metadata.stat().st_size + rootfs.stat().st_size
                  + len(b"\r\n") + len(tail))

        def body() -> Iterator[bytes]:
            for i, (head, path) in enumerate(zip(heads, (metadata, rootfs))):
                yield (b"\r\n" if i else b"") + head
                with path.open("rb") as fh:
                    while chunk := fh.read(1 << 20):
                        yield chunk
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(length), "X-Incus-public": "0"}
        what = f"import image {rootfs.name}"
        op_id = self.call("POST", "/1.0/images", what, body=body(), headers=headers,  # type: ignore[arg-type]
                          wait=False)
        fingerprint = self.wait_operation(op_id, what)["metadata"]["fingerprint"]
        # Properties are set afterwards, never with X-Incus-properties: Incus 6.0.4
        # panics on that header when the image's metadata.yaml has no properties.
        if properties:
            self.update_image_properties(fingerprint, properties)
        return fingerprint

    # ---- network isolation helpers -------------------------------------------

    def put_network_acl(self, name: str, *, egress: list[dict[str, str]],
                        ingress: list[dict[str, str]], description: str = "") -> None:
        """Replace an ACL's rules (NotFoundError when it does not exist)."""
        self.call("PUT", f"/1.0/network-acls/{quote(name, safe='')}", f"network ACL {name}",
                  json_body={"egress": egress, "ingress": ingress, "description": description,
                             "config": {}})


def _files_limit(max_bytes: int) -> BodyLimit:
    """Body bounds of one files-API read: ``max_bytes`` for content, fixed ones otherwise."""
    def limit(status: int, headers: Mapping[str, str]) -> int:
        if status >= 300:
            return _MAX_ERROR_BODY
        kind = next((v for k, v in headers.items() if k.lower() == "x-incus-type"), "file")
        return _MAX_LISTING if kind == "directory" else max_bytes
    return limit


def _walk_local(local: Path, remote: PurePosixPath) -> Iterator[tuple[Path, PurePosixPath]]:
    """Pairs (host path, container path), parents before children."""
    yield local, remote
    if local.is_dir() and not local.is_symlink():
        for child in sorted(local.iterdir()):
            yield from _walk_local(child, remote / child.name)
