"""Published ports and SSH agent forwarding, as a normal user against the real daemon:
a server in the container answers on the host's 127.0.0.1, coi list shows the port, a
taken or bad port is refused with nothing left behind; a real agent with a test key is
listed from inside, and no key enters the container."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from coi.wait import wait_for
from sshagent import running_agent

pytestmark = pytest.mark.e2e

AGENT_SOCKET = "/home/code/.ssh-agent-coi.sock"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listed(user, workspace: Path) -> list[dict]:
    proc = user.run(["list", "--format", "json"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return [c for c in json.loads(proc.stdout)["active_containers"] if c["workspace"] == str(workspace)]


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.read().decode()
    except (OSError, http.client.HTTPException):  # the proxy took the connection, nothing served it yet
        return None


def own(user, *paths: Path) -> None:
    for path in paths:
        os.chown(path, user.uid, user.gid)


def started(user, argv: list[str], **kw) -> subprocess.Popen:
    """``argv`` as ``user`` in a process group of its own, so that ``ended`` ends all of it."""
    return subprocess.Popen(user.argv(argv), stdin=subprocess.DEVNULL, start_new_session=True, **kw)


def ended(proc: subprocess.Popen) -> None:
    """SIGTERM to the group (coi cleans up after it, as after Ctrl+C), SIGKILL if that is not enough."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def serve_in(user, name: str, port: int) -> subprocess.Popen:
    """``python3 -m http.server PORT`` as code in /workspace of the container, in the background."""
    return started(user, ["coi", "container", "exec", name, "--user", "1000", "--group", "1000", "--cwd",
                          "/workspace", "--", "python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_published_port_answers_on_the_hosts_loopback_and_coi_list_shows_it(session_user, workspace):
    (workspace / "hello.txt").write_text("hello from the container\n")
    own(session_user, workspace / "hello.txt")
    port = free_port()
    started = session_user.background(workspace, "--debug", "--port", f"{port}:8000")
    name = started["container"]
    server = None
    try:
        expected = [{"host_address": "127.0.0.1", "host_port": port, "container_port": 8000}]
        assert started["ports"] == expected and started["ssh_agent"] is False
        entry, = listed(session_user, workspace)
        assert entry["ports"] == expected
        text = session_user.run(["list"], cwd=workspace).stdout
        assert f"Ports: 127.0.0.1:{port} -> 8000" in text
        server = serve_in(session_user, name, 8000)
        wait_for(lambda: fetch(f"http://127.0.0.1:{port}/hello.txt") == "hello from the container\n",
                 timeout=30, what=f"the container's server on the host's 127.0.0.1:{port}")
    finally:
        if server is not None:
            ended(server)
        session_user.run(["kill", name])
    assert fetch(f"http://127.0.0.1:{port}/hello.txt") is None  # gone with the container


def test_coi_run_publishes_a_port_for_its_command(session_user, workspace):
    port = free_port()
    one_request = ("import http.server as h; s = h.HTTPServer(('127.0.0.1', 8001), h.SimpleHTTPRequestHandler); "
                   "s.handle_request()")
    (workspace / "ran.txt").write_text("served by coi run\n")
    own(session_user, workspace / "ran.txt")
    run = started(session_user, ["coi", "run", "--port", f"{port}:8001", "--", "python3", "-c", one_request],
                  cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: fetch(f"http://127.0.0.1:{port}/ran.txt") == "served by coi run\n", timeout=60,
                 what="coi run's server on the host")
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
    finally:
        ended(run)
    assert listed(session_user, workspace) == []


def test_a_taken_host_port_is_refused_before_any_container_exists(session_user, workspace, incus):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        for args in (["run", "--port", f"{port}:8000", "--", "true"],
                     ["shell", "--background", "--port", str(port)]):
            proc = session_user.run(args, cwd=workspace)
            assert proc.returncode == 1, proc.stderr
            assert f"Error: host port 127.0.0.1:{port} is in use on this host" in proc.stderr
            assert "Traceback" not in proc.stderr and "--port OTHER:" in proc.stderr
            assert listed(session_user, workspace) == []
            assert not [i for i in incus.instances() if i["config"].get("user.coi.workspace") == str(workspace)]


@pytest.mark.parametrize("ports, message", [
    (["0"], "0 is not a port"), (["65536"], "65536 is not a port"), (["web"], "is not [HOST_PORT:]CONTAINER_PORT"),
    (["3000:"], "is not [HOST_PORT:]CONTAINER_PORT"), (["3000", "3000:4000"], "host port 3000 is given twice"),
])
def test_bad_ports_are_usage_errors(session_user, workspace, ports, message):
    flags = [f"--port={p}" for p in ports]
    proc = session_user.run(["run", *flags, "--", "true"], cwd=workspace)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert listed(session_user, workspace) == []


def test_a_persistent_container_keeps_its_ports_and_takes_new_ones(session_user, workspace):
    first_port = free_port()
    second_port = free_port()
    first = session_user.background(workspace, "--debug", "--persistent", "--port", f"{first_port}:8000")
    name = first["container"]
    try:
        again = session_user.background(workspace, "--debug", "--persistent", "--port", f"{second_port}:8002")
        assert again["container"] == name
        assert {(p["host_port"], p["container_port"]) for p in again["ports"]} == {(first_port, 8000),
                                                                                   (second_port, 8002)}
        proc = session_user.run(["shell", "--background", "--persistent", "--port", f"{first_port}:9000"],
                                cwd=workspace)
        assert proc.returncode == 1 and f"publishes host port 127.0.0.1:{first_port} to its port 8000" in proc.stderr
        entry, = listed(session_user, workspace)
        assert {p["host_port"] for p in entry["ports"]} == {first_port, second_port}
    finally:
        session_user.run(["kill", name])


# ---- the SSH agent ----------------------------------------------------------------------

@pytest.fixture
def agent(session_user):
    with running_agent(session_user) as running:
        yield running


def test_the_forwarded_agent_lists_the_key_inside_and_no_key_goes_in(session_user, workspace, agent):
    proc = session_user.run(["run", "--ssh-agent", "--capture", "--", "ssh-add", "-l"], cwd=workspace, env=agent.env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 0 and agent.fingerprint in out["stdout"] and agent.comment in out["stdout"]
    started = session_user.background(workspace, "--debug", "--ssh-agent", env=agent.env)
    name = started["container"]
    try:
        assert started["ssh_agent"] is True
        entry, = listed(session_user, workspace)
        assert entry["ssh_agent"] is True
        look = (f'stat -c "%U %a" {AGENT_SOCKET}; SSH_AUTH_SOCK={AGENT_SOCKET} ssh-add -L; '
                # the pattern on stdin: on sudo's command line it would be in sudo's own journal entry
                'found=$(printf "%s" "$1" | sudo grep -rlsF -f - /home /root /tmp /etc /var /workspace); '
                'echo "${found:-no-key-material}"')
        proc = session_user.run(["container", "exec", name, "--user", "1000", "--group", "1000", "--capture", "--",
                                 "sh", "-c", look, "look", agent.secret_line()], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        lines = json.loads(proc.stdout)["stdout"].splitlines()
        assert lines[0] == "code 600" and lines[1] == agent.public and lines[-1] == "no-key-material"
    finally:
        session_user.run(["kill", name])


def test_the_agent_switch_in_the_users_config_and_no_ssh_agent(session_user, workspace, agent):
    config = session_user.home / ".config" / "coi" / "config.toml"
    original = config.read_text()
    probe = ["--capture", "--", "sh", "-c", 'echo "${SSH_AUTH_SOCK:-none}"; ssh-add -l >/dev/null && echo listed']
    try:
        config.write_text(original + "\n[ssh]\nforward_agent = true\n")
        proc = session_user.run(["run", *probe], cwd=workspace, env=agent.env)
        assert json.loads(proc.stdout)["stdout"].split() == [AGENT_SOCKET, "listed"], proc.stderr
        proc = session_user.run(["run", "--no-ssh-agent", *probe], cwd=workspace, env=agent.env)
        assert json.loads(proc.stdout)["stdout"].split() == ["none"], proc.stderr
    finally:
        config.write_text(original)


def test_no_ssh_auth_sock_is_a_clear_error_naming_the_fix(session_user, workspace):
    proc = session_user.run(["run", "--ssh-agent", "--", "true"], cwd=workspace)  # its environment has none
    assert proc.returncode == 1
    assert "SSH_AUTH_SOCK is not set" in proc.stderr and "ssh-agent" in proc.stderr and "ssh-add" in proc.stderr
    assert listed(session_user, workspace) == []
