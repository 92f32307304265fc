"""Published ports and SSH agent forwarding (coi.sessions.forwards): parsing, the checks
before anything exists, the proxy devices a session container gets (new or reused), and
what coi list shows. Against the shared FakeIncus; host ports are tried on loopback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from coi.config import PublishedPort, default_config, load_config
from coi.errors import CoiError, ConfigError, ConflictError, UsageError
from coi.sessions import forwards, lifecycle, spec
from coi.sessions.lifecycle import Place
from fake_incus import FakeIncus
from session_doubles import Said

pytestmark = pytest.mark.unit


# ---- parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("given, host, container", [
    ("3000", 3000, 3000), ("8080:3000", 8080, 3000), ("1", 1, 1), ("65535:1", 65535, 1), ("08080:80", 8080, 80),
])
def test_a_port_is_container_port_or_host_and_container_port(given, host, container):
    assert forwards.parse_port(given) == PublishedPort(container=container, host=host, address="127.0.0.1")


@pytest.mark.parametrize("given, message", [
    ("", r"is not \[HOST_PORT:\]CONTAINER_PORT"), ("abc", r"'abc' is not \[HOST_PORT:\]CONTAINER_PORT"),
    ("1:2:3", "is not"), (":3000", "is not"), ("3000:", "is not"), ("+3000", "is not"), (" 3000", "is not"),
    ("\u0663\u0660\u0660\u0660", "is not"),  # Arabic-Indic digits: int() takes them, coi does not
    ("127.0.0.1:3000:3000", "is not"), ("0", "0 is not a port"), ("65536", "65536 is not a port"),
    ("0:3000", "0 is not a port"), ("8080:99999", "99999 is not a port"),
])
def test_junk_and_ports_outside_1_to_65535_are_usage_errors(given, message):
    with pytest.raises(UsageError, match=message) as exc:
        forwards.parse_port(given)
    assert exc.value.exit_code == 2 and "--port 3000" in exc.value.hint


def test_flags_add_to_the_config_and_replace_its_entry_for_the_same_host_port():
    configured = (PublishedPort(3000, 3000), PublishedPort(22, 2222, "0.0.0.0"))
    ports = forwards.session_ports(configured, ["8080:80", "2222:22"])
    assert ports == (PublishedPort(3000, 3000), PublishedPort(22, 2222), PublishedPort(80, 8080))


def test_one_host_port_is_published_once():
    with pytest.raises(UsageError, match="host port 3000 is given twice"):
        forwards.session_ports((), ["3000", "3000:4000"])
    with pytest.raises(UsageError, match="given twice"):
        forwards.session_ports((), ["3000", "3000"])
    with pytest.raises(ConfigError, match=r"\[\[ports\]\] publishes host port 3000 twice"):
        forwards.session_ports((PublishedPort(1, 3000), PublishedPort(2, 3000)), [])


def test_the_config_takes_ports_and_the_agent_switch(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text('[[ports]]\ncontainer = 3000\n[[ports]]\ncontainer = 80\nhost = 8080\naddress = "::0001"\n'
                    "[ssh]\nforward_agent = true\n")
    config = load_config(workspace=None, env={"HOME": str(tmp_path)}, user_file=user,
                         system_file=tmp_path / "none.toml").config
    assert config.ports == (PublishedPort(3000, 3000, "127.0.0.1"), PublishedPort(80, 8080, "::1"))
    assert config.ssh.forward_agent is True
    assert default_config(env={"HOME": str(tmp_path)}).ssh.forward_agent is False


@pytest.mark.parametrize("entry", [
    "container = 0", "container = 70000", 'container = "3000"', "host = 3000", "container = 1\nhost = 0",
    'container = 1\naddress = "localhost"', 'container = 1\naddress = "300.1.1.1"', "container = 1\nport = 2",
    "container = true",
])
def test_bad_ports_in_the_config_name_the_key_and_the_form(tmp_path, entry):
    user = tmp_path / "user.toml"
    user.write_text(f"[[ports]]\n{entry}\n")
    with pytest.raises(ConfigError, match=r"ports = .* is not allowed; use a list of tables such as \{ container"):
        load_config(workspace=None, env={"HOME": str(tmp_path)}, user_file=user, system_file=tmp_path / "none")


# ---- devices ------------------------------------------------------------------------

def test_a_port_device_listens_on_the_host_and_connects_to_the_containers_loopback():
    assert forwards.port_device(PublishedPort(3000, 8080)) == {
        "type": "proxy", "bind": "host", "listen": "tcp:127.0.0.1:8080", "connect": "tcp:127.0.0.1:3000"}
    assert forwards.port_device(PublishedPort(80, 8080, "::1"))["listen"] == "tcp:[::1]:8080"


def test_the_agent_device_is_codes_socket_reaching_the_host_socket_as_the_user():
    device = forwards.agent_device("/tmp/ssh-x/agent.1", code_uid=1000, host_uid=1234, host_gid=1235)
    assert device == {"type": "proxy", "bind": "container", "listen": f"unix:{forwards.AGENT_SOCKET}",
                      "connect": "unix:/tmp/ssh-x/agent.1", "uid": "1000", "gid": "1000", "mode": "0600",
                      "security.uid": "1234", "security.gid": "1235"}
    assert not forwards.AGENT_SOCKET.startswith(("/run/", "/tmp/"))  # a tmpfs at boot would hide it


def test_published_ports_are_read_back_from_the_devices():
    inst = {"devices": {
        "port-8080": forwards.port_device(PublishedPort(3000, 8080)),
        "port-9000": forwards.port_device(PublishedPort(9000, 9000, "::1")),
        "port-junk": {"type": "proxy", "listen": "tcp:nonsense", "connect": "tcp:127.0.0.1:1"},
        "workspace": {"type": "disk", "source": "/x", "path": "/workspace"},
        forwards.AGENT_DEVICE: forwards.agent_device("/s", code_uid=1, host_uid=2, host_gid=3),
    }}
    assert forwards.published(inst) == (PublishedPort(3000, 8080), PublishedPort(9000, 9000, "::1"))
    assert forwards.agent_forwarded(inst) and not forwards.agent_forwarded({"devices": {}})


# ---- host ports: free, and the user's to open ------------------------------------------

def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _free_port(*others: int) -> int:
    """A port free on loopback now, and none of ``others``."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in others:
            return port


