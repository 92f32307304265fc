"""coi run and the session and low-level commands, with their error paths,
run as a normal user against the real daemon."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.e2e


def names_in(user, workspace):
    proc = user.run(["list", "--format", "json"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return [c["name"] for c in json.loads(proc.stdout)["active_containers"] if c["workspace"] == str(workspace)]


@pytest.mark.parametrize("code", [0, 1, 42])
def test_run_propagates_exit_code_and_removes_container(session_user, workspace, code):
    proc = session_user.run(["run", "--", "sh", "-c", f"echo out; echo err >&2; exit {code}"], cwd=workspace)
    assert proc.returncode == code
    assert proc.stdout == "out\n" and "err" in proc.stderr
    assert names_in(session_user, workspace) == []


def test_run_capture_json_and_no_stdin(session_user, workspace):
    proc = session_user.run(["run", "--capture", "--", "sh", "-c", "cat; pwd; id -u; exit 3"], cwd=workspace,
                            input="")
    assert proc.returncode == 3
    assert json.loads(proc.stdout) == {"stdout": "/workspace\n1000\n", "stderr": "", "exit_code": 3}


def test_run_one_argument_is_a_shell_command(session_user, workspace):
    proc = session_user.run(["run", "echo a | tr a b"], cwd=workspace)
    assert (proc.returncode, proc.stdout) == (0, "b\n")


@pytest.mark.parametrize("capture", [[], ["--capture"]])
def test_run_timeout_exits_124_and_cleans_up(session_user, workspace, capture):
    started = time.monotonic()
    proc = session_user.run(["run", *capture, "--timeout", "1", "--", "sleep", "60"], cwd=workspace)
    assert proc.returncode == 124
    assert time.monotonic() - started < 30
    assert names_in(session_user, workspace) == []


def test_run_files_belong_to_the_host_user(session_user, workspace):
    (workspace / "host-file").write_text("x")
    import os
    os.chown(workspace / "host-file", session_user.uid, session_user.gid)
    proc = session_user.run(["run", "--", "sh", "-c", "stat -c %U host-file; touch made"], cwd=workspace)
    assert proc.stdout.strip() == "code"
    assert (workspace / "made").stat().st_uid == session_user.uid


def test_run_with_mounts_env_and_persistent(session_user, workspace, coi_user):
    extra = coi_user.workspace()
    proc = session_user.run(["run", "--persistent", "--mount", f"{extra}:/extra", "-e", "A=1 2",
                             "--", "sh", "-c", 'touch /extra/seen; printf %s "$A"'], cwd=workspace)
    assert (proc.returncode, proc.stdout) == (0, "1 2")
    assert (extra / "seen").exists()
    assert len(names_in(session_user, workspace)) == 1  # persistent: kept


@pytest.mark.parametrize("args, message", [
    (["run"], "no command given"),
    (["run", "-e", "NOEQUALS", "--", "true"], "is not KEY=VALUE"),
    (["run", "--mount", "/tmp:relative", "--", "true"], "not an absolute container path"),
    (["run", "--mount", "/tmp:/workspace/x", "--", "true"], "overlaps /workspace"),
    (["run", "--mount", "/tmp:/a", "--mount", "/var:/a/b", "--", "true"], "overlaps /a"),
    (["run", "--mount", "/tmp:/a", "--mount", "/var:/a", "--", "true"], "is /a"),
    (["shell", "abc"], "did you mean --resume=abc?"),
    (["list", "--format", "xml"], "invalid choice: 'xml'"),
    (["kill"], "no container names provided"),
    (["container", "exec", "x", "--format", "raw", "--", "true"], "--format flag requires --capture"),
    (["file", "push", "/etc/hostname", "no-colon-here"], "is not NAME:/PATH"),
])
def test_usage_errors_exit_2_before_anything_is_created(session_user, workspace, args, message):
    proc = session_user.run(args, cwd=workspace)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert names_in(session_user, workspace) == []


def test_missing_image_is_a_clear_error(session_user, workspace):
    proc = session_user.run(["run", "--image", "coi-test-no-such-image", "--", "true"], cwd=workspace)
    assert proc.returncode == 1
    assert "image coi-test-no-such-image not found" in proc.stderr
    assert names_in(session_user, workspace) == []


def test_kill_unknown_names_warn(session_user, workspace):
    proc = session_user.run(["kill", "coi-test-nope-1"], cwd=workspace)
    assert proc.returncode == 1 and "Warning: container coi-test-nope-1 not found" in proc.stderr


def test_all_without_force_refuses_without_terminal(session_user, workspace):
    assert session_user.run(["shell", "--background", "--debug"], cwd=workspace).returncode == 0
    proc = session_user.run(["kill", "--all"], cwd=workspace, input="")
    assert proc.returncode == 2 and "add --force" in proc.stderr
    assert len(names_in(session_user, workspace)) == 1


def test_attach_tmux_and_file_errors(session_user, workspace, incus, tmp_path):
    name = session_user.background(workspace, "--debug")["container"]
    for args, message in ((["attach", "coi-test-nope-1"], "not found"),
                          (["tmux", "send", "coi-test-nope-1", "x"], "not found"),
                          (["file", "pull", f"{name}:/etc", str(tmp_path)], "use -r"),
                          (["file", "push", str(workspace), f"{name}:/tmp/d"], "use -r")):
        proc = session_user.run(args, cwd=workspace)
        assert proc.returncode in (1, 2) and message in proc.stderr, (args, proc.stderr)

    # tmux capture and list see the session; a container without it suggests --bash.
    assert [l.split()[0] for l in session_user.run(["tmux", "list"]).stdout.splitlines()[1:]] == [name]
    assert session_user.run(["tmux", "capture", name]).returncode == 0
    incus.exec(name, ["tmux", "-S", "/home/code/.tmux-coi.sock", "kill-server"], user=1000, group=1000)
    proc = session_user.run(["tmux", "send", name, "x"])
    assert proc.returncode == 1 and "--bash" in proc.stderr
    incus.stop(name, force=True)
    proc = session_user.run(["tmux", "capture", name])
    assert proc.returncode == 1 and "not running" in proc.stderr


def test_file_push_pull_keep_modes_and_spaces(session_user, workspace):
    name = session_user.background(workspace, "--debug")["container"]
    src = workspace / "dir with space"
    src.mkdir()
    (src / "run me.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run me.sh").chmod(0o750)
    for p in (src, src / "run me.sh"):
        import os
        os.chown(p, session_user.uid, session_user.gid)
    assert session_user.run(["file", "push", "-r", str(src), f"{name}:/tmp/dir with space"]).returncode == 0
    back = workspace / "back"
    proc = session_user.run(["file", "pull", "-r", f"{name}:/tmp/dir with space", str(back)])
    assert proc.returncode == 0, proc.stderr
    assert (back / "run me.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert (back / "run me.sh").stat().st_mode & 0o777 == 0o750


def test_container_low_level(session_user, sandbox_image, container_name):
    run = session_user.run
    assert run(["container", "exists", container_name]).returncode == 1
    assert run(["container", "launch", sandbox_image, container_name]).returncode == 0
    assert run(["container", "running", container_name]).returncode == 0
    proc = run(["container", "exec", container_name, "--user", "1000", "--cwd", "/tmp", "--capture", "--",
                "sh", "-c", "pwd; exit 5"])
    # JSON: coi itself succeeded; the command's code is in the JSON. Raw: the command's own code.
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"stdout": "/tmp\n", "stderr": "", "exit_code": 5}
    proc = run(["container", "exec", container_name, "--capture", "--format", "raw", "--", "echo", "raw"])
    assert proc.stdout == "raw\n" and proc.returncode == 0
    proc = run(["container", "exec", container_name, "--capture", "--format", "raw", "--", "coi-test-no-such-cmd"])
    assert proc.returncode == 127
    proc = run(["container", "delete", container_name])
    assert proc.returncode == 1 and "running" in proc.stderr
    assert run(["container", "running", container_name]).returncode == 0
    assert run(["container", "stop", container_name, "--force"]).returncode == 0
    assert run(["container", "running", container_name]).returncode == 1
    assert run(["container", "delete", container_name]).returncode == 0
    assert run(["container", "exists", container_name]).returncode == 1


def test_shutdown_saves_and_clean_removes_stopped(session_user, workspace, incus):
    name = session_user.background(workspace, "--debug")["container"]
    proc = session_user.run(["shutdown", name, "--timeout", "20"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert "Session data saved" in proc.stderr and not incus.exists(name)
    proc = session_user.run(["list", "--all", "--format", "json"], cwd=workspace)
    saved = json.loads(proc.stdout)["saved_sessions"]
    assert [s["container_name"] for s in saved] == [name]

    name = session_user.background(workspace, "--debug")["container"]
    incus.stop(name, force=True)
    proc = session_user.run(["clean", "--force"], cwd=workspace)
    assert proc.returncode == 0 and not incus.exists(name)


def test_persist_turns_ephemeral_persistent(session_user, workspace, incus):
    name = session_user.background(workspace, "--debug")["container"]
    assert session_user.run(["persist", name]).returncode == 0
    assert incus.instance(name)["config"]["user.coi.persistent"] == "true"
    assert session_user.run(["shutdown", name, "--timeout", "20"]).returncode == 0
    assert incus.instance(name)["status"] == "Stopped"


def test_storage_is_persistent_across_sessions(session_user, workspace):
    for cmd in ("echo kept > /storage/f", "cat /storage/f"):
        proc = session_user.run(["run", "--storage", "--", "sh", "-c", cmd], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "kept\n"
    assert list((session_user.home / ".coi" / "storage").glob("*/f"))
