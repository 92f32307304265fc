"""The Incus client against the real daemon: containers, exec, files, devices,
images, networks and the daemon's own errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from coi.errors import CoiError, ConflictError, ImageNotFoundError, NotFoundError, OperationFailedError
from coi.wait import wait_for

pytestmark = pytest.mark.integration


def test_container_lifecycle(incus, base_image, container_name):
    incus.create_instance(container_name, image=base_image, profiles=["coi"],
                          config={"user.coi.test": "yes"})
    assert incus.instance(container_name)["status"] == "Stopped"
    incus.start(container_name)
    assert incus.instance_state(container_name)["status"] == "Running"

    names = {i["name"]: i for i in incus.instances(recursion=2)}
    assert names[container_name]["config"]["user.coi.test"] == "yes"
    assert "state" in names[container_name]

    result = incus.exec(container_name, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.exit_code, result.stdout, result.stderr) == (7, "out\n", "err\n")
    result = incus.exec(container_name, ["sh", "-c", 'echo "$A|$(id -u)|$(pwd)"'],
                        env={"A": "x y $z"}, user=1000, group=1000, cwd="/tmp")
    assert result.stdout == "x y $z|1000|/tmp\n"

    incus.stop(container_name, force=True)
    assert incus.instance(container_name)["status"] == "Stopped"
    incus.delete(container_name)
    assert not incus.exists(container_name)


def test_daemon_errors_are_typed(incus, base_image, container_name):
    with pytest.raises(NotFoundError, match="not found"):
        incus.instance(container_name)
    incus.create_instance(container_name, image=base_image, profiles=["coi"], start=True)
    with pytest.raises(ConflictError):
        incus.create_instance(container_name, image=base_image, profiles=["coi"])
    with pytest.raises(OperationFailedError, match="running"):
        incus.delete(container_name)  # a running container is not deleted without force
    assert incus.instance(container_name)["status"] == "Running"
    with pytest.raises(ImageNotFoundError, match="Image not provided"):  # the daemon's own reason, typed
        incus.create_instance(f"{container_name}x", image="coi-test-no-such-image")
    assert not incus.exists(f"{container_name}x")


def test_files_and_trees_keep_content_and_modes(incus, base_image, container_name, tmp_path):
    incus.create_instance(container_name, image=base_image, profiles=["coi"], start=True)
    incus.push_file(container_name, "/tmp/a file", b"hello\n", uid=1000, gid=1000, mode=0o640)
    content, info = incus.pull_file(container_name, "/tmp/a file")
    assert content == b"hello\n"
    assert (info["uid"], info["gid"], info["mode"]) == (1000, 1000, 0o640)

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "data").write_bytes(os.urandom(200_000))
    incus.push_tree(container_name, src, "/opt/tree")
    back = tmp_path / "back"
    incus.pull_tree(container_name, "/opt/tree", back)
    assert (back / "sub" / "data").read_bytes() == (src / "sub" / "data").read_bytes()
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o755

    # Files can be read from a stopped container too (sessions are saved that way).
    incus.stop(container_name, force=True)
    assert incus.pull_file(container_name, "/opt/tree/run.sh")[0] == b"#!/bin/sh\n"


def test_shifted_disk_device(incus, base_image, container_name, coi_user, workspace):
    incus.create_instance(container_name, image=base_image, profiles=["coi"])
    incus.add_device(container_name, "workspace",
                     {"type": "disk", "source": str(workspace), "path": "/workspace", "shift": "true"})
    incus.start(container_name)
    (workspace / "from-host").write_text("x")
    os.chown(workspace / "from-host", coi_user.uid, coi_user.gid)
    made = incus.exec(container_name, ["sh", "-c", "stat -c %u /workspace/from-host; touch /workspace/new"],
                      user=coi_user.uid, group=coi_user.gid)
    assert made.exit_code == 0, made.stderr
    # shift=true maps ids one to one through the container's id map.
    assert made.stdout.strip() == str(coi_user.uid)
    assert (workspace / "new").stat().st_uid == coi_user.uid
    incus.stop(container_name, force=True)
    incus.remove_device(container_name, "workspace")
    assert "workspace" not in incus.instance(container_name)["devices"]


def test_publish_alias_properties_and_delete(incus, base_image, container_name):
    incus.create_instance(container_name, image=base_image, profiles=["coi"])
    fingerprint = incus.publish(container_name, properties={"coi.test": "1"})
    alias = f"{container_name}-image"
    try:
        incus.point_alias(alias, fingerprint)
        assert incus.image_exists(alias)
        incus.update_image_properties(fingerprint, {"coi.extra": "2"})
        props = incus.image_by_alias(alias)["properties"]
        assert props["coi.test"] == "1" and props["coi.extra"] == "2"
    finally:
        incus.delete_image(fingerprint)
    assert not incus.image_exists(alias)


def test_networks_pools_and_acls(incus):
    assert "coibr0" in {n["name"] for n in incus.networks()}
    assert incus.storage_pools()
    name = "coi-test-acl"
    incus.create_network_acl(name, egress=[{"action": "drop", "destination": "10.0.0.0/8", "state": "enabled"}])
    try:
        assert name in {a["name"] for a in incus.network_acls()}
    finally:
        incus.delete_network_acl(name)
    assert name not in {a["name"] for a in incus.network_acls()}


def test_incus_cli_argv_runs_for_real(incus, base_image, container_name):
    incus.create_instance(container_name, image=base_image, profiles=["coi"], start=True)
    argv = incus.exec_argv(container_name, ["sh", "-c", 'printf "%s" "$V"'], env={"V": "a 'b' $c"},
                           user=1000, group=1000, cwd="/", terminal=False)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "a 'b' $c"


def test_tmux_start_failure_says_why(incus, base_image, sandbox_image, container_name):
    """start_tmux reads only the exit code when tmux starts; when it does not, it
    runs again with the output recorded, to say why."""
    from coi import sessions

    incus.create_instance(container_name, image=sandbox_image, profiles=["coi"])
    sessions.ensure_running(incus, container_name)
    sessions.start_tmux(incus, container_name, code_uid=1000, env={}, command=["sleep", "600"])
    assert sessions.has_tmux_session(incus, container_name, 1000)
    # a session that is there counts (Incus may lose track of a new-session it ran)
    sessions.start_tmux(incus, container_name, code_uid=1000, env={}, command=["sleep", "600"])
    with pytest.raises(CoiError, match=r"could not start tmux in .*: the image has no user with uid 4242"):
        sessions.start_tmux(incus, container_name, code_uid=4242, env={}, command=["true"])  # no such user

    incus.stop(container_name, force=True)
    incus.delete(container_name)
    incus.create_instance(container_name, image=base_image, profiles=["coi"])  # the bare base: no code, no tmux
    sessions.ensure_running(incus, container_name)
    with pytest.raises(CoiError, match=r"could not start tmux in .*: the image has no user with uid 1000") as info:
        sessions.start_tmux(incus, container_name, code_uid=1000, env={}, command=["true"])
    assert "coi build" in info.value.hint


@pytest.mark.parametrize("terminal", [False, True])
def test_a_guarded_command_runs_at_most_once(incus, sandbox_image, container_name, terminal):
    """coi run's guard: trying the same command again (after Incus lost its PID)
    never starts it twice. Without a terminal the exit status of the first run
    is recovered; with one (the command replaces the guard) it is reported lost.
    Exit codes and arguments pass through."""
    from coi import sessions

    incus.create_instance(container_name, image=sandbox_image, profiles=["coi"])
    sessions.ensure_running(incus, container_name)
    argv = sessions.once_argv(["sh", "-c", 'printf "%s|" "$@" >> /tmp/ran; exit 42', "sh", "a b", "$x", "'q'"],
                              terminal=terminal)
    first = incus.exec(container_name, argv, user=1000, group=1000)
    assert (first.exit_code, first.stderr) == (42, "")
    again = incus.exec(container_name, argv, user=1000, group=1000)
    assert incus.exec(container_name, ["cat", "/tmp/ran"]).stdout == "a b|$x|'q'|"  # once
    assert sessions.lost_track(first.exit_code, first.stderr) is None
    assert len(sessions.guard_lines(again.stderr)) == 1
    if terminal:
        assert again.exit_code == 254 and sessions.lost_track(again.exit_code, again.stderr) is not None
    else:
        assert again.exit_code == 42 and sessions.lost_track(again.exit_code, again.stderr) is None


def test_a_second_start_waits_for_the_first_run(incus, sandbox_image, container_name):
    """Incus may report a command lost while it still runs: the second start waits
    for it, then reports its exit status."""
    from coi import sessions

    incus.create_instance(container_name, image=sandbox_image, profiles=["coi"])
    sessions.ensure_running(incus, container_name)
    argv = sessions.once_argv(["sh", "-c", "sleep 1; exit 7"])
    marker = argv[3]
    first = incus.raw("POST", f"/1.0/instances/{container_name}/exec", body=json.dumps({
        "command": argv, "environment": {}, "wait-for-websocket": False, "interactive": False,
        "record-output": False}).encode(), headers={"Content-Type": "application/json"})
    assert first.status < 400
    wait_for(lambda: incus.exec(container_name, ["test", "-e", f"{marker}/pid"]).exit_code == 0,
             timeout=10, what="the first run to start")
    again = incus.exec(container_name, argv)
    assert again.exit_code == 7 and len(sessions.guard_lines(again.stderr)) == 1
