"""The Incus client: one connection to one daemon, scoped to one project. Every REST
call, and the argv of ``incus exec -t`` for the one path that needs a real terminal.
Background operations are awaited with ``/1.0/operations/<id>/wait``; every HTTP or
socket failure becomes a typed ``coi.errors`` exception in ``_raise_for``."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import quote, urlencode

from coi.errors import (
    CoiError,
    DaemonUnavailableError,
    ExecLostError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    TooLargeError,
)
from coi.incus.failures import GROUP_HINT, LOST, SETUP_HINT, _raise_for, again_while_lost
from coi.incus.files import Files
from coi.incus.wire import DEFAULT_SOCKET, BodyLimit, _BadReply, _BodyTooLarge, _Response, _UnixConnection, socket_path


# One operation wait call blocks at most this long on the server; longer
# operations are simply waited on again.
_WAIT_CHUNK = 60


@dataclass(frozen=True)
class ExecResult:
    """Captured result of a command run inside an instance."""

    exit_code: int
    stdout: str
    stderr: str


class Incus(Files):
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

    # ---- snapshots -------------------------------------------------------

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        """The instance's snapshots, each as Incus describes it (``name``, ``created_at``,
        ``stateful``, its ``config``...)."""
        return self.call("GET", f"/1.0/instances/{quote(name, safe='')}/snapshots", f"snapshots of container {name}",
                         params={"recursion": 1}) or []

    def create_snapshot(self, name: str, snapshot: str, *, stateful: bool = False) -> None:
        self.call("POST", f"/1.0/instances/{quote(name, safe='')}/snapshots",
                  f"snapshot {snapshot} of container {name}", json_body={"name": snapshot, "stateful": stateful})

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        self.call("DELETE", f"/1.0/instances/{quote(name, safe='')}/snapshots/{quote(snapshot, safe='')}",
                  f"snapshot {snapshot} of container {name}")

    def restore_snapshot(self, name: str, snapshot: str) -> None:
        """The instance's disk, config and devices as they were in ``snapshot`` (Incus stops
        a running instance for it and starts it again: callers stop it first)."""
        self.call("PUT", f"/1.0/instances/{quote(name, safe='')}", f"restore container {name} to {snapshot}",
                  json_body={"restore": snapshot})

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

        def attempt() -> Any:
            try:
                return self.call("POST", f"/1.0/instances/{quote(name, safe='')}/exec", what, json_body=body)
            except ExecLostError:
                if retry:
                    return LOST
                raise
        op = again_while_lost(attempt, what=f"{name} to run a command")
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
        argv = [*_quiet_cli(), "incus", "exec", "--project", self.project, name]
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


def _quiet_cli() -> list[str]:
    """What to put before ``incus`` so that its CLI says nothing of its own.

    Run for the first time (no client config yet), the ``incus`` CLI greets the user
    with "To start your first container, try: incus launch ..." on stderr, in the
    middle of coi's output. A user with a config of their own (or ``INCUS_CONF``)
    keeps it; otherwise the CLI gets a config of coi's (``~/.cache/coi/incus-cli``),
    and the user's own directory is left alone.
    """
    env = os.environ
    if env.get("INCUS_CONF"):
        return []
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    own = Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "incus" / "config.yml"
    if own.exists():
        return []
    conf = Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "coi" / "incus-cli"
    config = conf / "config.yml"
    try:
        if not config.exists():
            conf.mkdir(parents=True, exist_ok=True, mode=0o700)
            config.write_text("default-remote: local\n")
    except OSError:
        return []  # no place for it: the greeting is the lesser evil
    return ["env", f"INCUS_CONF={conf}"]
