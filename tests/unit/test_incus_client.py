"""The Incus REST client against a fake daemon on a unix socket (no real Incus)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from coi.errors import (
    ConflictError,
    DaemonUnavailableError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    TooLargeError,
)
from coi.incus import DEFAULT_SOCKET, GROUP_HINT, ExecResult, Incus, socket_path
from fake_incus import (
    FakeDaemon,
    Reply,
    Request,
    async_op,
    error,
    hang_up_listener,
    operation,
    socket_in,
    stale_socket,
    sync,
)

pytestmark = pytest.mark.unit

INCUS_BINARIES = {"/usr/libexec/incus/incusd", "/usr/bin/incus"}


@pytest.fixture
def connect(daemon: FakeDaemon) -> Iterator[Callable[..., Incus]]:
    """Make clients of the fake daemon; all are closed after the test."""
    clients: list[Incus] = []

    def make(**kw) -> Incus:
        clients.append(Incus(daemon.path, **kw))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Callable[..., Incus]) -> Incus:
    return connect()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Operations are awaited through the API: any time.sleep fails the test."""

    def forbidden(seconds: float) -> None:
        raise AssertionError(f"time.sleep({seconds}) called")

    monkeypatch.setattr(time, "sleep", forbidden)


def _log(body: bytes) -> Reply:
    """An exec output log as the daemon serves it."""
    return Reply(body=body, headers={"Content-Type": "application/octet-stream"})


EXEC_LOGS = "/1.0/instances/c1/logs/exec-output"


def serve_exec(daemon: FakeDaemon, *, code: int = 0, stdout: bytes = b"", stderr: bytes = b"") -> None:
    """Routes for one ``exec`` in container c1 with recorded output."""
    daemon.on("POST", "/1.0/instances/c1/exec", async_op("op-exec"))
    daemon.on("GET", "/1.0/operations/op-exec/wait", operation("op-exec", metadata={
        "return": code,
        "output": {"1": f"{EXEC_LOGS}/exec_op.stdout", "2": f"{EXEC_LOGS}/exec_op.stderr"}}))
    for fd, data in (("stdout", stdout), ("stderr", stderr)):
        daemon.on("GET", f"{EXEC_LOGS}/exec_op.{fd}", _log(data))
        daemon.on("DELETE", f"{EXEC_LOGS}/exec_op.{fd}", sync())


# ---- errors ---------------------------------------------------------------

@pytest.mark.parametrize(("status", "reason", "error_type", "message", "hint"), [
    pytest.param(404, "Not Found", NotFoundError, "container c1: not found", None, id="404"),
    pytest.param(409, "Instance is busy running a start operation", ConflictError,
                 "container c1: Instance is busy running a start operation", None, id="409"),
    pytest.param(400, 'Instance "c1" already exists', ConflictError,
                 'container c1: Instance "c1" already exists', None, id="already-exists"),
    pytest.param(403, "User does not have permission", PermissionDeniedError,
                 "container c1: User does not have permission", GROUP_HINT, id="403"),
    pytest.param(500, "Failed creating instance record: no space left on device", OperationFailedError,
                 "container c1: Failed creating instance record: no space left on device", None, id="500"),
    pytest.param(400, "Storage pool not found", NotFoundError,
                 "container c1: Storage pool not found", None, id="not-found-reason"),
])
def test_error_responses_map_to_coi_errors(daemon, client, status, reason, error_type, message, hint):
    daemon.on("GET", "/1.0/instances/c1", error(reason, status))
    with pytest.raises(error_type) as info:
        client.instance("c1")
    assert (info.value.message, info.value.hint) == (message, hint)


def test_exists_is_false_on_not_found(daemon, client):
    daemon.on("GET", "/1.0/instances/c1", sync({"name": "c1"}))
    daemon.on("GET", "/1.0/instances/gone", error("Instance not found", 404))
    assert (client.exists("c1"), client.exists("gone")) == (True, False)


