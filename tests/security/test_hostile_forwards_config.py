"""The hostile project against published ports and SSH agent forwarding, in pure logic:
its .coi.toml can neither publish a port (on any address) nor forward the agent, also
through a profile; an agent socket the project controls (in the workspace, a link to
the Incus socket) is never handed to Incus."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from coi.config import PublishedPort, load_config
from coi.errors import CoiError
from coi.sessions import forwards

pytestmark = pytest.mark.unit


@pytest.fixture
def files(tmp_path: Path):
    home, workspace = tmp_path / "home", tmp_path / "project"
    (home / ".config" / "coi").mkdir(parents=True)
    workspace.mkdir()
    user = home / ".config" / "coi" / "config.toml"

    def load(project: str, mine: str = ""):
        (workspace / ".coi.toml").write_text(project)
        user.write_text(mine)
        return load_config(workspace=workspace, env={"HOME": str(home)}, system_file=home / "none.toml",
                           user_file=user)
    return load


@pytest.mark.parametrize("project", [
    '[[ports]]\ncontainer = 22\nhost = 2222\naddress = "0.0.0.0"\n',  # the LAN reaches the agent
    '[[ports]]\ncontainer = 5432\n',  # squats the user's database port on loopback
    '[[ports]]\ncontainer = 8000\nhost = 11434\naddress = "::1"\n',
])
def test_the_project_cannot_publish_ports_on_any_address(files, project):
    loaded = files(project)
    assert loaded.config.ports == ()
    warning, = [w for w in loaded.warnings if "ignored" in w]
    assert "ignored ports (a workspace file cannot publish ports" in warning and "--port" in warning


def test_the_project_cannot_forward_the_agent_but_may_turn_it_off(files):
    loaded = files("[ssh]\nforward_agent = true\n")
    assert loaded.config.ssh.forward_agent is False
    assert any("ignored ssh.forward_agent (a workspace file cannot forward your SSH agent" in w
               for w in loaded.warnings)
    loaded = files("[ssh]\nforward_agent = false\n", mine="[ssh]\nforward_agent = true\n")
    assert loaded.config.ssh.forward_agent is False and not loaded.warnings  # stricter: obeyed


def test_the_users_own_ports_and_agent_stand_and_the_project_cannot_remove_or_widen_them(files):
    mine = '[[ports]]\ncontainer = 3000\n[ssh]\nforward_agent = true\n'
    loaded = files('[[ports]]\ncontainer = 3000\naddress = "0.0.0.0"\n', mine=mine)
    assert loaded.config.ports == (PublishedPort(3000, 3000, "127.0.0.1"),) and loaded.config.ssh.forward_agent


def test_a_profile_the_project_names_cannot_forward_through_the_back_door(files):
    # Profiles carry no ports or agent switch: a project's profile that tries is a profile of unknown keys.
    loaded = files('[defaults]\nprofile = "p"\n[profiles.p]\nimage = "x"\nports = [{ container = 1 }]\n'
                   "[profiles.p.ssh]\nforward_agent = true\n")
    assert loaded.config.ports == () and loaded.config.ssh.forward_agent is False


def test_trust_from_the_users_own_config_lets_the_project_publish(files):
    loaded = files('[[ports]]\ncontainer = 8000\n', mine="[defaults]\ntrust_workspace_config = true\n")
    assert loaded.config.ports == (PublishedPort(8000, 8000),)


# ---- an agent socket the project or the agent controls ---------------------------------------

@pytest.fixture
def workspace():
    path = Path(tempfile.mkdtemp(prefix="coi-ws-"))  # short: AF_UNIX paths end at 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_socket_in_the_workspace_is_refused_even_when_it_is_the_users(workspace):
    """An agent (code is the user on the host) can make a socket in /workspace; a project's
    .envrc could point SSH_AUTH_SOCK there. coi does not proxy it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(workspace / "agent.sock"))
        with pytest.raises(CoiError, match="which a container can write"):
            forwards.agent_socket({"SSH_AUTH_SOCK": str(workspace / "agent.sock")}, exposed=[workspace])


def test_a_link_in_the_workspace_to_a_root_socket_is_refused(workspace):
    """SSH_AUTH_SOCK through a link of the project's to a socket that is not the user's (the
    Incus socket, docker's): refused by owner, and the link's target is what is checked."""
    target = Path(tempfile.mkdtemp(prefix="coi-root-")) / "daemon.sock"
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(target))
            os.symlink(target, workspace / "agent.sock")
            uid = os.stat(target).st_uid

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(os, "geteuid", lambda: uid + 1)
                with pytest.raises(CoiError, match="not to you"):
                    forwards.agent_socket({"SSH_AUTH_SOCK": str(workspace / "agent.sock")}, exposed=[workspace])
            # The user's own socket behind the link: the real path goes to Incus, never the link.
            assert forwards.agent_socket({"SSH_AUTH_SOCK": str(workspace / "agent.sock")},
                                         exposed=[workspace]) == str(target)
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)


def test_the_ports_device_cannot_be_pointed_beyond_the_containers_loopback():
    """Whatever the port numbers, the host side listens where coi says and the container side
    is the container's own 127.0.0.1: no device of coi's connects to a host address."""
    for port in (PublishedPort(22, 2222), PublishedPort(80, 8080, "0.0.0.0"), PublishedPort(1, 65535, "::1")):
        device = forwards.port_device(port)
        assert device["bind"] == "host" and device["connect"] == f"tcp:127.0.0.1:{port.container}"
    agent = forwards.agent_device("/tmp/ssh-a/agent.1", code_uid=1000, host_uid=1001, host_gid=1001)
    assert agent["bind"] == "container" and agent["security.uid"] == "1001" and agent["mode"] == "0600"
