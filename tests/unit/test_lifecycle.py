"""A session's start and end (coi.sessions.lifecycle and manage) against the shared
FakeIncus: what is asked of Incus, in which order, and what is refused before anything
exists. The network rules are stubbed out; they have tests of their own."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from coi.config import default_config
from coi.errors import CoiError, NotFoundError, UsageError
from coi.sessions import lifecycle, manage, spec
from coi.sessions.lifecycle import Place
from fake_incus import DEFAULT, FakeIncus

pytestmark = pytest.mark.unit


class Said:
    """The messages a service gave."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def detail(self, text: str) -> None:
        self.lines.append(("detail", text))

    def warn(self, text: str) -> None:
        self.lines.append(("warn", text))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-test-")
    return home


@pytest.fixture
def network(monkeypatch):
    """The network service, stubbed: which containers got rules, which lost them."""
    from coi import network as net

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(net, "applies_before_start", lambda inst, policy, sessions_dir: True)
    monkeypatch.setattr(net, "apply", lambda client, name, policy, **kw: calls.append(("apply", name)) or "nft")
    monkeypatch.setattr(net, "remove", lambda name, **kw: calls.append(("remove", name)))
    monkeypatch.setattr(net, "pin_nic", lambda client, instances: None)
    monkeypatch.setattr(net, "proxy_ready", lambda client, name, **kw: calls.append(("proxy_ready", name)))
    return calls


def place_for(home: Path, workspace: Path, fake: FakeIncus, **config_changes) -> Place:
    config = default_config(env={"HOME": str(home)})
    if config_changes:
        config = replace(config, **config_changes)
    state = home / ".coi"
    return Place(client=fake, config=config, workspace=workspace, messages=Said(),
                 state_dir=lambda: state.mkdir(mode=0o700, exist_ok=True) or state)