def test_a_taken_host_port_is_refused_in_one_line():
    with _listening() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConflictError, match=f"host port 127.0.0.1:{port} is in use on this host") as exc:
            forwards.check_ports_free([PublishedPort(80, port)], [])
    assert "--port OTHER:80" in exc.value.hint
    forwards.check_ports_free([PublishedPort(80, port)], [])  # free again: fine


def test_a_port_taken_on_every_address_is_taken_on_loopback_too():
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        with pytest.raises(ConflictError, match="in use"):
            forwards.check_ports_free([PublishedPort(1, sock.getsockname()[1])], [])


def test_a_host_port_another_container_publishes_is_refused_even_when_it_is_stopped():
    port = _free_port()
    other = {"name": "coi-other-1", "status": "Stopped",
             "devices": {"web": {"type": "proxy", "listen": f"tcp:0.0.0.0:{port - 1}-{port + 1},443",
                                 "connect": "tcp:127.0.0.1:80"}}}
    with pytest.raises(ConflictError, match=f"host port {port} is published by container coi-other-1") as exc:
        forwards.check_ports_free([PublishedPort(3000, port)], [other])
    assert "coi kill coi-other-1" in exc.value.hint
    forwards.check_ports_free([PublishedPort(3000, port)], [other], own="coi-other-1")
    inside = {"name": "x", "devices": {"sock": {"type": "proxy", "bind": "container", "listen": f"tcp:0.0.0.0:{port}",
                                                "connect": "tcp:127.0.0.1:1"}}}
    forwards.check_ports_free([PublishedPort(3000, port)], [inside])  # listens in its own container


