"""``coi shell`` through a real terminal, as a normal user, with the stand-in agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from terminal import Terminal

pytestmark = pytest.mark.e2e


def shell(user, workspace, *args: str) -> Terminal:
    argv = user.argv(["coi", "shell", *args], env={"TERM": "xterm-256color"})
    return Terminal(argv, cwd=str(workspace))


def container_of(term: Terminal) -> str:
    for line in term.output().splitlines():
        if line.startswith("Container: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no Container line in:\n{term.output()}")


def coi_json(user, workspace, *args):
    proc = user.run([*args, "--format", "json"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_agent_detach_attach_and_poweroff_saves(session_user, workspace, incus):
    term = shell(session_user, workspace)
    term.wait_for("Workspace: ")
    for line in ("Auto-allocated slot 1", "Setting up session", "Starting session...", "Session ID: "):
        assert line in term.output()
    name = container_of(term)
    term.wait_for("fake-claude> ")
    assert "ENV IS_SANDBOX=1" in term.text()
    term.type("remember the milk")
    term.wait_for("echo: remember the milk")
    term.type("exit")  # the agent exits: bash is left
    term.wait_for("code@")
    term.type("touch /workspace/from-inside")
    term.detach()
    assert term.finish() == 0
    assert f"coi attach {name}" in term.output()
    assert incus.instance(name)["status"] == "Running"
    assert (workspace / "from-inside").stat().st_uid == session_user.uid

    term = Terminal(session_user.argv(["coi", "attach", name], env={"TERM": "xterm-256color"}),
                    cwd=str(workspace))
    term.wait_for("code@")
    term.type("sudo poweroff")
    term.wait_for("Session data saved", timeout=90)
    assert "Saving session data..." in term.output()
    assert term.finish() == 0
    assert not incus.exists(name)
    sessions = list((session_user.home / ".coi" / "sessions-claude").iterdir())
    assert len(sessions) == 1 and oct(sessions[0].stat().st_mode & 0o777) == "0o700"
    meta = json.loads((sessions[0] / "metadata.json").read_text())
    assert meta["container_name"] == name and meta["workspace"] == str(workspace)
    assert meta["persistent"] is False and meta["slot"] == 1 and meta["tool"] == "claude"
    transcript = list((sessions[0] / "state" / "projects").glob("*/*.jsonl"))
    assert "remember the milk" in transcript[0].read_text()


def test_exit_from_bash_keeps_container(session_user, workspace, incus):
    term = shell(session_user, workspace, "--debug")
    term.wait_for("code@")
    name = container_of(term)
    term.type("exit")
    assert term.finish() == 0
    assert incus.instance(name)["status"] == "Running"


def test_persistent_container_survives_and_restarts(session_user, workspace, incus):
    name = session_user.background(workspace, "--persistent")["container"]
    assert incus.instance(name)["config"]["user.coi.persistent"] == "true"
    assert session_user.run(["container", "exec", name, "--", "touch", "/opt/installed-here"]).returncode == 0
    proc = session_user.run(["shutdown", name, "--timeout", "30"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert incus.instance(name)["status"] == "Stopped"  # kept, not deleted

    assert session_user.background(workspace, "--persistent")["container"] == name
    assert session_user.run(["container", "exec", name, "--", "test", "-f", "/opt/installed-here"]).returncode == 0


def test_two_slots_have_their_own_homes(session_user, workspace):
    names = []
    for _ in range(2):
        names.append(session_user.background(workspace, "--debug")["container"])
    assert names[0].endswith("-1") and names[1].endswith("-2")
    run = lambda n, cmd: session_user.run(["container", "exec", n, "--user", "1000", "--", "sh", "-c", cmd])
    assert run(names[0], "touch /home/code/mine /workspace/shared").returncode == 0
    assert run(names[1], "test -f /home/code/mine").returncode == 1
    assert run(names[1], "test -f /workspace/shared").returncode == 0


def test_hostile_environment_values_arrive_unchanged(session_user, workspace):
    value = "a 'b' \"c\" $HOME $(id) `id` \\ ; & | end\nsecond line"
    name = session_user.background(workspace, "--debug", "-e", f"HOSTILE={value}")["container"]
    assert session_user.run(["tmux", "send", name, 'printf %s "$HOSTILE" > /workspace/env.out']).returncode == 0
    deadline = time.monotonic() + 30
    out = workspace / "env.out"
    while not (out.exists() and out.read_text() == value):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no file"
        time.sleep(0.1)


def test_ten_sessions_at_once_get_ten_slots(session_user, workspace):
    argv = session_user.argv(["coi", "shell", "--background", "--format", "json", "--debug"])
    procs = [subprocess.Popen(argv, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(10)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1] for r, p in zip(results, procs) if p.returncode]
    assert sorted(json.loads(out)["slot"] for out, _ in results) == list(range(1, 11))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_setup_leaves_nothing(session_user, workspace, incus, signum):
    """Ctrl+C (or a closed terminal) while the container is being created."""
    term = shell(session_user, workspace)
    term.wait_for("Auto-allocated slot")  # printed just before the container is created
    coi = int(subprocess.run(["pgrep", "-P", str(term.child.pid)], capture_output=True, text=True).stdout.split()[0])
    # The signal lands while the container is being created or started: held
    # for the daemon's answer, then acted on. (Stopping coi here with SIGSTOP
    # made runuser stop itself too, now and then for good.)
    os.kill(coi, signum)
    assert term.finish() != 0
    assert "Session ID:" not in term.output()
    ws = str(workspace)
    assert [i["name"] for i in incus.instances() if i["config"].get("user.coi.workspace") == ws] == []


def test_killed_coi_leaves_session_running_for_attach(session_user, workspace, incus):
    term = shell(session_user, workspace)
    term.wait_for("fake-claude> ")
    name = container_of(term)
    os.killpg(os.getpgid(term.child.pid), signal.SIGKILL)
    term.child.close(force=True)
    assert incus.instance(name)["status"] == "Running"
    proc = session_user.run(["attach"], cwd=workspace)  # no terminal: refused, never hangs
    assert proc.returncode == 2 and "needs a terminal" in proc.stderr
    term = Terminal(session_user.argv(["coi", "attach"], env={"TERM": "xterm-256color"}), cwd=str(workspace))
    term.wait_for("fake-claude> ")  # the one running session is found and attached
    term.detach()
    assert term.finish() == 0
    incus.stop(name, force=True)  # stopped from outside while coi was not attached
    proc = session_user.run(["clean", "--force"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert not incus.exists(name)


def test_background_json_names_the_session(session_user, workspace, incus):
    info = session_user.background(workspace, "--debug")
    try:
        assert set(info) == {"container", "session_id", "slot", "workspace", "network", "branch", "ports",
                             "ssh_agent"}
        assert info["workspace"] == str(workspace) and info["network"] == "restricted"
        assert info["branch"] is None  # not a branch session
        assert incus.instance(info["container"])["config"]["user.coi.session_id"] == info["session_id"]
        assert incus.instance(info["container"])["config"]["user.coi.slot"] == str(info["slot"])
    finally:
        session_user.run(["kill", info["container"]])
