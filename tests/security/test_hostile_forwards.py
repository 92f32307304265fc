"""The hostile project and the hostile agent against published ports and SSH agent
forwarding, on the real daemon, as a normal user.

The project asks for ports (the LAN's address, a loopback port) and the agent in its
.coi.toml, and points SSH_AUTH_SOCK at sockets it controls; the agent, root in its
container, tries to reach the host's other ports through what coi gave it. Every test
asserts on the host: nothing published, nothing proxied, nothing reached, nothing left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_port
from sshagent import running_agent

pytestmark = pytest.mark.security

AGENT_SOCKET = "/home/code/.ssh-agent-coi.sock"
MARKER = "coi-test-host-only-marker"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return False
    except OSError:
        return True


def workspace_containers(incus, workspace: Path) -> list[str]:
    return [i["name"] for i in incus.instances() if i["config"].get("user.coi.workspace") == str(workspace)]


def proxies(incus, name: str) -> dict:
    return {k: v for k, v in (incus.instance(name).get("devices") or {}).items() if v.get("type") == "proxy"}


@pytest.fixture
def agent(session_user):
    with running_agent(session_user) as running:
        yield running


def test_the_projects_ports_and_agent_switch_are_not_obeyed(session_user, workspace, incus, agent):
    lan_port, loop_port = free_port(), free_port()
    (workspace / ".coi.toml").write_text(
        f'[[ports]]\ncontainer = 8000\nhost = {lan_port}\naddress = "0.0.0.0"\n'
        f"[[ports]]\ncontainer = 8001\nhost = {loop_port}\n"
        "[ssh]\nforward_agent = true\n")
    os.chown(workspace / ".coi.toml", session_user.uid, session_user.gid)
    proc = session_user.run(["shell", "--background", "--format", "json", "--debug"], cwd=workspace, env=agent.env)
    assert proc.returncode == 0, proc.stderr
    started = json.loads(proc.stdout)
    name = started["container"]
    try:
        assert "ignored ports (a workspace file cannot publish ports" in proc.stderr
        assert "ssh.forward_agent (a workspace file cannot forward your SSH agent" in proc.stderr
        assert started["ports"] == [] and started["ssh_agent"] is False
        assert proxies(incus, name) == {}
        assert refused("127.0.0.1", lan_port) and refused("127.0.0.1", loop_port)
        look = f"test -e {AGENT_SOCKET} && echo socket || echo none"
        proc = session_user.run(["container", "exec", name, "--capture", "--", "sh", "-c", look], cwd=workspace)
        assert json.loads(proc.stdout)["stdout"].split() == ["none"], proc.stdout
    finally:
        session_user.run(["kill", name])
    proc = session_user.run(["run", "--capture", "--", "sh", "-c", 'echo "${SSH_AUTH_SOCK:-none}"'], cwd=workspace,
                            env=agent.env)
    assert json.loads(proc.stdout)["stdout"] == "none\n", proc.stderr  # the agent's environment: nothing either


def test_an_agent_socket_the_project_or_the_agent_controls_is_never_proxied(session_user, workspace, incus):
    """The agent leaves a socket of its own and a link to the Incus socket in /workspace (a
    project's .envrc could point SSH_AUTH_SOCK at either): coi refuses both, and makes nothing."""
    plant = ("import os, socket; s = socket.socket(socket.AF_UNIX); s.bind('/workspace/agent.sock'); "
             "os.symlink('/var/lib/incus/unix.socket', '/workspace/incus.sock')")
    proc = session_user.run(["run", "--", "python3", "-c", plant], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert (workspace / "agent.sock").is_socket() and (workspace / "agent.sock").stat().st_uid == session_user.uid
    # The Incus socket is root's ("not to you"), or behind a directory the user cannot search.
    for planted, messages in (("agent.sock", ["which a container can write"]),
                              ("incus.sock", ["not to you", "no such socket"])):
        proc = session_user.run(["run", "--ssh-agent", "--", "true"], cwd=workspace,
                                env={"SSH_AUTH_SOCK": str(workspace / planted)})
        assert proc.returncode == 1 and any(m in proc.stderr for m in messages), proc.stderr
        assert "Traceback" not in proc.stderr
    assert workspace_containers(incus, workspace) == []


def test_a_session_cannot_take_a_host_port_its_user_could_not(session_user, workspace, incus):
    """Incus's proxy runs as root and could listen below 1024; coi publishes only what the
    user could open (it tries, as the user), so a session cannot stand in for a system service."""
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 80:
        pytest.skip(f"this host lets every user listen from port {start} up")
    proc = session_user.run(["run", "--port", "80:8000", "--", "true"], cwd=workspace)
    assert proc.returncode == 1, proc.stderr
    assert "host port 80 is below 1024" in proc.stderr and "--port 8080:8000" in proc.stderr
    assert workspace_containers(incus, workspace) == []


@pytest.fixture
def host_server(tmp_path):
    """An HTTP server on the host's 127.0.0.1 only, serving a marker file; ended by its pid."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "marker.txt").write_text(MARKER + "\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=served,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield port
    finally:
        proc.kill()
        proc.wait()


# Run as root in the container (the hostile agent): every way through coi's proxies it can think of.
PROBE = r'''
import json, socket, sys
gateway, host_port, published, agent_socket = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
request = b"GET /marker.txt HTTP/1.0\r\nHost: localhost\r\n\r\n"
def tcp(address, port):
    try:
        with socket.create_connection((address, port), timeout=3) as s:
            s.sendall(request)
            return s.recv(4096).decode("latin-1")
    except OSError as exc:
        return f"{type(exc).__name__}"
def unix(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(3)
            s.connect(path)
            s.sendall(request)
            return s.recv(4096).decode("latin-1")
    except OSError as exc:
        return f"{type(exc).__name__}"
print(json.dumps({
    "loopback host port": tcp("127.0.0.1", host_port),
    "gateway host port": tcp(gateway, host_port),
    "gateway published port": tcp(gateway, published),
    "loopback published port": tcp("127.0.0.1", published),
    "agent socket": unix(agent_socket),
}))
'''


def test_the_agent_cannot_reach_other_host_ports_through_the_proxies(session_user, workspace, incus, agent,
                                                                     host_server):
    from coi.host import COI_NETWORK

    gateway = str(ipaddress.ip_interface(incus.network(COI_NETWORK)["config"]["ipv4.address"]).ip)
    published = free_port()
    started = session_user.background(workspace, "--debug", "--port", f"{published}:8000", "--ssh-agent",
                                      env=agent.env)
    name = started["container"]
    try:
        assert started["ssh_agent"] is True and started["ports"][0]["host_port"] == published
        for device in proxies(incus, name).values():  # nothing of coi's connects to a host TCP address
            assert device["connect"].startswith(("tcp:127.0.0.1:", "unix:")), device
            if device["connect"].startswith("tcp:"):
                assert device["bind"] == "host"
        proc = session_user.run(["container", "exec", name, "--capture", "--", "python3", "-c", PROBE, gateway,
                                 str(host_server), str(published), AGENT_SOCKET], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        results = json.loads(json.loads(proc.stdout)["stdout"])
        assert not [k for k, v in results.items() if MARKER in v], results
        assert refused(gateway, published)  # published on the host's loopback only, not on the bridge
    finally:
        session_user.run(["kill", name])
