"""coi's host commands as people run them: a normal user in the Incus admin
group, a user outside it, and root for set-up."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

pytestmark = pytest.mark.integration


def test_version_forms(coi_user):
    for args in (["--version"], ["-v"], ["version"], ["version", "ignored"]):
        proc = coi_user.run(args)
        assert proc.returncode == 0
        assert proc.stdout.startswith("code-on-incus (coi) v") and proc.stdout.splitlines()[1].startswith("Python ")


def test_doctor_finds_no_error_for_a_normal_user(coi_user, incus):
    """0 all good, 1 warnings (an image not built yet, say), 2 errors: none here."""
    proc = coi_user.run(["doctor"])
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert "[ ok ] daemon" in proc.stdout and "[FAIL]" not in proc.stdout
    assert "[ ok ] nftables: nft installed" in proc.stdout  # found in /usr/sbin, off a user's PATH
    json_proc = coi_user.run(["doctor", "--format", "json"])
    report = json.loads(json_proc.stdout)
    assert report["status"] in ("ok", "warning") and report["fixes"] == []
    assert json_proc.returncode == {"ok": 0, "warning": 1}[report["status"]]
    names = {c["name"] for c in report["checks"]}
    assert {"Incus installed", "daemon", "storage", "bridge", "idmapped mounts", "id ranges",
            "nftables", "image", "tmux", "address lock", "network rules"} <= names


def test_socket_without_permission_is_one_clear_line(outsider, incus):
    proc = outsider.run(["doctor"])
    assert proc.returncode == 2  # an error
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "permission denied on the Incus socket" in proc.stdout
    assert "incus-admin" in proc.stdout


def _error_of(proc):
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()


def test_missing_socket_and_stopped_daemon(coi_user, workspace):
    missing = workspace / "nothing.socket"
    proc = coi_user.run(["doctor"], env={"INCUS_SOCKET": str(missing)})
    assert proc.returncode == 2
    assert f"no socket at {missing}" in proc.stdout and "coi setup" in proc.stdout

    # A socket file nobody listens on is what a crashed daemon leaves behind.
    dead = workspace / "dead.socket"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    os.chmod(dead, 0o777)
    proc = coi_user.run(["doctor"], env={"INCUS_SOCKET": str(dead)})
    assert proc.returncode == 2
    assert "not answering" in proc.stdout and "coi setup" in proc.stdout


def test_unknown_command_and_flag_are_usage_errors(coi_user):
    for args in (["frobnicate"], ["doctor", "--no-such-flag"]):
        proc = coi_user.run(args)
        assert proc.returncode == 2
        assert _error_of(proc)[-2].startswith("Error: ")


def test_setup_refuses_without_root(coi_user):
    proc = coi_user.run(["setup"])
    assert proc.returncode == 1
    assert _error_of(proc) == ["Error: coi setup must run as root: it installs packages and configures Incus",
                               "Hint: run 'sudo coi setup'"]


@pytest.mark.skipif(os.geteuid() != 0, reason="coi setup needs root")
def test_setup_again_changes_nothing(incus):
    proc = subprocess.run(["coi", "setup"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Nothing to change" in proc.stderr
    assert "  + " not in proc.stderr


def test_setup_lets_its_user_start_isolated_sessions(coi_user, sandbox_image, workspace):
    """After 'sudo coi setup --user', the default restricted mode works for that user with no
    config of their own (on kernels without bridge-family conntrack: via sudo -n nft)."""
    assert not (coi_user.home / ".config" / "coi").exists()
    proc = coi_user.run(["run", "--image", sandbox_image, "--", "true"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