# ---- connecting -------------------------------------------------------------

@pytest.mark.parametrize(("installed", "message"), [
    (False, "Incus is not installed"),
    (True, "the Incus daemon is not running"),
])
def test_missing_socket_tells_not_installed_from_not_running(tmp_path, monkeypatch, installed, message):
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists",
                        lambda p: installed if str(p) in INCUS_BINARIES else real_exists(p))
    with pytest.raises(DaemonUnavailableError) as info:
        Incus(str(tmp_path / "absent.socket")).server()
    assert info.value.message.startswith(message)
    assert "coi setup" in info.value.hint


def test_socket_without_permission_is_permission_denied(daemon, monkeypatch):
    os.chmod(daemon.path, 0)
    if os.geteuid() == 0:  # mode 000 does not stop root: refuse the connect as the kernel would for a user

        def refuse(self: socket.socket, address: object) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(PermissionDeniedError) as info:
        Incus(daemon.path).server()
    assert daemon.path in info.value.message
    assert "incus-admin" in info.value.hint


def test_listener_that_hangs_up_is_daemon_unavailable(tmp_path):
    path = socket_in(tmp_path)
    with hang_up_listener(path), pytest.raises(DaemonUnavailableError) as info:
        Incus(path).server()
    assert "closed the connection" in info.value.message
    assert "coi setup" in info.value.hint


def test_socket_nobody_listens_on_is_daemon_unavailable(tmp_path):
    path = socket_in(tmp_path)
    stale_socket(path)
    with pytest.raises(DaemonUnavailableError) as info:
        Incus(path).server()
    assert "not answering" in info.value.message


@pytest.mark.parametrize("wire", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 b'{"type":"sync"', id="truncated-body"),
    pytest.param(b"this is not HTTP\r\n\r\n", id="garbage-status-line"),
])
def test_daemon_dying_mid_reply_is_daemon_unavailable(daemon, client, wire):
    daemon.on("GET", "/1.0", Reply(wire=wire))
    with pytest.raises(DaemonUnavailableError):
        client.server()


_SERVER = b'{"type":"sync","status_code":200,"metadata":{"api_version":"1.0"}}'


@pytest.mark.parametrize("wire", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (_SERVER[:9], _SERVER[9:]))
                 + b"0\r\nX-Trailer: t\r\n\r\n", id="chunked-with-extension-and-trailer"),
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + _SERVER, id="until-close"),
])
def test_reply_framings(daemon, client, wire):
    daemon.on("GET", "/1.0", Reply(wire=wire), sync({"api_version": "again"}))
    assert client.server() == {"api_version": "1.0"}
    assert client.server() == {"api_version": "again"}  # the connection is reused or reopened


@pytest.mark.parametrize(("env", "expected"), [
    ({"INCUS_SOCKET": "/run/custom.socket", "INCUS_DIR": "/srv/incus"}, "/run/custom.socket"),
    ({"INCUS_DIR": "/srv/incus"}, "/srv/incus/unix.socket"),
    ({"INCUS_SOCKET": "", "INCUS_DIR": ""}, DEFAULT_SOCKET),
    ({}, DEFAULT_SOCKET),
])
def test_socket_path(env, expected):
    assert socket_path(env) == expected


def test_socket_path_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("INCUS_SOCKET", "/tmp/from-env.socket")
    assert socket_path() == "/tmp/from-env.socket"
    assert Incus.from_environment().path == "/tmp/from-env.socket"


@pytest.mark.parametrize("reply", [
    pytest.param(dataclasses.replace(sync({"api_version": "1.0"}), close=True), id="silent-close"),
    pytest.param(sync({"api_version": "1.0"}, headers={"Connection": "close"}), id="connection-close"),
])
def test_reconnects_after_the_server_closes_a_kept_alive_connection(daemon, client, reply):
    daemon.on("GET", "/1.0", reply, sync({"api_version": "1.0"}))
    assert client.server() == {"api_version": "1.0"}
    assert client.server() == {"api_version": "1.0"}
    assert (len(daemon.requests), daemon.connections) == (2, 2)