class _Refusing:
    """A socket whose bind fails with ``errno``."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def setsockopt(self, *args):
        pass

    def bind(self, address):
        raise OSError(self.code, os.strerror(self.code))


def test_a_privileged_host_port_is_refused_for_a_user_the_host_refuses_it_to(monkeypatch):
    monkeypatch.setattr(socket, "socket", _Refusing(errno.EACCES))
    with pytest.raises(CoiError, match="host port 80 is below 1024, and only root may listen there") as exc:
        forwards.check_ports_free([PublishedPort(80, 80)], [])
    assert "--port 8080:80" in exc.value.hint and not isinstance(exc.value, UsageError)


def test_an_address_the_host_does_not_have_is_refused():
    with pytest.raises(CoiError, match="192.0.2.77 is not an address of this host"):
        forwards.check_ports_free([PublishedPort(80, _free_port(), "192.0.2.77")], [])


# ---- the agent's socket -------------------------------------------------------------------

def _unix_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


@pytest.fixture
def short() -> Path:
    """A directory with a short path (AF_UNIX paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="coi-fw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_agent_socket_is_the_users_own_socket_and_its_real_path_is_used(short):
    (short / "agent").mkdir(mode=0o700)
    with _unix_socket(short / "agent" / "s"):
        os.symlink(short / "agent" / "s", short / "link")
        assert forwards.agent_socket({"SSH_AUTH_SOCK": str(short / "link")}, exposed=[]) == str(short / "agent" / "s")


@pytest.mark.parametrize("value, message", [
    ("", "SSH_AUTH_SOCK is not set"), ("relative/agent.sock", "is not an absolute path"),
    ("/nonexistent/coi/agent.sock", "no such socket"),
])
def test_no_usable_ssh_auth_sock_names_the_fix(value, message):
    with pytest.raises(CoiError, match=message) as exc:
        forwards.agent_socket({"SSH_AUTH_SOCK": value} if value else {}, exposed=[])
    assert "ssh-agent" in exc.value.hint and "ssh-add" in exc.value.hint


def test_a_file_that_is_not_a_socket_is_refused(short):
    (short / "plain").write_text("")
    with pytest.raises(CoiError, match="is not a socket"):
        forwards.agent_socket({"SSH_AUTH_SOCK": str(short / "plain")}, exposed=[])


def test_a_socket_of_another_user_is_refused(short, monkeypatch):
    with _unix_socket(short / "s"):
        monkeypatch.setattr(os, "geteuid", lambda: os.stat(short / "s").st_uid + 1)
        with pytest.raises(CoiError, match="belongs to uid .*, not to you"):
            forwards.agent_socket({"SSH_AUTH_SOCK": str(short / "s")}, exposed=[])


# ---- a session's container -----------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-test-")
    from coi import network as net

    monkeypatch.setattr(net, "applies_before_start", lambda inst, policy, sessions_dir: True)
    monkeypatch.setattr(net, "apply", lambda client, name, policy, **kw: "nft")
    monkeypatch.setattr(net, "remove", lambda name, **kw: None)
    monkeypatch.setattr(net, "pin_nic", lambda client, instances: None)
    return home


def _place(home: Path, workspace: Path, fake: FakeIncus, *, agent: bool = False, ports=()) -> Place:
    config = default_config(env={"HOME": str(home)})
    config = replace(config, ports=tuple(ports), ssh=replace(config.ssh, forward_agent=agent))
    state = home / ".coi"
    return Place(client=fake, config=config, workspace=workspace, messages=Said(),
                 state_dir=lambda: state.mkdir(mode=0o700, exist_ok=True) or state)


def _request(place: Place, **kw):
    args = dict(slot=0, env=[], mount=[], storage=None, profile_env={}, profile=None)
    args.update(kw)
    return lifecycle.request(place, **args)


@pytest.fixture
def workspace(tmp_path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def test_a_session_container_is_created_with_its_ports_and_the_agent(home, workspace, short, monkeypatch):
    with _unix_socket(short / "s"):
        monkeypatch.setenv("SSH_AUTH_SOCK", str(short / "s"))
        fake = FakeIncus()
        port = _free_port()
        place = _place(home, workspace, fake, agent=True, ports=[PublishedPort(22, port, "127.0.0.1")])
        req = _request(place, port=["3000"], env=["SSH_AUTH_SOCK=/elsewhere"])
        assert req.ssh_agent == str(short / "s") and req.env["SSH_AUTH_SOCK"] == forwards.AGENT_SOCKET
        session = lifecycle.open_session(place, req)
    devices = fake.instance(session.name)["devices"]
    assert devices[f"port-{port}"]["connect"] == "tcp:127.0.0.1:22"
    assert devices["port-3000"]["listen"] == "tcp:127.0.0.1:3000"
    assert devices["ssh-agent"]["connect"] == f"unix:{short / 's'}"
    assert devices["ssh-agent"]["security.uid"] == str(os.getuid())
    assert session.ports == (PublishedPort(22, port), PublishedPort(3000, 3000)) and session.ssh_agent
    assert lifecycle.agent_env(req)["SSH_AUTH_SOCK"] == forwards.AGENT_SOCKET


def test_no_agent_no_device_and_no_variable(home, workspace, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", "/whatever")
    fake = FakeIncus()
    place = _place(home, workspace, fake)
    req = _request(place)
    session = lifecycle.open_session(place, req)
    assert "ssh-agent" not in fake.instance(session.name)["devices"] and "SSH_AUTH_SOCK" not in req.env
    assert session.ports == () and not session.ssh_agent


def test_without_ssh_auth_sock_the_request_is_refused_before_anything_exists(home, workspace, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    fake = FakeIncus()
    with pytest.raises(CoiError, match="SSH_AUTH_SOCK is not set"):
        _request(_place(home, workspace, fake, agent=True))
    assert fake.called("create_instance") == []


def test_an_agent_socket_in_the_workspace_is_refused(home, monkeypatch):
    short_ws = Path(tempfile.mkdtemp(prefix="coi-ws-"))
    try:
        with _unix_socket(short_ws / "agent.sock"):
            monkeypatch.setenv("SSH_AUTH_SOCK", str(short_ws / "agent.sock"))
            with pytest.raises(CoiError, match="which a container can write"):
                _request(_place(home, short_ws, FakeIncus(), agent=True))
    finally:
        shutil.rmtree(short_ws, ignore_errors=True)


def test_a_taken_port_leaves_no_container_behind(home, workspace):
    fake = FakeIncus()
    place = _place(home, workspace, fake)
    with _listening() as taken:
        req = _request(place, port=[f"{taken.getsockname()[1]}:80"])
        with pytest.raises(ConflictError, match="in use on this host"):
            lifecycle.open_session(place, req)
    assert fake.called("create_instance") == [] and fake.instances() == []


def test_a_reused_container_keeps_its_ports_adds_new_ones_and_follows_the_agent(home, workspace, short, monkeypatch):
    fake = FakeIncus()
    first_port = _free_port()
    new_port = _free_port(first_port)
    with _unix_socket(short / "s"):
        monkeypatch.setenv("SSH_AUTH_SOCK", str(short / "s"))
        place = _place(home, workspace, fake, agent=True)
        first = lifecycle.open_session(place, _request(place, persistent=True, port=[f"{first_port}:3000"]))
        fake.instance(first.name)["status"] = "Running"
        with _listening() as held:  # its own port, held by its running proxy: not a clash
            held_port = held.getsockname()[1]
            fake.instance(first.name)["devices"][f"port-{held_port}"] = forwards.port_device(
                PublishedPort(9, held_port))
            again = lifecycle.open_session(_place(home, workspace, fake),
                                           _request(_place(home, workspace, fake), persistent=True,
                                                    port=[f"{first_port}:3000", f"{new_port}:5173"]))
    assert (again.name, again.created) == (first.name, False)
    devices = fake.instance(first.name)["devices"]
    assert devices[f"port-{new_port}"]["connect"] == "tcp:127.0.0.1:5173"
    assert devices[f"port-{first_port}"]["connect"] == "tcp:127.0.0.1:3000"
    assert "ssh-agent" not in devices and not again.ssh_agent  # not asked for this time: taken away
    assert {p.host for p in again.ports} == {first_port, new_port, held_port}


def test_a_reused_container_refuses_its_host_port_to_another_container_port(home, workspace):
    fake = FakeIncus()
    port = _free_port()
    place = _place(home, workspace, fake)
    first = lifecycle.open_session(place, _request(place, persistent=True, port=[f"{port}:3000"]))
    with pytest.raises(ConflictError, match=f"{first.name} publishes host port 127.0.0.1:{port} to its port 3000"):
        lifecycle.open_session(place, _request(place, persistent=True, port=[f"{port}:4000"]))
    assert fake.instance(first.name)["devices"][f"port-{port}"]["connect"] == "tcp:127.0.0.1:3000"


def test_a_stopped_reused_container_whose_port_was_taken_meanwhile_is_refused(home, workspace):
    fake = FakeIncus()
    place = _place(home, workspace, fake)
    port = _free_port()
    first = lifecycle.open_session(place, _request(place, persistent=True, port=[str(port)]))
    assert fake.instance(first.name)["status"] == "Stopped"
    with socket.socket() as squatter:  # another program took the port while the container was stopped
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(ConflictError, match=f"host port 127.0.0.1:{port} is in use"):
            lifecycle.open_session(place, _request(place, persistent=True))
        fake.instance(first.name)["status"] = "Running"  # running: the port is held by its own proxy
        assert lifecycle.open_session(place, _request(place, persistent=True)).ports == (PublishedPort(port, port),)


def test_another_containers_port_is_refused_before_the_container_is_made(home, workspace, tmp_path):
    fake = FakeIncus()
    port = _free_port()
    other_ws = tmp_path / "other"
    other_ws.mkdir()
    other = _place(home, other_ws, fake)
    theirs = lifecycle.open_session(other, _request(other, persistent=True, port=[str(port)]))
    place = _place(home, workspace, fake)
    with pytest.raises(ConflictError, match=f"published by container {theirs.name}"):
        lifecycle.open_session(place, _request(place, port=[f"{port}:80"]))
    assert len(fake.called("create_instance")) == 1


# ---- coi list, coi shell -------------------------------------------------------------------

def test_coi_list_shows_the_ports_and_the_agent_in_text_and_json(capsys):
    from coi.cli.render import render_sessions
    from coi.cli.ui import UI

    inst = {"name": "coi-test-1", "status": "Running", "config": {f"{spec.KEY}workspace": "/w"},
            "devices": {"port-8080": forwards.port_device(PublishedPort(3000, 8080)),
                        "ssh-agent": forwards.agent_device("/s", code_uid=1000, host_uid=1, host_gid=1)}}
    info = spec.to_info(inst)
    render_sessions(UI(), [info], [], format="json", include_saved=False)
    shown = json.loads(capsys.readouterr().out)["active_containers"][0]
    assert shown["ports"] == [{"host_address": "127.0.0.1", "host_port": 8080, "container_port": 3000}]
    assert shown["ssh_agent"] is True
    render_sessions(UI(), [info], [], format="text", include_saved=False)
    text = capsys.readouterr().out
    assert "    Ports: 127.0.0.1:8080 -> 3000\n" in text and "    SSH agent: forwarded\n" in text
    plain = spec.to_info({"name": "coi-test-2", "status": "Stopped", "config": {}, "devices": {}})
    assert plain.to_json()["ports"] == [] and plain.to_json()["ssh_agent"] is False


def test_the_flags_reach_the_config_and_the_handlers():
    from coi.cli.context import Context
    from coi.cli.main import _parse
    from coi.cli.parser import build_parser, normalise

    for command in (["shell"], ["run", "--", "true"]):
        ns = _parse(build_parser(), [command[0], "--port", "3000", "--port", "8080:80", "--ssh-agent",
                                     *command[1:]], normalise)
        kwargs = dict(vars(ns))
        ctx = Context.from_namespace(kwargs)
        assert kwargs["port"] == ["3000", "8080:80"]
        assert ctx.flag_values["ssh.forward_agent"] == ("--ssh-agent", True)
    kwargs = dict(vars(_parse(build_parser(), ["shell", "--no-ssh-agent"], normalise)))
    assert Context.from_namespace(kwargs).flag_values["ssh.forward_agent"] == ("--ssh-agent", False)
    kwargs = dict(vars(_parse(build_parser(), ["shell"], normalise)))
    assert "ssh.forward_agent" not in Context.from_namespace(kwargs).flag_values


def test_completion_offers_the_flags():
    from coi.cli.completion import command_table
    from coi.cli.parser import build_parser

    table = command_table(build_parser())
    for command in ("shell", "run"):
        assert {"--port", "--ssh-agent", "--no-ssh-agent"} <= set(table[command]["flags"].split())
