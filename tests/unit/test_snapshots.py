"""coi snapshot create|list|restore|delete against the shared FakeIncus: the container
chosen, names checked before Incus is asked, the JSON shape, and a restore's order (stopped,
restored, started with its rules, the agent again). The network rules are stubbed out."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from coi.cli.main import main
from coi.config import default_config
from coi.errors import CoiError, UsageError
from coi.sessions import lifecycle, snapshots, spec
from coi.sessions.lifecycle import Place
from fake_incus import DEFAULT, FakeIncus, FakeDaemon, async_op, operation, sync
from session_doubles import Said

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-test-")
    for var in ("XDG_CONFIG_HOME", "COI_SESSIONS_DIR", "COI_NETWORK_MODE", "COI_TOOL", "COI_TOOL_BINARY"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


@pytest.fixture
def network(monkeypatch):
    """The network service, stubbed: (what, container, mode) of each call."""
    from coi import network as net

    calls: list[tuple[str, str, str]] = []
    monkeypatch.setattr(net, "applies_before_start", lambda inst, policy, sessions_dir: True)
    monkeypatch.setattr(net, "apply", lambda client, name, policy, **kw:
                        calls.append(("apply", name, policy.mode + (" by name" if policy.proxy else ""))) or "nft")
    monkeypatch.setattr(net, "remove", lambda name, **kw: calls.append(("remove", name, "")))
    monkeypatch.setattr(net, "pin_nic", lambda client, instances: None)
    monkeypatch.setattr(net, "proxy_ready", lambda client, name, **kw: calls.append(("proxy_ready", name, "")))
    monkeypatch.setattr(net, "launch_proxy", lambda client, sessions_dir: None)
    monkeypatch.setattr(net, "proxy_environment", lambda client: {"HTTPS_PROXY": "http://10.0.0.1:3128"})
    return calls


@pytest.fixture
def fake(monkeypatch) -> FakeIncus:
    """The Incus every coi command of the test talks to."""
    from coi.incus import Incus

    made = FakeIncus()
    monkeypatch.setattr(Incus, "from_environment", classmethod(lambda cls, project="default": made))
    return made


def place_for(home: Path, workspace: Path, fake: FakeIncus, **config_changes) -> Place:
    config = default_config(env={"HOME": str(home)})
    if config_changes:
        config = replace(config, **config_changes)
    state = home / ".coi"
    return Place(client=fake, config=config, workspace=workspace, messages=Said(),
                 state_dir=lambda: state.mkdir(mode=0o700, exist_ok=True) or state)


def session(home: Path, workspace: Path, fake: FakeIncus, *, persistent: bool = False, slot: int = 0) -> str:
    """A running session container of ``workspace`` (the agent in tmux), made by coi's own start."""
    place = place_for(home, workspace, fake)
    req = lifecycle.request(place, slot=slot, env=[], mount=[], storage=None, profile_env={}, profile=None,
                            persistent=persistent)
    made = lifecycle.open_session(place, req)
    lifecycle.start(place, made, req, None, debug=False, tmux_session=True)
    return made.name


def coi(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot_calls(fake: FakeIncus) -> list[str]:
    return [c[0] for c in fake.calls if "snapshot" in c[0]]


# ---- names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "before-refactor", "snap-20261202-101403", "v1.2_rc", "X" * 63])
def test_plain_names_are_taken(name):
    assert snapshots.check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "../x", "..", "a..b", "-f", "--force", ".hidden", "a b", "x*",
                                  "a\\b", "X" * 64, "tab\there", "new\nline", "é", "a:b", "$(id)"])
def test_other_names_are_refused(name):
    with pytest.raises(UsageError, match="is not allowed"):
        snapshots.check_name(name)


def test_a_generated_name_is_a_utc_timestamp():
    assert snapshots.generated_name(0) == "snap-19700101-000000"
    assert snapshots.check_name(snapshots.generated_name())


@pytest.mark.parametrize("args", [["create", "a/b"], ["create", "--", "-x"], ["restore", "..", "--force"],
                                  ["delete", "../../etc"], ["create", "--", "--force"]])
def test_a_bad_name_is_refused_before_incus_is_asked(home, workspace, fake, capsys, args):
    code, _, err = coi(capsys, "snapshot", *args)
    assert code == 2 and "is not allowed" in err and "Traceback" not in err
    assert fake.calls == []