def test_connection_is_kept_alive(daemon, client):
    daemon.on("GET", "/1.0", sync({}))
    for _ in range(3):
        client.server()
    assert daemon.connections == 1


# ---- projects ----------------------------------------------------------------

@pytest.mark.parametrize(("project", "expected"), [("p1", "p1"), ("default", None)])
def test_project_is_on_every_request(daemon, connect, project, expected):
    daemon.on("GET", "/1.0/instances", sync([]))
    daemon.on("POST", "/1.0/instances", async_op("op-create"))
    daemon.on("GET", "/1.0/operations/op-create/wait", operation("op-create"))
    daemon.on("POST", "/1.0/instances/c1/files", sync())
    serve_exec(daemon)
    client = connect(project=project)
    client.instances()
    client.create_instance("c1", image="coi")
    client.push_file("c1", "/etc/motd", b"hi")
    client.exec("c1", ["true"])
    assert len(daemon.requests) == 10
    assert [r.query.get("project") for r in daemon.requests] == [expected] * 10


# ---- operations ----------------------------------------------------------------

def test_async_answer_is_awaited_through_the_operation_api(daemon, client, no_sleep):
    done = operation("op1", metadata={"created": "c1"})
    daemon.on("POST", "/1.0/instances", async_op("op1"))
    daemon.on("GET", "/1.0/operations/op1/wait", done)
    result = client.call("POST", "/1.0/instances", "container c1", json_body={"name": "c1"})
    assert result == {"id": "op1", "status": "Success", "err": "", "metadata": {"created": "c1"}}
    assert [(r.method, r.path) for r in daemon.requests] == [
        ("POST", "/1.0/instances"), ("GET", "/1.0/operations/op1/wait")]
    assert daemon.requests[1].query == {"timeout": "60"}


def test_running_operation_is_waited_on_again(daemon, client, no_sleep):
    daemon.on("PUT", "/1.0/instances/c1/state", async_op("op1"))
    daemon.on("GET", "/1.0/operations/op1/wait", operation("op1", "Running"), operation("op1"))
    client.start("c1")
    assert len(daemon.requests_to("GET", "/1.0/operations/op1/wait")) == 2
    assert daemon.requests[0].json() == {"action": "start", "force": False, "timeout": -1}


@pytest.mark.parametrize(("wait_reply", "error_type", "message"), [
    pytest.param(operation("op1", "Failure", err="Failed instance creation: no such image"),
                 OperationFailedError, "container c1: Failed instance creation: no such image", id="failure"),
    pytest.param(operation("op1", "Cancelled"), OperationFailedError, "container c1: Cancelled",
                 id="cancelled"),
    pytest.param(error("Operation not found", 404), OperationFailedError,
                 "container c1: the operation ended before its result was read", id="operation-gone"),
])
def test_failed_operation_raises_with_its_error(daemon, client, no_sleep, wait_reply, error_type, message):
    daemon.on("POST", "/1.0/instances", async_op("op1"))
    daemon.on("GET", "/1.0/operations/op1/wait", wait_reply)
    with pytest.raises(error_type) as info:
        client.create_instance("c1", image="nope")
    assert info.value.message == message


def test_wait_false_returns_the_operation_id(daemon, client):
    daemon.on("POST", "/1.0/images", async_op("op-42"))
    assert client.call("POST", "/1.0/images", "image", json_body={}, wait=False) == "op-42"
    assert daemon.requests_to("GET", "/1.0/operations/op-42/wait") == []