@pytest.fixture
def workspace(tmp_path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def request(place: Place, **kw):
    args = dict(slot=0, env=[], mount=[], storage=None, profile_env={}, profile=None)
    args.update(kw)
    return lifecycle.request(place, **args)


def test_a_request_takes_only_named_variables(home, workspace, monkeypatch):
    monkeypatch.setenv("PASSED", "p")
    monkeypatch.setenv("SECRET", "s")
    cfg = default_config(env={"HOME": str(home)})
    place = place_for(home, workspace, FakeIncus(), tool=replace(cfg.tool, env_passthrough=("PASSED",)))
    req = request(place, env=["A=1", "PASSED=given"], profile_env={"B": "2"})
    assert req.env == {"PASSED": "given", "B": "2", "A": "1"}  # the command line wins
    assert req.workspace == workspace and req.base_config["boot.autostart"] == "false"
    assert lifecycle.agent_env(req)["A"] == "1" and "SECRET" not in lifecycle.agent_env(req)


@pytest.mark.parametrize("kw, message", [
    ({"env": ["NOPE"]}, "not KEY=VALUE"),
    ({"mount": ["/x:/workspace"]}, "is /workspace"),
    ({"mount": ["nothing"]}, "HOST:CONTAINER"),
])
def test_bad_requests_are_refused_before_anything_exists(home, workspace, kw, message):
    fake = FakeIncus()
    with pytest.raises(UsageError, match=message):
        request(place_for(home, workspace, fake), **kw)
    assert fake.calls == [] and not (home / ".coi").exists()


def test_a_state_dir_inside_a_mount_is_refused_before_it_is_made(home, workspace, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    cfg = default_config(env={"HOME": str(home)})
    place = place_for(home, workspace, FakeIncus(), paths=replace(cfg.paths, sessions_dir=shared / "state"))
    with pytest.raises(CoiError, match="inside or around"):
        request(place, mount=[f"{shared}:/shared"])
    assert not (shared / "state").exists() and not (home / ".coi").exists()


def test_storage_alone_is_the_workspaces_own_directory(home, workspace):
    req = request(place_for(home, workspace, FakeIncus()), storage="")
    assert req.storage.parent == home / ".coi" / "storage" and len(req.storage.name) == 8


def test_a_session_starts_with_files_in_before_the_rules_and_the_start(home, workspace, network):
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    req = request(place)
    session = lifecycle.open_session(place, req)
    assert session.created and session.slot == 1 and fake.instance(session.name)["status"] == "Stopped"
    lifecycle.start(place, session, req, None, debug=False, tmux_session=True)
    order = [c[0] for c in fake.calls if c[0] in ("push_file", "start", "exec")]
    assert order.index("push_file") < order.index("start")  # credentials written into the stopped container
    assert network == [("apply", session.name)]
    tmux = [c[2] for c in fake.called("exec") if "new-session" in c[2]]
    assert tmux and "--session-id" in tmux[0][-1] and tmux[0][:3] == ["setpriv", "--reuid=1000", "--regid=1000"]
    settings = json.loads(fake.files_of(session.name).nodes[f"{spec.CODE_HOME}/.claude/settings.json"].content)
    assert settings["permissions"]["defaultMode"] == "bypassPermissions"


def test_a_start_that_fails_removes_what_it_made(home, workspace, network):
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    req = request(place)
    session = lifecycle.open_session(place, req)

    def broken(name, command, **kw):
        if "new-session" in command:
            raise CoiError("the agent does not start")
        return DEFAULT
    fake.on("exec", broken)
    with pytest.raises(CoiError):
        lifecycle.start(place, session, req, None, debug=False, tmux_session=True)
    assert not fake.exists(session.name) and ("remove", session.name) in network


def test_the_end_saves_then_deletes_an_ephemeral_container(home, workspace, network):
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    req = request(place)
    session = lifecycle.open_session(place, req)
    fake.files_of(session.name).file(f"{spec.CODE_HOME}/.claude/projects/p/t.jsonl", b"{}")
    fake.files_of(session.name).file(f"{spec.CODE_HOME}/.claude/.credentials.json", b"secret")
    lifecycle.end(place, session.name)
    saved = home / ".coi" / "sessions-claude" / session.session_id
    assert (saved / "state" / "projects" / "p" / "t.jsonl").exists()
    assert not (saved / "state" / ".credentials.json").exists()
    assert not fake.exists(session.name) and network[-1] == ("remove", session.name)


def test_a_persistent_container_is_kept_and_reused(home, workspace, network):
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    req = request(place, persistent=True)
    first = lifecycle.open_session(place, req)
    lifecycle.end(place, first.name)
    assert fake.exists(first.name)
    again = lifecycle.open_session(place, req)
    assert (again.name, again.session_id, again.created) == (first.name, first.session_id, False)


def test_a_missing_image_names_the_build(home, workspace, network):
    fake = FakeIncus()
    from coi.errors import ImageNotFoundError

    def no_image(name, **kw):
        raise ImageNotFoundError("Failed creating instance from image: Image not provided")
    fake.on("create_instance", no_image)
    with pytest.raises(NotFoundError, match="image coi not found") as exc:
        lifecycle.open_session(place_for(home, workspace, fake), request(place_for(home, workspace, fake)))
    assert "coi build" in exc.value.hint


def test_a_session_by_name_starts_the_proxy_before_its_container_and_ends_it_when_that_fails(
        home, workspace, network, monkeypatch):
    from coi import network as net
    from coi.errors import OperationFailedError

    fake = FakeIncus()
    monkeypatch.setattr(net, "launch_proxy",
                        lambda client, sessions_dir: network.append(("launch_proxy", len(fake.called("create_instance")))))
    monkeypatch.setattr(net, "proxy_unneeded", lambda sessions_dir: network.append(("proxy_unneeded", "")))
    cfg = default_config(env={"HOME": str(home)})
    place = place_for(home, workspace, fake, network=replace(cfg.network, mode="allowlist", allowlist_by="name",
                                                             allowed_domains=("pypi.org",)))
    lifecycle.open_session(place, request(place))
    assert network == [("launch_proxy", 0)]  # before the container was asked for
    network.clear()

    def refused(name, **kw):
        raise OperationFailedError("no room")
    fake.on("create_instance", refused)
    with pytest.raises(CoiError):
        lifecycle.open_session(place, request(place))
    assert network == [("launch_proxy", 1), ("proxy_unneeded", "")]  # (the first session's create)


def test_kill_acts_only_on_coi_containers(home, workspace, network):
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    session = lifecycle.open_session(place, request(place))
    fake.create_instance("mine", start=True)
    found, problems = manage.named(place, [session.name, "mine", "nope"])
    assert [i["name"] for i in found] == [session.name]
    assert problems == ["mine is not a coi container", "container nope not found"]
    manage.kill(place, found[0])
    assert not fake.exists(session.name) and fake.exists("mine")


def test_clean_plans_stopped_ephemeral_containers_only(home, workspace, network, monkeypatch):
    from coi import network as net

    monkeypatch.setattr(net, "clean_orphans", lambda existing, **kw: ["coi-test-gone-1"])
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    ephemeral = lifecycle.open_session(place, request(place))
    kept = lifecycle.open_session(place, request(place, persistent=True, slot=2))
    plan = manage.plan_clean(place, saved_sessions=False)
    assert [i["name"] for i in plan.stopped] == [ephemeral.name] and plan.rules_removed == ["coi-test-gone-1"]
    assert kept.name not in [i["name"] for i in plan.stopped]
    assert os.path.isdir(home / ".coi")


def test_a_missing_command_is_exit_code_127_not_an_error(home, workspace, network):
    """Incus answers a command that exits 127 with "Command not found"; coi gives back 127."""
    from coi.errors import CommandNotFoundError

    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    session = lifecycle.open_session(place, request(place))

    def missing(name, command, **kw):
        if "no-such-cmd" in command:
            raise CommandNotFoundError("exec in container: Command not found")
        return DEFAULT
    fake.on("exec", missing)
    result = manage.exec_in(place, session.name, ["no-such-cmd"], user=None, group=None, env={}, cwd="/",
                            capture=True)
    assert result.exit_code == 127 and "command not found" in result.stderr


# ---- branch sessions ---------------------------------------------------------------------

@pytest.fixture
def repo(workspace):
    import subprocess

    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    (workspace / "f").write_text("x\n")
    for args in (["init", "-q"], ["add", "f"], ["commit", "-qm", "one"]):
        subprocess.run(["git", *args], cwd=workspace, env=env, check=True)
    return workspace


def test_a_branch_session_gets_its_copy_and_a_persistent_one_is_reused_only_on_its_branch(home, repo, network):
    fake = FakeIncus()
    place = place_for(home, repo, fake)
    req = request(place, persistent=True, branch="alpha")
    assert req.branch.name == "alpha" and req.branch_new
    first = lifecycle.open_session(place, req)
    devices = fake.instance(first.name)["devices"]
    assert devices["workspace"]["source"] == str(req.branch.copy) and (req.branch.copy / "f").exists()
    assert ("info", "Branch: coi/alpha (from " + req.branch.base[:12] + ")") in place.messages.lines
    # The same branch again: the persistent container is reused, the copy is not new.
    again_req = request(place, persistent=True, branch="alpha")
    assert not again_req.branch_new
    assert lifecycle.open_session(place, again_req).name == first.name
    # Another branch, or none: a container of its own.
    assert lifecycle.open_session(place, request(place, persistent=True, branch="beta")).name != first.name
    assert lifecycle.open_session(place, request(place, persistent=True)).name != first.name


def test_a_copy_in_use_is_refused_and_a_failed_start_removes_a_new_copy(home, repo, network):
    from coi.errors import ConflictError, ImageNotFoundError

    fake = FakeIncus()
    place = place_for(home, repo, fake)
    lifecycle.open_session(place, request(place, branch="busy"))
    with pytest.raises(ConflictError, match="in use by container"):
        request(place, branch="busy")
    fake.on("create_instance", lambda name, **kw: (_ for _ in ()).throw(ImageNotFoundError("no image")))
    req = request(place, branch="doomed")
    with pytest.raises(NotFoundError, match="image coi not found"):
        lifecycle.open_session(place, req)
    assert not req.branch.copy.exists() and not req.branch.meta.exists()


def test_isolation_branch_config_and_carry_rules(home, repo, network):
    fake = FakeIncus()
    cfg = default_config(env={"HOME": str(home)})
    place = place_for(home, repo, fake, git=replace(cfg.git, isolation="branch"))
    assert request(place).branch is not None  # every session a branch session
    plain = place_for(home, repo, fake)
    assert request(plain).branch is None
    with pytest.raises(UsageError, match="--carry needs a branch session"):
        request(plain, carry=True)


def test_a_run_whose_rules_fail_leaves_no_container_and_no_new_copy(home, repo, network, monkeypatch):
    from coi import network as net

    def refuse(client, name, policy, **kw):
        raise CoiError("rules refused")
    monkeypatch.setattr(net, "apply", refuse)
    fake = FakeIncus()
    place = place_for(home, repo, fake)
    req = request(place, branch="never")
    with pytest.raises(CoiError, match="rules refused"):
        lifecycle.run(place, req, ["true"], capture=True, timeout=0)
    assert not req.branch.copy.exists() and not req.branch.meta.exists()
    assert [i["name"] for i in fake.instances()] == []
