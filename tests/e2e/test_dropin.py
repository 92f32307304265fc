"""coi as a drop-in for code-on-incus: what a user or a script of the original tool sees,
as the test user, through the real CLI."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from conftest import TEST_PREFIX
from terminal import Terminal

pytestmark = pytest.mark.e2e


def listed(user, workspace) -> list[str]:
    proc = user.run(["list", "--format", "json"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return [c["name"] for c in json.loads(proc.stdout)["active_containers"]]


def test_launched_containers_are_coi_s_and_foreign_ones_stay_untouchable(session_user, sandbox_image, incus,
                                                                          workspace, container_name):
    assert session_user.run(["container", "launch", sandbox_image, container_name]).returncode == 0
    assert container_name in listed(session_user, workspace)
    proc = session_user.run(["shutdown", container_name, "--timeout", "20"])
    assert proc.returncode == 0 and f"Shut down {container_name}" in proc.stderr, proc.stderr
    assert incus.instance(container_name)["status"] == "Stopped"  # kept: not ephemeral
    proc = session_user.run(["kill", container_name])
    assert proc.returncode == 0 and not incus.exists(container_name), proc.stderr

    foreign = f"{TEST_PREFIX}foreign-{uuid.uuid4().hex[:6]}"
    incus.create_instance(foreign, image=sandbox_image, profiles=["coi"])
    try:
        proc = session_user.run(["kill", foreign])
        assert proc.returncode == 1 and "is not a coi container" in proc.stderr
        assert incus.exists(foreign) and foreign not in listed(session_user, workspace)
    finally:
        incus.delete(foreign)


def test_list_text_has_the_original_sections(session_user, workspace):
    empty = session_user.run(["list", "-w", str(workspace)]).stdout
    assert empty.splitlines() == ["Active Containers:", "  (none)"]
    name = session_user.background(workspace, "--debug")["container"]
    text = session_user.run(["list", "-w", str(workspace)]).stdout.splitlines()
    assert text[:2] == ["Active Containers:", f"  {name} (ephemeral)"]
    assert [line.split(":")[0].strip() for line in text[2:7]] == ["Status", "Created", "Image", "Workspace", "IPv4"]
    assert session_user.run(["shutdown", name, "--timeout", "20"]).returncode == 0
    every = session_user.run(["list", "--all", "-w", str(workspace)]).stdout.splitlines()
    saved = every[every.index("Saved Sessions:") + 1:]
    assert len(saved) == 3 and saved[1].strip().startswith("Saved: ") and saved[2].strip() == f"Workspace: {workspace}"
    other = session_user.workspace()
    assert session_user.run(["list", "--all", "-w", str(other)]).stdout.endswith(
        "Saved Sessions:\n  (none)\n")  # another workspace: none of this one's
    assert "no saved sessions" in session_user.run(["info", "-w", str(other)]).stderr
    assert session_user.run(["info", "-w", str(workspace)]).stdout.startswith("Session ID: ")


@pytest.mark.parametrize("args, code, message", [
    (["kill"], 2, "no container names provided"),
    (["shutdown"], 2, "no container names provided"),
    (["persist"], 2, "coi list"),
    (["kill", "--all", "--force"], 0, "No containers to kill"),
    (["shutdown", "--all", "--force"], 0, "No containers to shutdown"),
    (["run"], 2, "Usage: coi run"),
    (["info"], 1, "no saved sessions"),
    (["info", str(uuid.UUID(int=7))], 1, "not found"),
    (["shell", "--resume"], 1, "no previous session to resume"),
    (["attach", "--slot", "7"], 1, "not found"),
    (["file", "push", "/etc/hostname", "no-colon-here"], 2, "container:path"),
    (["container", "exec", "x", "--format", "raw", "--", "true"], 2, "--format flag requires --capture"),
    (["container", "exec", "x", "--capture", "--format", "xml", "--", "true"], 2, "'json', 'raw'"),
    (["list", "--format", "xml"], 2, "'text', 'json'"),
])
def test_messages_as_the_original_words_them(session_user, workspace, args, code, message):
    # An empty prefix of the test's own: --all finds nothing, whatever else runs.
    proc = session_user.run(args, cwd=workspace, env={"COI_CONTAINER_PREFIX": f"{TEST_PREFIX}none-"})
    assert proc.returncode == code and message in proc.stderr, proc.stderr


def test_run_persistent_twice_reuses_the_slot_and_says_so(session_user, workspace, incus):
    first = session_user.run(["run", "--persistent", "--slot", "3", "--", "touch", "/home/code/mark"], cwd=workspace)
    assert first.returncode == 0, first.stderr
    again = session_user.run(["run", "--persistent", "--slot", "3", "--", "test", "-f", "/home/code/mark"],
                             cwd=workspace)
    assert again.returncode == 0 and "Reusing persistent container" in again.stderr, again.stderr
    name = [n for n in listed(session_user, workspace) if n.endswith("-3")]
    assert name and session_user.run(["kill", name[0]]).returncode == 0


def test_file_push_and_pull_confirm(session_user, workspace, tmp_path):
    name = session_user.background(workspace, "--debug")["container"]
    src = workspace / "note.txt"
    src.write_text("hi\n")
    shutil.chown(src, session_user.uid, session_user.gid)
    proc = session_user.run(["file", "push", str(src), f"{name}:/tmp/note.txt"])
    assert proc.returncode == 0 and f"Pushed file {src} to {name}:/tmp/note.txt" in proc.stderr
    proc = session_user.run(["file", "pull", f"{name}:/tmp/note.txt", str(workspace / "back.txt")])
    assert proc.returncode == 0 and f"Pulled {name}:/tmp/note.txt to {workspace / 'back.txt'}" in proc.stderr
    proc = session_user.run(["file", "push", "-r", str(workspace), f"{name}:/tmp/ws"])
    assert proc.returncode == 0 and "Pushed directory" in proc.stderr
    session_user.run(["kill", name])


def test_attach_says_where_it_goes_and_names_a_missing_tmux_session(session_user, workspace, incus):
    name = session_user.background(workspace, "--debug")["container"]
    term = Terminal(session_user.argv(["coi", "attach", "--slot", "1"], env={"TERM": "xterm-256color"}),
                    cwd=str(workspace))
    term.wait_for(f"Attaching to {name}...")
    term.detach()
    term.finish()
    incus.exec(name, ["tmux", "-S", "/home/code/.tmux-coi.sock", "kill-server"], user=1000, group=1000)
    proc = session_user.run(["tmux", "capture", name])
    assert proc.returncode == 1 and "No tmux session" in proc.stderr and "--bash" in proc.stderr
    session_user.run(["kill", name])


def test_incus_never_greets_a_first_time_user_in_coi_s_output(session_user, workspace):
    """The incus CLI's "To start your first container, try: incus launch ..." (printed when
    the user has no incus client config yet) never reaches coi's output."""
    own = session_user.home / ".config" / "incus"
    kept = session_user.home / f".config/incus-kept-{uuid.uuid4().hex[:6]}"
    if own.exists():
        own.rename(kept)
    try:
        proc = session_user.run(["run", "--", "true"], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        assert "first container" not in proc.stderr + proc.stdout and "incus launch" not in proc.stderr
        assert not own.exists()  # the user's own incus directory is left alone
    finally:
        if kept.exists():
            shutil.rmtree(own, ignore_errors=True)
            kept.rename(own)