def test_wait_with_a_timeout_gives_up(daemon, client, no_sleep):
    daemon.on("GET", "/1.0/operations/op1/wait", operation("op1", "Running"))
    with pytest.raises(OperationFailedError, match="still running after 2s"):
        client.wait_operation("op1", "publish", timeout=2)
    assert [r.query["timeout"] for r in daemon.requests] == ["2"]


def test_operation_wait_outlasts_the_client_timeout(daemon, connect):
    client = connect(timeout=0.2)
    daemon.on("POST", "/1.0/instances", async_op("op1"))
    daemon.on("GET", "/1.0/operations/op1/wait", dataclasses.replace(operation("op1"), delay=0.5))
    client.create_instance("c1", image="coi")


# ---- exec ------------------------------------------------------------------------

def test_exec_sends_the_command_and_collects_its_output(daemon, client, no_sleep):
    serve_exec(daemon, code=3, stdout=b"out \xe2\x9c\x93\n", stderr=b"warning\n")
    result = client.exec("c1", ["sh", "-c", 'echo "$X"'], env={"X": "a b"}, user=1000, group=1000,
                         cwd="/workspace")
    assert result == ExecResult(3, "out \u2713\n", "warning\n")
    assert daemon.requests[0].json() == {
        "command": ["sh", "-c", 'echo "$X"'], "environment": {"X": "a b"},
        "wait-for-websocket": False, "interactive": False, "record-output": True,
        "user": 1000, "group": 1000, "cwd": "/workspace"}
    assert [(r.method, r.path) for r in daemon.requests[2:]] == [
        ("GET", f"{EXEC_LOGS}/exec_op.stdout"), ("DELETE", f"{EXEC_LOGS}/exec_op.stdout"),
        ("GET", f"{EXEC_LOGS}/exec_op.stderr"), ("DELETE", f"{EXEC_LOGS}/exec_op.stderr")]


@pytest.mark.parametrize("retry", [True, False])
def test_exec_lost_pid_is_tried_again_only_when_allowed(daemon, client, retry):
    lost = operation("op-lost", "Failure", err="Failed to retrieve PID of executing child process")
    daemon.on("POST", "/1.0/instances/c1/exec", async_op("op-lost"), async_op("op-exec"))
    daemon.on("GET", "/1.0/operations/op-lost/wait", lost)
    daemon.on("GET", "/1.0/operations/op-exec/wait", operation("op-exec", metadata={"return": 0}))
    if retry:
        assert client.exec("c1", ["true"], capture=False).exit_code == 0
    else:
        with pytest.raises(OperationFailedError, match="Failed to retrieve PID"):
            client.exec("c1", ["make", "deploy"], capture=False, retry=False)
    assert len(daemon.requests_to("POST", "/1.0/instances/c1/exec")) == (2 if retry else 1)


def test_exec_without_capture_reads_only_the_exit_code(daemon, client, no_sleep):
    daemon.on("POST", "/1.0/instances/c1/exec", async_op("op-exec"))
    daemon.on("GET", "/1.0/operations/op-exec/wait", operation("op-exec", metadata={"return": 1}))
    assert client.exec("c1", ["tmux", "has-session"], capture=False) == ExecResult(1, "", "")
    assert daemon.requests[0].json()["record-output"] is False
    assert len(daemon.requests) == 2  # no output logs to fetch or remove


