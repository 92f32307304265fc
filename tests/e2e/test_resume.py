"""Saved sessions, resume and credential protection, with the stand-in agent."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from terminal import Terminal

pytestmark = pytest.mark.e2e


def write_credentials(user, token: str) -> None:
    claude = user.home / ".claude"
    claude.mkdir(exist_ok=True)
    (claude / ".credentials.json").write_text(json.dumps({"token": token}))
    (claude / "settings.json").write_text(json.dumps({"theme": "dark"}))
    for p in (claude, claude / ".credentials.json", claude / "settings.json"):
        os.chown(p, user.uid, user.gid)


@pytest.fixture
def agent_user(session_user):
    write_credentials(session_user, "first")
    yield session_user
    import shutil
    shutil.rmtree(session_user.home / ".claude", ignore_errors=True)


def shell(user, workspace, *args, env=None) -> Terminal:
    return Terminal(user.argv(["coi", "shell", *args], env={"TERM": "xterm-256color", **(env or {})}),
                    cwd=str(workspace))


def session_id_of(term: Terminal) -> str:
    return next(l.split(": ")[1].strip() for l in term.output().splitlines() if l.startswith("Session ID: "))


def poweroff(term: Terminal) -> None:
    term.type("exit")  # leave the agent
    term.wait_for("code@")
    term.type("sudo poweroff")
    term.wait_for("Session data saved", timeout=90)
    assert term.finish() == 0


def test_resume_in_a_fresh_container_remembers_and_refreshes_credentials(agent_user, workspace, incus):
    term = shell(agent_user, workspace)
    term.wait_for("fake-claude> ")
    assert "CREDENTIALS {\"token\": \"first\"}" in term.text() and "MODE bypassPermissions" in term.text()
    sid = session_id_of(term)
    term.type("apples")
    term.wait_for("echo: apples")
    poweroff(term)
    saved = agent_user.home / ".coi" / "sessions-claude" / sid
    assert not (saved / "state" / ".credentials.json").exists()  # secrets are never kept in saves
    assert json.loads((agent_user.home / ".claude" / "settings.json").read_text()) == {"theme": "dark"}

    write_credentials(agent_user, "second")  # the old token expired
    term = shell(agent_user, workspace, "--resume")
    term.wait_for("fake-claude> ")
    assert f"RESUMED {sid} remembering: apples" in term.text()
    assert "CREDENTIALS {\"token\": \"second\"}" in term.text()
    assert session_id_of(term) == sid
    poweroff(term)

    term = shell(agent_user, workspace, f"--resume={sid}")
    term.wait_for("fake-claude> ")
    assert f"RESUMED {sid}" in term.text()
    poweroff(term)
    assert list((agent_user.home / ".coi" / "sessions-claude").iterdir()) == [saved]


@pytest.mark.parametrize("arg, code, message", [
    ("--resume=../../etc", 2, "is not a session id"),
    (f"--resume={uuid.uuid4()}", 1, "not found"),
    ("--resume", 1, "no previous session to resume"),
])
def test_bad_or_foreign_resume_is_refused(agent_user, workspace, coi_user, incus, arg, code, message):
    # A session saved in another workspace is never picked up.
    other = coi_user.workspace()
    name = agent_user.background(other, "--debug")["container"]
    assert agent_user.run(["shutdown", name, "--timeout", "20"], cwd=other).returncode == 0

    proc = agent_user.run(["shell", arg], cwd=workspace)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert not [i for i in incus.instances() if i["config"].get("user.coi.workspace") == str(workspace)]


def test_persistent_resume_inherits_the_flag(agent_user, workspace, incus):
    term = shell(agent_user, workspace, "--persistent")
    term.wait_for("fake-claude> ")
    sid = session_id_of(term)
    term.type("pears")
    term.wait_for("echo: pears")
    poweroff(term)
    name = next(l.split(": ")[1].strip() for l in term.output().splitlines() if l.startswith("Container: "))
    assert incus.instance(name)["status"] == "Stopped"

    term = shell(agent_user, workspace, "--resume")  # no --persistent: inherited from the save
    term.wait_for("fake-claude> ")
    assert f"Container: {name}" in term.output() and f"RESUMED {sid} remembering: pears" in term.text()
    assert incus.instance(name)["config"]["user.coi.persistent"] == "true"
    poweroff(term)
    assert incus.instance(name)["status"] == "Stopped"


def test_nothing_else_crosses_into_the_sandbox(agent_user, workspace):
    home = agent_user.home
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (home / ".gitconfig").write_text("[credential]\n\thelper = store\n")
    (home / ".aws").mkdir(exist_ok=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = x\n")
    cfg = home / ".config" / "coi" / "config.toml"
    cfg.write_text(cfg.read_text() + '\n[tool]\nenv_passthrough = ["COI_ALLOWED_VAR"]\n'
                   if "[tool]" not in cfg.read_text() else
                   cfg.read_text().replace("[tool]\n", '[tool]\nenv_passthrough = ["COI_ALLOWED_VAR"]\n'))
    env = {"SECRET_TOKEN": "leak", "SSH_AUTH_SOCK": "/tmp/agent.sock", "AWS_SECRET_ACCESS_KEY": "leak",
           "COI_ALLOWED_VAR": "allowed"}
    name = agent_user.background(workspace, "--debug", env=env)["container"]
    probe = ('env; echo ---; ls -a /home/code /home; test -e /home/code/.ssh && echo HAS_SSH; '
             'test -e /home/code/.gitconfig && echo HAS_GITCONFIG; test -e /home/code/.aws && echo HAS_AWS; '
             f'test -e {home} && echo HAS_HOST_HOME; ls -a /home/code/.claude')
    assert agent_user.run(["tmux", "send", name, f"({probe}) > /workspace/probe.txt 2>&1"]).returncode == 0
    out = workspace / "probe.txt"
    import time
    deadline = time.monotonic() + 30
    while not (out.exists() and ".credentials.json" in out.read_text()):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no probe output"
        time.sleep(0.1)
    text = out.read_text()
    for leaked in ("leak", "SSH_AUTH_SOCK", "HAS_SSH", "HAS_GITCONFIG", "HAS_AWS", "HAS_HOST_HOME", "coi-tester"):
        assert leaked not in text, leaked
    assert "COI_ALLOWED_VAR=allowed" in text and "IS_SANDBOX=1" in text
