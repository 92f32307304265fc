"""The hostile project against 'coi doctor --fix' on the real daemon, run in its directory
with '.' first on PATH: by its user (who trusts workspace configs), and by root. The
project's .coi.toml points doctor at a state directory of its own with a planted record,
at its own nft "helper", group and Incus project; it plants commands named like those
doctor runs. Doctor runs none of them and acts on nothing the file names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from conftest import TEST_PREFIX, configured

pytestmark = pytest.mark.security

COMMANDS = ("nft", "ip", "sudo", "systemctl", "pgrep", "tmux", "incus", "incusd", "usermod", "visudo", "apt-get",
            "btrfs")
PATH = ".:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT = {"ok": 0, "warning": 1, "error": 2}


def plant(workspace: Path, marks: Path) -> Path:
    """The hostile files; returns the planted network record (a container that never existed)."""
    for name in COMMANDS:
        script = workspace / name
        script.write_text(f"#!/bin/sh\ntouch {marks}/{name}\n")
        script.chmod(0o755)
    (workspace / ".coi.toml").write_text(
        f'[paths]\nsessions_dir = "{workspace}/state"\n'
        f'[incus]\ngroup = "root"\nproject = "theirs"\n'
        f'[network]\nprivileged_command = ["{workspace}/sudo"]\n'
        f'[defaults]\nimage = "their-image"\n')
    record = workspace / "state" / "network" / f"{TEST_PREFIX}planted-{uuid.uuid4().hex[:6]}.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"backend": "nftables", "watcher": 1,
                                  "attachment": {"ipv4": "192.0.2.9", "veth": "ctdplanted"}}))
    return record


def assert_untouched(proc: subprocess.CompletedProcess[str], workspace: Path, marks: Path, record: Path) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert proc.returncode == EXIT[report["status"]]
    assert sorted(os.listdir(marks)) == []  # no planted command ran
    assert record.exists()  # the planted state was neither read as coi's nor "cleaned"
    assert str(workspace) not in proc.stdout and "theirs" not in proc.stdout and "their-image" not in proc.stdout
    assert not any(record.stem in f["message"] for f in report["fixes"])


@pytest.fixture
def trusting_user(coi_user):
    """The test user, whose own config trusts workspace configs: doctor still does not read them."""
    yield from configured(coi_user, "[defaults]\ntrust_workspace_config = true\n")


@pytest.fixture
def marks(coi_user) -> Iterator[Path]:
    """Where a planted command that ran leaves its mark (the test user's, so it can)."""
    path = coi_user.workspace(f"marks-{uuid.uuid4().hex[:6]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_doctor_fix_in_a_hostile_project_as_its_user(trusting_user, workspace, marks):
    record = plant(workspace, marks)
    for path in (workspace, *workspace.rglob("*")):
        os.chown(path, trusting_user.uid, trusting_user.gid)
    proc = trusting_user.run(["doctor", "--fix", "--format", "json"], cwd=workspace, env={"PATH": PATH})
    assert_untouched(proc, workspace, marks, record)


def test_sudo_doctor_fix_in_a_hostile_project(incus, workspace, marks, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("runs coi doctor --fix as root")
    from coi.network import ADDRESS_LOCK

    record = plant(workspace, marks)
    lock_before = os.lstat(ADDRESS_LOCK) if os.path.lexists(ADDRESS_LOCK) else None
    coi = shutil.which("coi")
    assert coi, "coi is not installed"
    proc = subprocess.run([coi, "doctor", "--fix", "--format", "json"], cwd=workspace, capture_output=True,
                          text=True, timeout=300,
                          env={"HOME": str(tmp_path), "PATH": PATH, "LANG": "C.UTF-8",
                               "COI_CONTAINER_PREFIX": TEST_PREFIX})
    assert_untouched(proc, workspace, marks, record)
    # Its group = "root" would have made --fix give the shared lock to another group.
    after = os.lstat(ADDRESS_LOCK) if os.path.lexists(ADDRESS_LOCK) else None
    if lock_before is not None:
        assert after is not None and (after.st_gid, after.st_mode) == (lock_before.st_gid, lock_before.st_mode)