@pytest.mark.parametrize(("kw", "expected"), [
    pytest.param(
        {"user": 1000, "group": 1000, "cwd": "/home/code/my project", "terminal": True,
         "env": {"A": "x y", "B": "$(touch /tmp/pwned) `id`\n'q'"}},
        ["incus", "exec", "--project", "p1", "c1", "-t", "--user", "1000", "--group", "1000",
         "--cwd", "/home/code/my project", "--env", "A=x y", "--env", "B=$(touch /tmp/pwned) `id`\n'q'",
         "--", "claude", "--resume"],
        id="everything"),
    pytest.param({"terminal": False},
                 ["incus", "exec", "--project", "p1", "c1", "-T", "--", "claude", "--resume"],
                 id="no-terminal"),
    pytest.param({}, ["incus", "exec", "--project", "p1", "c1", "--", "claude", "--resume"], id="defaults"),
])
def test_exec_argv_is_an_argv_list(kw, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("INCUS_CONF", str(tmp_path))  # the CLI's own config: no env prefix (tested below)
    argv = Incus("/nonexistent", project="p1").exec_argv("c1", ["claude", "--resume"], **kw)
    assert argv == expected


# ---- files -------------------------------------------------------------------------

def test_push_file_sends_owner_mode_and_content(daemon, client):
    daemon.on("POST", "/1.0/instances/c1/files", sync())
    client.push_file("c1", "/home/code/my notes+1.txt", b"hello\x00world\r\n", uid=1000, gid=1001, mode=0o600)
    [req] = daemon.requests
    assert req.query == {"path": "/home/code/my notes+1.txt"}
    assert {k: v for k, v in req.headers.items() if k.startswith("x-incus-")} == {
        "x-incus-type": "file", "x-incus-uid": "1000", "x-incus-gid": "1001", "x-incus-mode": "0600",
        "x-incus-write": "overwrite"}
    assert req.body == b"hello\x00world\r\n"


# A container file system served by the fake: path -> (type, mode, content or entries)
CONTAINER_TREE = {
    "/src": ("directory", 0o750, ["sub", "link", "a.txt"]),
    "/src/a.txt": ("file", 0o640, b"alpha\n"),
    "/src/link": ("symlink", 0o777, b"/etc/shadow"),
    "/src/sub": ("directory", 0o555, ["run me.sh"]),
    "/src/sub/run me.sh": ("file", 0o755, b"#!/bin/sh\n"),
}


def serve_tree(request: Request) -> Reply:
    kind, mode, content = CONTAINER_TREE[request.query["path"]]
    headers = {"X-Incus-type": kind, "X-Incus-mode": f"{mode:04o}", "X-Incus-uid": "1000",
               "X-Incus-gid": "1000"}
    if kind == "directory":
        return sync(content, headers=headers)
    return Reply(body=content, headers={**headers, "Content-Type": "application/octet-stream"})


@pytest.mark.parametrize(("path", "expected"), [
    ("/src/a.txt", (b"alpha\n", {"type": "file", "mode": 0o640, "uid": 1000, "gid": 1000})),
    ("/src", (b"", {"type": "directory", "mode": 0o750, "uid": 1000, "gid": 1000,
                    "entries": ["a.txt", "link", "sub"]})),
])
def test_pull_file_reads_content_and_headers(daemon, client, path, expected):
    daemon.on("GET", "/1.0/instances/c1/files", serve_tree)
    assert client.pull_file("c1", path) == expected


def test_pull_file_of_a_missing_path_is_not_found(daemon, client):
    daemon.on("GET", "/1.0/instances/c1/files", error("Not Found", 404))
    with pytest.raises(NotFoundError, match="read /nope in container c1: not found"):
        client.pull_file("c1", "/nope")


def test_pull_tree_keeps_modes_and_skips_symlinks(daemon, client, tmp_path):
    daemon.on("GET", "/1.0/instances/c1/files", serve_tree)
    out = tmp_path / "out"
    client.pull_tree("c1", "/src", out)
    found = {str(p.relative_to(out)): (p.read_bytes() if p.is_file() else None,
                                       stat.S_IMODE(p.stat().st_mode))
             for p in out.rglob("*")}
    assert found == {"a.txt": (b"alpha\n", 0o640), "sub": (None, 0o555),
                     "sub/run me.sh": (b"#!/bin/sh\n", 0o755)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert not (out / "link").is_symlink()


_FILE_HEAD = (b"HTTP/1.1 200 OK\r\nX-Incus-type: file\r\nX-Incus-mode: 0644\r\nX-Incus-uid: 0\r\n"
              b"X-Incus-gid: 0\r\nContent-Type: application/octet-stream\r\n")


def _chunked(*parts: bytes) -> bytes:
    return (_FILE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n")


@pytest.mark.parametrize("wire, max_bytes, content", [
    pytest.param(_FILE_HEAD + b"Content-Length: 10\r\n\r\n0123456789", 10, b"0123456789", id="length-at-limit"),
    pytest.param(_FILE_HEAD + b"Content-Length: 10\r\n\r\n0123456789", 9, None, id="length-over-limit"),
    # Announced but never sent: reading it would fail otherwise; it is refused on its size alone.
    pytest.param(_FILE_HEAD + b"Content-Length: 1099511627776\r\n\r\nabc", 1 << 20, None, id="huge-length"),
    pytest.param(_chunked(b"0123", b"4567", b"89ab"), 12, b"0123456789ab", id="chunked-at-limit"),
    pytest.param(_chunked(b"0123", b"4567", b"89ab"), 11, None, id="chunked-over-limit"),
    pytest.param(_FILE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n7fffffff\r\nabc", 100, None, id="huge-chunk"),
    pytest.param(_FILE_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n0123456789", 10, b"0123456789",
                 id="until-close-at-limit"),
    pytest.param(_FILE_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n0123456789", 9, None,
                 id="until-close-over-limit"),
])
def test_pull_file_refuses_content_over_max_bytes(daemon, client, wire, max_bytes, content):
    daemon.on("GET", "/1.0/instances/c1/files", Reply(wire=wire),
              Reply(body=b"next", headers={"X-Incus-type": "file"}))
    if content is None:
        with pytest.raises(TooLargeError, match=f"^read /f in container c1: more than {max_bytes} bytes$"):
            client.pull_file("c1", "/f", max_bytes=max_bytes)
    else:
        assert client.pull_file("c1", "/f", max_bytes=max_bytes)[0] == content
    assert client.pull_file("c1", "/f")[0] == b"next"


def test_a_refused_body_closes_the_kept_alive_connection(daemon, client):
    daemon.on("GET", "/1.0/instances/c1/files", Reply(body=b"x" * 1000, headers={"X-Incus-type": "file"}),
              Reply(body=b"small", headers={"X-Incus-type": "file"}))
    with pytest.raises(TooLargeError):
        client.pull_file("c1", "/big", max_bytes=10)
    # The unread body is not taken for the next reply: a new connection answers.
    assert client.pull_file("c1", "/small", max_bytes=10)[0] == b"small"
    assert daemon.connections == 2


def test_max_bytes_bounds_content_only(daemon, client):
    daemon.on("GET", "/1.0/instances/c1/files", serve_tree)
    assert client.pull_file("c1", "/src", max_bytes=0)[1]["entries"] == ["a.txt", "link", "sub"]
    daemon.on("GET", "/1.0/instances/c1/files", error("Not Found", 404))
    with pytest.raises(NotFoundError):
        client.pull_file("c1", "/nope", max_bytes=0)


def make_local_tree(root: Path) -> Path:
    """A small host tree with distinct modes: src/{a.txt, sub/{run me.sh}}."""
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "sub" / "run me.sh").write_bytes(b"#!/bin/sh\n")
    for path, mode in ((src, 0o750), (src / "a.txt", 0o640), (src / "sub", 0o700),
                       (src / "sub" / "run me.sh", 0o755)):
        os.chmod(path, mode)
    return src


def pushed(daemon: FakeDaemon) -> list[tuple[str, str, str, str, bytes]]:
    """(path, type, mode, uid:gid, content) of every file-API write, in order."""
    return [(r.query["path"], r.headers["x-incus-type"], r.headers["x-incus-mode"],
             f"{r.headers['x-incus-uid']}:{r.headers['x-incus-gid']}", r.body)
            for r in daemon.requests_to("POST", "/1.0/instances/c1/files")]


def test_push_tree_creates_directories_first_and_keeps_modes(daemon, client, tmp_path):
    daemon.on("POST", "/1.0/instances/c1/files", sync())
    client.push_tree("c1", make_local_tree(tmp_path), "/home/code/dst", uid=1000, gid=1000)
    assert pushed(daemon) == [
        ("/home/code/dst", "directory", "0750", "1000:1000", b""),
        ("/home/code/dst/a.txt", "file", "0640", "1000:1000", b"alpha\n"),
        ("/home/code/dst/sub", "directory", "0700", "1000:1000", b""),
        ("/home/code/dst/sub/run me.sh", "file", "0755", "1000:1000", b"#!/bin/sh\n"),
    ]


def test_make_dir_accepts_an_existing_directory(daemon, client):
    daemon.on("POST", "/1.0/instances/c1/files", error("File already exists", 409))
    client.make_dir("c1", "/home/code")
    assert len(daemon.requests) == 1


def test_push_tree_does_not_copy_symlinks_as_world_writable_files(daemon, client, tmp_path):
    daemon.on("POST", "/1.0/instances/c1/files", sync())
    src = make_local_tree(tmp_path)
    (src / "link").symlink_to("a.txt")
    client.push_tree("c1", src, "/dst")
    assert ("/dst/link", "file", "0777", "0:0", b"alpha\n") not in pushed(daemon)


# ---- images --------------------------------------------------------------------------

ALIAS = "/1.0/images/aliases/coi-base"


@pytest.mark.parametrize(("patch_reply", "expected"), [
    pytest.param(sync(), [("PATCH", ALIAS, {"target": "f00d"})], id="moved"),
    pytest.param(error("not found", 404), [
        ("PATCH", ALIAS, {"target": "f00d"}),
        ("POST", "/1.0/images/aliases", {"name": "coi-base", "target": "f00d", "description": ""}),
    ], id="created"),
])
def test_point_alias_moves_or_creates(daemon, client, patch_reply, expected):
    daemon.on("PATCH", ALIAS, patch_reply)
    daemon.on("POST", "/1.0/images/aliases", sync())
    client.point_alias("coi-base", "f00d")
    assert [(r.method, r.path, r.json()) for r in daemon.requests] == expected


def parse_multipart(body: bytes, boundary: str) -> dict[str, tuple[bytes, bytes]]:
    """name -> (part headers, content) of a multipart/form-data body; asserts its framing."""
    delimiter = b"\r\n--" + boundary.encode()
    preamble, *parts, epilogue = (b"\r\n" + body).split(delimiter)
    assert (preamble, epilogue) == (b"", b"--\r\n"), "body must start and end with the boundary"
    out = {}
    for part in parts:
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        out[name] = (head, content)
    return out


def test_import_split_image_streams_a_multipart_body(daemon, client, tmp_path, no_sleep):
    metadata = tmp_path / "meta.tar.xz"
    rootfs = tmp_path / "rootfs.squashfs"
    metadata.write_bytes(b"meta\r\n--not-the-boundary\r\n\x00")
    rootfs.write_bytes(os.urandom((2 << 20) + 123) + b"\r\n")  # several read chunks
    daemon.on("POST", "/1.0/images", async_op("op-img"))
    daemon.on("GET", "/1.0/operations/op-img/wait", operation("op-img", metadata={"fingerprint": "f00d"}))
    daemon.on("GET", "/1.0/images/f00d", sync({"fingerprint": "f00d", "properties": {"os": "x"}}))
    daemon.on("PUT", "/1.0/images/f00d", sync({}))

    fingerprint = client.import_split_image(metadata, rootfs,
                                            properties={"os": "debian", "description": "coi base"})

    assert fingerprint == "f00d"
    upload, wait, get, put = daemon.requests
    assert (wait.method, wait.path) == ("GET", "/1.0/operations/op-img/wait")
    # Properties are set after the upload: Incus 6.0.4 panics on X-Incus-properties.
    assert "x-incus-properties" not in upload.headers
    assert json.loads(put.body)["properties"] == {"os": "debian", "description": "coi base"}
    content_type, _, boundary = upload.headers["content-type"].partition("; boundary=")
    assert content_type == "multipart/form-data"
    assert "transfer-encoding" not in upload.headers
    assert int(upload.headers["content-length"]) == len(upload.body)
    parts = parse_multipart(upload.body, boundary)
    assert list(parts) == ["metadata", "rootfs"]
    assert parts["metadata"][1] == metadata.read_bytes()
    assert parts["rootfs"][1] == rootfs.read_bytes()
    assert b'filename="rootfs.squashfs"' in parts["rootfs"][0]


@pytest.mark.parametrize("status, reason, kind", [
    (404, "whatever", "NotFoundError"),
    (500, "Command not found", "CommandNotFoundError"),
    (500, "Instance not found", "NotFoundError"),
    (500, "Failed to retrieve PID of executing child process", "ExecLostError"),
    (500, "Failed creating instance from image: Image not provided", "ImageNotFoundError"),
    (409, "busy", "ConflictError"),
    (500, "UNIQUE constraint failed: instances.name", "ConflictError"),
    (403, "not allowed", "PermissionDeniedError"),
    (500, "disk full", "OperationFailedError"),
])
def test_daemon_reasons_become_typed_errors(status, reason, kind):
    from coi import errors
    from coi.incus.failures import _raise_for

    with pytest.raises(errors.CoiError) as exc:
        _raise_for(status, {"error": reason}, "thing")
    assert type(exc.value).__name__ == kind


def test_a_wait_that_runs_out_is_a_typed_timeout():
    from coi.errors import TimedOutError
    from coi.wait import wait_for

    with pytest.raises(TimedOutError, match="timed out after"):
        wait_for(lambda: False, timeout=0, what="nothing")


def test_the_real_client_and_the_one_fake_satisfy_the_protocol(tmp_path):
    import inspect

    from coi.incus import IncusClient
    from fake_incus import FakeIncus

    real = Incus(str(tmp_path / "none.sock"))
    assert isinstance(real, IncusClient) and isinstance(FakeIncus(), IncusClient)
    wanted = {n for n in dir(IncusClient) if not n.startswith("_")} - {"project"}
    for cls in (Incus, FakeIncus):
        for name in wanted:
            ours, theirs = inspect.signature(getattr(IncusClient, name)), inspect.signature(getattr(cls, name))
            assert list(ours.parameters) == list(theirs.parameters), (cls, name)


@pytest.mark.parametrize("own_config, incus_conf, quiet", [(False, None, True), (True, None, False),
                                                           (False, "/somewhere", False)])
def test_the_incus_cli_never_greets_a_first_time_user(tmp_path, monkeypatch, own_config, incus_conf, quiet):
    from coi.incus import client as incus_client

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "INCUS_CONF"):
        monkeypatch.delenv(var, raising=False)
    if incus_conf:
        monkeypatch.setenv("INCUS_CONF", incus_conf)
    if own_config:
        (tmp_path / ".config" / "incus").mkdir(parents=True)
        (tmp_path / ".config" / "incus" / "config.yml").write_text("default-remote: local\n")
    argv = Incus(str(tmp_path / "none.sock")).exec_argv("c", ["true"])
    conf = tmp_path / ".cache" / "coi" / "incus-cli"
    assert argv[:2] == (["env", f"INCUS_CONF={conf}"] if quiet else ["incus", "exec"])
    assert (conf / "config.yml").exists() is quiet
    assert not own_config or (tmp_path / ".config" / "incus" / "config.yml").read_text() == "default-remote: local\n"
    assert incus_client._quiet_cli() == argv[:argv.index("incus")]