# ---- which container -------------------------------------------------------------------------

def test_no_session_is_a_clear_error(home, workspace, fake, network, capsys):
    code, _, err = coi(capsys, "snapshot", "list")
    assert code == 1 and f"no session container for {workspace}" in err and "--container" in err


def test_two_sessions_ask_for_container(home, workspace, fake, network, capsys):
    first = session(home, workspace, fake)
    second = session(home, workspace, fake)
    code, _, err = coi(capsys, "snapshot", "create")
    assert code == 2 and first in err and second in err and "--container NAME" in err
    assert snapshot_calls(fake) == []
    code, out, _ = coi(capsys, "snapshot", "create", "one", "--container", second)
    assert code == 0 and f"'{second}'" in out and list(fake.snapshots_of[second]) == ["one"]


def test_sessions_of_other_workspaces_are_not_taken(home, workspace, fake, network, capsys, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    name = session(home, other, fake)
    assert coi(capsys, "snapshot", "list")[0] == 1
    code, out, _ = coi(capsys, "snapshot", "list", "-w", str(other))
    assert code == 0 and out.startswith(f"Snapshots for {name}:")


def test_container_must_be_one_of_cois(home, workspace, fake, network, capsys):
    session(home, workspace, fake)
    fake.create_instance("coi-test-not-ours", start=True)  # coi's prefix, but no user.coi.* mark
    fake.create_instance("someone-else", start=True)
    for name, message in (("coi-test-not-ours", "is not a coi container"), ("someone-else", "is not a coi container"),
                          ("coi-test-nope-1", "not found")):
        for args in (["create", "x"], ["list"], ["restore", "x", "--force"], ["delete", "x"]):
            code, _, err = coi(capsys, "snapshot", *args, "--container", name)
            assert code == 1 and message in err, (args, name, err)
    assert snapshot_calls(fake) == [] and not fake.snapshots_of


# ---- create, list, delete ---------------------------------------------------------------------

def test_create_names_what_the_snapshot_does_not_hold(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake)
    code, out, err = coi(capsys, "snapshot", "create")
    assert code == 0
    made = next(iter(fake.snapshots_of[name]))
    assert made.startswith("snap-") and out == f"Created snapshot '{made}' for container '{name}'\n"
    assert f"Not in the snapshot (host directories, mounted into the container): /workspace ({workspace})" in err
    assert f"{name} is ephemeral" in err and f"coi persist {name}" in err
    assert fake.called("create_snapshot")[0].kwargs == {"stateful": False}


def test_an_existing_name_is_a_clear_error_and_a_generated_one_moves_aside(home, workspace, fake, network,
                                                                          capsys, monkeypatch):
    name = session(home, workspace, fake, persistent=True)
    assert coi(capsys, "snapshot", "create", "base")[0] == 0
    code, _, err = coi(capsys, "snapshot", "create", "base")
    assert code == 1 and "snapshot 'base' of" in err and "already exists" in err and "coi snapshot delete base" in err
    monkeypatch.setattr(snapshots, "generated_name", lambda now=None: "snap-20261202-101403")
    for _ in range(3):
        assert coi(capsys, "snapshot", "create")[0] == 0
    assert list(fake.snapshots_of[name]) == ["base", "snap-20261202-101403", "snap-20261202-101403-2",
                                             "snap-20261202-101403-3"]


def test_list_as_text_and_json(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake)
    code, out, _ = coi(capsys, "snapshot", "list")
    assert (code, out) == (0, f"Snapshots for {name}:\n  (none)\nTotal: 0 snapshots\n")
    coi(capsys, "snapshot", "create", "one")
    coi(capsys, "snapshot", "create", "two")
    code, out, _ = coi(capsys, "snapshot", "list", "--format", "json")
    assert code == 0 and json.loads(out) == {"container": name, "snapshots": [
        {"name": "one", "created_at": "2026-01-01T00:00:00Z", "stateful": False},
        {"name": "two", "created_at": "2026-01-01T00:00:01Z", "stateful": False}]}
    out = coi(capsys, "snapshot", "list")[1].splitlines()
    assert out[0] == f"Snapshots for {name}:" and out[1].split() == ["NAME", "CREATED", "STATEFUL"]
    assert out[2].split() == ["one", "2026-01-01", "00:00:00", "UTC", "no"] and out[-1] == "Total: 2 snapshots"
    with pytest.raises(SystemExit) as exc:
        main(["snapshot", "list", "--format", "yaml"])
    assert exc.value.code == 2


def test_delete(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    code, out, _ = coi(capsys, "snapshot", "delete", "one")
    assert (code, out) == (0, f"Deleted snapshot 'one' of container '{name}'\n") and fake.snapshots_of[name] == {}
    code, _, err = coi(capsys, "snapshot", "delete", "one")
    assert code == 1 and "snapshot 'one' of" in err and "not found" in err and "coi snapshot list" in err


def test_missing_action_and_name_are_usage_errors(home, workspace, fake, capsys):
    assert coi(capsys, "snapshot")[0] == 2
    with pytest.raises(SystemExit) as exc:
        main(["snapshot", "restore"])
    assert exc.value.code == 2


# ---- restore ----------------------------------------------------------------------------------

@pytest.fixture
def terminal(monkeypatch):
    """A person at a terminal, answering the question with ``answers`` in turn."""
    answers: list[str] = []
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt="": answers.pop(0))
    return answers


def test_restore_asks_and_without_a_terminal_refuses(home, workspace, fake, network, capsys, monkeypatch):
    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    fake.calls.clear()
    code, _, err = coi(capsys, "snapshot", "restore", "one")
    assert code == 2 and "refusing to ask without a terminal" in err and "--force" in err
    assert not fake.called("stop") and not fake.called("restore_snapshot")
    assert fake.instance(name)["status"] == "Running"


def test_restore_answered_no_changes_nothing(home, workspace, fake, network, capsys, terminal):
    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    fake.calls.clear()
    terminal.append("n")
    code, _, err = coi(capsys, "snapshot", "restore", "one")
    assert code == 1 and "cancelled" in err
    assert not fake.called("stop") and not fake.called("restore_snapshot")


def test_an_unknown_snapshot_is_refused_before_the_container_is_stopped(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake)
    code, _, err = coi(capsys, "snapshot", "restore", "nope", "--force")
    assert code == 1 and "snapshot 'nope' of" in err and "not found" in err
    assert fake.instance(name)["status"] == "Running" and not fake.called("stop")


def test_restore_of_a_running_session_stops_restores_and_starts_it_with_rules_and_agent(
        home, workspace, fake, network, capsys, terminal):
    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    fake.files_of(name).file("/home/code/after-the-snapshot", b"x")
    coi(capsys, "persist", name)  # since the snapshot: kept by the restore
    fake.calls.clear()
    network.clear()
    terminal.append("y")
    code, out, err = coi(capsys, "snapshot", "restore", "one")
    assert code == 0, err
    assert out == f"Restored container '{name}' from snapshot 'one'\n"
    order = [c[0] for c in fake.calls if c[0] in ("stop", "restore_snapshot", "start", "update_instance")]
    assert order == ["stop", "restore_snapshot", "update_instance", "start"]
    assert fake.called("stop")[0].kwargs["force"] is True
    assert network == [("apply", name, "restricted")]  # the rules went on before the start
    assert "/home/code/after-the-snapshot" not in fake.files_of(name).nodes
    assert fake.instance(name)["config"][f"{spec.KEY}persistent"] == "true"
    assert fake.instance(name)["status"] == "Running"
    tmux = [c[2] for c in fake.called("exec") if "new-session" in c[2]]
    assert len(tmux) == 1 and "--continue" in tmux[0][-1] and "--session-id" in tmux[0][-1]
    assert fake.called("push_file")  # fresh credentials
    assert f"Stopping {name} to restore it..." in err and "started again, with its network rules (restricted)" in err
    assert f"The agent was started again in tmux" in err and f"coi attach {name}" in err
    assert f"Not changed (host directories, not in the snapshot): /workspace ({workspace})" in err


def test_restore_of_a_stopped_container_leaves_it_stopped(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake, persistent=True)
    coi(capsys, "snapshot", "create", "one")
    fake.stop(name)
    fake.calls.clear()
    network.clear()
    code, _, err = coi(capsys, "snapshot", "restore", "one", "--force")
    assert code == 0 and f"{name} was stopped and stays stopped" in err
    assert [c[0] for c in fake.calls if c[0] in ("stop", "start", "restore_snapshot")] == ["restore_snapshot"]
    assert network == [] and fake.instance(name)["status"] == "Stopped"


def test_a_restore_keeps_the_network_mode_the_session_ran_with(home, workspace, fake, network, capsys):
    from coi.network import Store

    (home / ".config" / "coi").mkdir(parents=True)
    (home / ".config" / "coi" / "config.toml").write_text('[network]\nallowed_domains = ["pypi.org"]\n')
    name = session(home, workspace, fake)  # in the config's mode (restricted), then as if by --network allowlist:
    coi(capsys, "snapshot", "create", "one")
    Store(home / ".coi").save_record(name, {"container": name, "mode": "allowlist",
                                            "policy": {"mode": "allowlist", "proxy": True}})
    network.clear()
    code, _, err = coi(capsys, "snapshot", "restore", "one", "--force")
    assert code == 0, err
    assert network[0] == ("apply", name, "allowlist by name") and ("proxy_ready", name, "") in network


def test_no_agent_is_started_where_none_ran(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    fake.on("exec", lambda n, command, **kw: _exit(1) if "has-session" in command else DEFAULT)
    fake.calls.clear()
    code, _, err = coi(capsys, "snapshot", "restore", "one", "--force")
    assert code == 0 and f"coi attach {name} --bash" in err
    assert not [c for c in fake.called("exec") if "new-session" in c[2]]


def _exit(code: int):
    from coi.incus import ExecResult

    return ExecResult(code, "", "")


def test_a_start_that_fails_after_the_restore_leaves_it_stopped_without_rules(home, workspace, fake, network,
                                                                             capsys, monkeypatch):
    from coi import network as net

    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    network.clear()

    def refuse(client, container, policy, **kw):
        raise CoiError("nft refused")
    monkeypatch.setattr(net, "apply", refuse)
    code, _, err = coi(capsys, "snapshot", "restore", "one", "--force")
    assert code == 1 and f"{name} was restored to one but did not start again: nft refused" in err
    assert fake.instance(name)["status"] == "Stopped" and ("remove", name, "") in network


def test_a_running_incus_ephemeral_container_is_not_restored(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    fake.instance(name)["ephemeral"] = True
    fake.calls.clear()
    code, _, err = coi(capsys, "snapshot", "restore", "one", "--force")
    assert code == 1 and "Incus deletes it when it stops" in err and not fake.called("stop")


def test_an_attached_session_does_not_end_while_its_container_is_restored(home, workspace, fake, network):
    name = session(home, workspace, fake)
    place = place_for(home, workspace, fake)
    fake.stop(name)
    with snapshots.restoring(place.sessions_dir, name):
        assert snapshots.being_restored(place.sessions_dir, name)
        with pytest.raises(CoiError, match="being restored already"):
            with snapshots.restoring(place.sessions_dir, name):
                pass
        lifecycle.after_attach(place, name, 1)  # the attached coi shell saw its container stop
    assert fake.exists(name) and not snapshots.being_restored(place.sessions_dir, name)
    assert any("is being restored from a snapshot" in text for _, text in place.messages.lines)
    lifecycle.after_attach(place, name, 1)  # a stop that is no restore: the session ends
    assert not fake.exists(name)


@pytest.mark.parametrize("tool, continues", [("claude", True), ("aider", False), ("codex", False)])
def test_the_agent_again_continues_where_the_tool_can(tool, continues):
    from coi.tools import get_tool

    argv = snapshots.agent_again(get_tool(tool), binary="", session_id="0b6c5f0e-0000-4000-8000-000000000000")
    assert argv[:3] == ["bash", "-l", "-c"] and argv[3].endswith("exec bash -l")
    assert ("--continue" in argv[3]) is continues
    if continues:
        assert argv[3].startswith("set -- /home/code/.claude/projects/-workspace/*.jsonl; if [ -e \"$1\" ]; then ")
        assert "else claude --session-id 0b6c5f0e-0000-4000-8000-000000000000; fi" in argv[3]


# ---- completion ----------------------------------------------------------------------------

def test_completion_offers_snapshot_names_and_containers_for_container():
    from coi.cli.completion import bash, command_table, fish
    from coi.cli.parser import build_parser

    table = command_table(build_parser())
    assert table["snapshot"]["subs"] == "create delete list restore"
    assert {table[f"snapshot {a}"]["dynamic"] for a in ("restore", "delete")} == {"snapshots"}
    assert table["snapshot create"]["dynamic"] == "" and "--container" in table["snapshot list"]["flags"]
    assert '["--container"]="containers"' in bash(build_parser())  # the live flag values
    assert "-l container -x -a '(coi __complete containers 2>/dev/null)'" in fish(build_parser())


def test_complete_snapshots_lists_the_workspace_containers_or_nothing(home, workspace, fake, network, capsys):
    assert coi(capsys, "__complete", "snapshots") == (0, "", "")
    session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")
    assert coi(capsys, "__complete", "snapshots")[1] == "one\n"


# ---- the REST calls ----------------------------------------------------------------------------

def test_the_client_speaks_incus_snapshot_api(tmp_path):
    from coi.incus import Incus
    from fake_incus import socket_in

    with FakeDaemon(socket_in(tmp_path)) as daemon:
        base = "/1.0/instances/c%201"
        daemon.on("GET", f"{base}/snapshots", sync([{"name": "s1", "created_at": "2026-12-02T10:14:03Z",
                                                     "stateful": False}]))
        for method, path in (("POST", f"{base}/snapshots"), ("DELETE", f"{base}/snapshots/a%2Fb"), ("PUT", base)):
            daemon.on(method, path, async_op("op1"))
        daemon.on("GET", "/1.0/operations/op1/wait", operation("op1"))
        client = Incus(daemon.path)
        try:
            assert client.snapshots("c 1")[0]["name"] == "s1"
            client.create_snapshot("c 1", "s2")
            client.delete_snapshot("c 1", "a/b")
            client.restore_snapshot("c 1", "s1")
        finally:
            client.close()
        assert daemon.requests_to("GET", f"{base}/snapshots")[0].query == {"recursion": "1"}
        assert daemon.requests_to("POST", f"{base}/snapshots")[0].json() == {"name": "s2", "stateful": False}
        assert daemon.requests_to("PUT", base)[0].json() == {"restore": "s1"}
        assert len(daemon.requests_to("DELETE", f"{base}/snapshots/a%2Fb")) == 1
        assert len(daemon.requests_to("GET", "/1.0/operations/op1/wait")) == 3  # every change awaited


@pytest.mark.parametrize("created_at, shown", [
    ("2026-12-02T10:14:03.123456789Z", "2026-12-02 10:14:03 UTC"),
    ("2026-12-02T12:14:03+02:00", "2026-12-02 10:14:03 UTC"),
    ("not a time\x1b[2J", "not a time\\x1b[2J"),
])
def test_created_times_are_shown_in_utc(created_at, shown):
    from coi.cli.commands.snapshots import _when

    assert _when(created_at) == shown


def test_an_agent_that_does_not_start_again_only_warns(home, workspace, fake, network, capsys):
    name = session(home, workspace, fake)
    coi(capsys, "snapshot", "create", "one")

    def no_tmux(n, command, **kw):
        if "new-session" in command:
            raise CoiError("tmux is gone")
        return DEFAULT
    fake.on("exec", no_tmux)
    code, _, err = coi(capsys, "snapshot", "restore", "one", "--force")
    assert code == 0 and "Warning: the agent did not start again" in err and f"coi attach {name} --bash" in err
    assert "none ran in tmux before" not in err and fake.instance(name)["status"] == "Running"


def test_a_force_stopped_container_whose_power_state_lags_is_restored_as_stopped(home, workspace, fake, network,
                                                                                 capsys):
    name = session(home, workspace, fake, persistent=True)
    coi(capsys, "snapshot", "create", "one")
    fake.stop(name)
    fake.update_instance(name, config={"volatile.last_state.power": "RUNNING"})  # what a forced stop can leave
    fake.calls.clear()
    code, _, err = coi(capsys, "snapshot", "restore", "one", "--force")
    assert code == 0 and f"{name} was stopped and stays stopped" in err, err
    assert not fake.called("exec")  # nothing is asked of a container Incus calls Stopped
