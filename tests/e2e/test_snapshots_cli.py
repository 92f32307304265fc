"""coi snapshot create|list|restore|delete as a normal user, with the stand-in agent.

A restore puts back the container's own files (code's home, the agent's conversation)
and leaves /workspace, a host directory, as it is; a running session comes back with its
network rules and its agent in tmux; an attached ``coi shell`` is told, and its ephemeral
container is not taken for ended."""

from __future__ import annotations

import json

import pytest

from coi.wait import wait_for

from conftest import NET_PROBE
from netbackend import coi_backend  # noqa: F401
from terminal import Terminal

pytestmark = pytest.mark.e2e


def coi_ok(user, workspace, *args: str) -> str:
    proc = user.run(list(args), cwd=workspace)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


def listed(user, workspace, *args: str) -> dict:
    return json.loads(coi_ok(user, workspace, "snapshot", "list", "--format", "json", *args))


def in_container(user, name: str, script: str) -> dict:
    proc = user.run(["container", "exec", name, "--capture", "--user", "1000", "--", "sh", "-c", script])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_pane(user, name: str, text: str, timeout: float = 60) -> str:
    """The tmux pane's text once ``text`` is in it."""
    def shown() -> str | None:
        proc = user.run(["tmux", "capture", name])
        return proc.stdout if proc.returncode == 0 and text in proc.stdout else None
    return wait_for(shown, timeout=timeout, what=f"{text!r} in the tmux pane of {name}")


def probe(user, name: str, **targets: tuple[str, str]) -> dict[str, dict]:
    items = json.dumps([[label, kind, target] for label, (kind, target) in targets.items()])
    proc = user.run(["container", "exec", name, "--capture", "--", "python3", "-c", NET_PROBE, items])
    assert proc.returncode == 0, proc.stderr
    return json.loads(json.loads(proc.stdout)["stdout"])


def test_create_list_restore_delete(net_user, workspace, incus, net_lab, coi_backend):
    name = net_user.background(workspace)["container"]
    try:
        wait_pane(net_user, name, "fake-claude>")
        coi_ok(net_user, workspace, "tmux", "send", name, "apples")
        wait_pane(net_user, name, "echo: apples")

        proc = net_user.run(["snapshot", "create", "clean"], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"Created snapshot 'clean' for container '{name}'\n"
        assert f"/workspace ({workspace})" in proc.stderr and "Not in the snapshot" in proc.stderr
        shown = listed(net_user, workspace)
        assert shown["container"] == name and [s["name"] for s in shown["snapshots"]] == ["clean"]
        assert shown["snapshots"][0]["stateful"] is False and shown["snapshots"][0]["created_at"]

        # After the snapshot: a file in code's home, one in /workspace (the host's), more conversation.
        assert in_container(net_user, name, "echo x > /home/code/after && echo y > /workspace/after")["exit_code"] == 0
        coi_ok(net_user, workspace, "tmux", "send", name, "pears")
        wait_pane(net_user, name, "echo: pears")

        proc = net_user.run(["snapshot", "restore", "clean"], cwd=workspace, input="")
        assert proc.returncode == 2 and "add --force" in proc.stderr  # no terminal: no question, no restore
        assert in_container(net_user, name, "test -e /home/code/after")["exit_code"] == 0

        proc = net_user.run(["snapshot", "restore", "clean", "--force"], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"Restored container '{name}' from snapshot 'clean'\n"
        assert "stopped for the restore and started again, with its network rules (restricted)" in proc.stderr
        assert f"Attach with: coi attach {name}" in proc.stderr
        assert incus.instance(name)["status"] == "Running"
        assert in_container(net_user, name, "test -e /home/code/after")["exit_code"] == 1  # gone with the restore
        assert (workspace / "after").read_text() == "y\n"  # /workspace is the host's: not in the snapshot

        # The agent again, continuing the conversation of the snapshot's moment (apples, not pears).
        text = wait_pane(net_user, name, "remembering:")
        assert "apples" in text.split("remembering:")[-1] and "pears" not in text.split("remembering:")[-1]

        # Its rules went on again: private hosts refused, as before.
        assert name in coi_backend.containers()
        result = probe(net_user, name, private=("http", net_lab["private"].url))["private"]
        assert not result["ok"] and result["seconds"] < 1.5, result

        coi_ok(net_user, workspace, "snapshot", "delete", "clean")
        assert listed(net_user, workspace)["snapshots"] == []
    finally:
        net_user.run(["kill", name])


def test_two_sessions_need_container_and_none_is_an_error(session_user, workspace, coi_user):
    empty = coi_user.workspace()
    proc = session_user.run(["snapshot", "list"], cwd=empty)
    assert proc.returncode == 1 and f"no session container for {empty}" in proc.stderr

    first = session_user.background(workspace, "--debug")["container"]
    second = session_user.background(workspace, "--debug")["container"]
    try:
        proc = session_user.run(["snapshot", "create", "x"], cwd=workspace)
        assert proc.returncode == 2 and first in proc.stderr and second in proc.stderr
        assert "--container NAME" in proc.stderr
        coi_ok(session_user, workspace, "snapshot", "create", "x", "--container", second)
        assert [s["name"] for s in listed(session_user, workspace, "--container", second)["snapshots"]] == ["x"]
        assert listed(session_user, workspace, "-c", first)["snapshots"] == []
        proc = session_user.run(["snapshot", "create", "x", "--container", second], cwd=workspace)
        assert proc.returncode == 1 and "already exists" in proc.stderr
    finally:
        session_user.run(["kill", first, second])


def test_restoring_a_stopped_persistent_container_leaves_it_stopped(session_user, workspace, incus):
    name = session_user.background(workspace, "--persistent", "--debug")["container"]
    try:
        coi_ok(session_user, workspace, "snapshot", "create", "base")
        in_container(session_user, name, "touch /home/code/later")
        coi_ok(session_user, workspace, "container", "stop", name, "--force")
        proc = session_user.run(["snapshot", "restore", "base", "--force"], cwd=workspace)
        assert proc.returncode == 0 and f"{name} was stopped and stays stopped" in proc.stderr
        assert incus.instance(name)["status"] == "Stopped"
        coi_ok(session_user, workspace, "container", "start", name)  # its rules go on with it, as always
        assert in_container(session_user, name, "test -e /home/code/later")["exit_code"] == 1
    finally:
        session_user.run(["kill", name])


def test_an_attached_shell_is_told_and_its_ephemeral_container_survives_the_restore(session_user, workspace, incus):
    term = Terminal(session_user.argv(["coi", "shell"], env={"TERM": "xterm-256color"}), cwd=str(workspace))
    term.wait_for("fake-claude> ")
    name = next(line.split(": ", 1)[1].strip() for line in term.output().splitlines()
                if line.startswith("Container: "))
    try:
        coi_ok(session_user, workspace, "snapshot", "create", "s")
        proc = session_user.run(["snapshot", "restore", "s", "--force"], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        term.wait_for("is being restored from a snapshot")
        assert term.finish() == 0
        assert f"coi attach {name}" in term.output() and "Saving session data" not in term.output()
        assert incus.instance(name)["status"] == "Running"
        wait_pane(session_user, name, "fake-claude>")  # the agent is back; coi attach finds it
    finally:
        session_user.run(["kill", name])
