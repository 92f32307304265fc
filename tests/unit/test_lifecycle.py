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
from session_doubles import Said, home  # noqa: F401 (a fixture)

pytestmark = pytest.mark.unit


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


# ---- coi run --prompt: the agent headless -------------------------------------------------

HOSTILE_PROMPT = "it's \"$(touch /tmp/pwned)\" `id` $HOME;\nrm -rf / # --help\nEXIT=3"


def headless_agent(fake: FakeIncus, code: int = 3):
    """An agent that, asked headless, writes its transcript under its session id and exits ``code``."""
    from coi.incus import ExecResult

    def agent(name, command, **kw):
        if "-p" not in command:
            return DEFAULT
        sid = command[command.index("--session-id") + 1]
        fake.files_of(name).file(f"{spec.CODE_HOME}/.claude/projects/-workspace/{sid}.jsonl", b'{"text": "x"}\n')
        return ExecResult(code, "the answer\n", "")
    fake.on("exec", agent)


def headless_calls(fake: FakeIncus) -> list[list[str]]:
    return [c[2] for c in fake.called("exec") if "-p" in c[2]]


def said_session_id(place: Place) -> str:
    return next(t.split(": ")[1] for kind, t in place.messages.lines if t.startswith("Session ID: "))


def test_a_headless_run_streams_the_agents_answer_and_saves_the_session(home, workspace, network):
    fake = FakeIncus()
    headless_agent(fake)
    place = place_for(home, workspace, fake)
    result = lifecycle.run_agent(place, request(place), HOSTILE_PROMPT, capture=True, timeout=0)
    assert (result.exit_code, result.stdout) == (3, "the answer\n")  # the agent's own exit code
    sid = said_session_id(place)
    [argv] = headless_calls(fake)
    # As code, behind the run-once guard; the agent keeps its conversation under the session's id,
    # and the prompt is its last argument, whole.
    assert argv[:3] == ["setpriv", "--reuid=1000", "--regid=1000"]
    assert argv[-6:] == ["claude", "--session-id", sid, "-p", "--", HOSTILE_PROMPT]
    assert sum(HOSTILE_PROMPT in a for a in argv) == 1
    # Credentials went in before the agent ran, as for coi shell.
    calls = [c[0] for c in fake.calls]
    assert calls.index("push_file") < calls.index("start")
    saved = home / ".coi" / "sessions-claude" / sid
    assert (saved / "state" / "projects" / "-workspace" / f"{sid}.jsonl").exists()
    assert json.loads((saved / "metadata.json").read_text())["workspace"] == str(workspace)
    assert ("info", f"Continue the conversation with: coi shell --resume={sid}") in place.messages.lines
    name = fake.called("create_instance")[0][1]
    assert not fake.exists(name) and network[-1] == ("remove", name)


def test_the_saved_run_resumes_its_conversation(home, workspace, network):
    fake = FakeIncus()
    headless_agent(fake, code=0)
    place = place_for(home, workspace, fake)
    lifecycle.run_agent(place, request(place), "first", capture=True, timeout=0)
    sid = said_session_id(place)
    saved = lifecycle.resumed(place, "latest", generation=1)
    assert saved.session_id == sid
    session = spec.Session("c", 1, sid, False, True, workspace)
    assert lifecycle.agent_command(request(place, session_id=sid), session, saved)[-2:] == ["--resume", sid]


def test_a_run_that_never_started_the_agent_saves_nothing_and_leaves_nothing(home, workspace, network, monkeypatch):
    from coi import network as net

    monkeypatch.setattr(net, "apply", lambda client, name, policy, **kw: (_ for _ in ()).throw(CoiError("rules")))
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    with pytest.raises(CoiError, match="rules"):
        lifecycle.run_agent(place, request(place), "hi", capture=True, timeout=0)
    assert fake.instances() == [] and headless_calls(fake) == []
    assert not (home / ".coi" / "sessions-claude").exists()


def test_a_failed_save_is_a_warning_and_the_agents_code_stands(home, workspace, network, monkeypatch):
    from coi.sessions import state

    def broken(*a, **kw):
        raise CoiError("disk full")
    monkeypatch.setattr(state, "save_session", broken)
    fake = FakeIncus()
    headless_agent(fake, code=5)
    place = place_for(home, workspace, fake)
    assert lifecycle.run_agent(place, request(place), "hi", capture=True, timeout=0).exit_code == 5
    assert ("warn", "the session was not saved: disk full") in place.messages.lines
    assert fake.instances() == []


def test_a_reused_persistent_container_gives_the_agent_a_conversation_id_of_its_own(home, workspace, network):
    from coi.sessions import state

    fake = FakeIncus()
    headless_agent(fake, code=0)
    place = place_for(home, workspace, fake)
    lifecycle.run_agent(place, request(place, persistent=True), "one", capture=True, timeout=0)
    lifecycle.run_agent(place, request(place, persistent=True), "two", capture=True, timeout=0)
    first, second = headless_calls(fake)
    sid = said_session_id(place)
    assert first[first.index("--session-id") + 1] == sid  # the new container's: the session's id
    other = second[second.index("--session-id") + 1]
    assert other != sid and state.check_session_id(other) == other  # a fresh one, not the taken id
    assert len(fake.instances()) == 1  # persistent: kept, its rules kept
    assert ("remove", fake.instances()[0]["name"]) not in network


def test_a_streamed_headless_run_hands_incus_the_prompt_as_one_argument(home, workspace, network):
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    assert lifecycle.run_agent(place, request(place), HOSTILE_PROMPT, capture=False, timeout=0) == 0
    [call] = fake.called("exec_argv")
    command = call[2]
    assert command[-1] == HOSTILE_PROMPT and command[-2] == "--" and "-p" in command
    assert not [a for a in command[:-1] if HOSTILE_PROMPT in a]  # in no shell script, no other argument
    assert (home / ".coi" / "sessions-claude" / said_session_id(place)).is_dir()


def test_a_save_that_breaks_unexpectedly_still_removes_the_container(home, workspace, network, monkeypatch):
    from coi.sessions import state

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(state, "save_session", broken)
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    with pytest.raises(OSError):
        lifecycle.run_agent(place, request(place), "hi", capture=True, timeout=0)
    assert fake.instances() == []
