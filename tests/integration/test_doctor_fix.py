"""'sudo coi doctor --fix' against the real daemon and nftables: each test breaks something
it can put back (the shared address lock, nft rules of a container that never existed,
coi's profile in an Incus project of its own), doctor reports it, --fix repairs it, and
doctor then finds it whole. Everything the tests make carries the coi-test- prefix and
is removed afterwards, also on failure."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import ADMIN_GROUP, TEST_PREFIX

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="these repairs need root (scripts/test.sh runs as root)")]

EXIT = {"ok": 0, "warning": 1, "error": 2}


def doctor(home: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """``coi doctor ARGS --format json`` as root, with a home of the test's own (so root's
    own state is left alone); the report, after checking the exit code matches it."""
    coi = shutil.which("coi")
    assert coi, "coi is not installed"
    proc = subprocess.run([coi, "doctor", *args, "--format", "json"], capture_output=True, text=True, timeout=300,
                          env={"HOME": str(home), "LANG": "C.UTF-8", "COI_CONTAINER_PREFIX": TEST_PREFIX,
                               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert proc.returncode == EXIT[report["status"]], (proc.returncode, report["status"])
    return report


def check(report: dict, name: str) -> dict:
    [found] = [c for c in report["checks"] if c["name"] == name]
    return found


def fix_for(report: dict, name: str) -> dict:
    [found] = [f for f in report["fixes"] if name in f["checks"]]
    return found


def test_fix_makes_the_missing_address_lock_again(incus, tmp_path, address_lock_away):
    lock = address_lock_away
    assert check(doctor(tmp_path), "address lock")["status"] == "warning"
    report = doctor(tmp_path, "--fix")
    fixed = fix_for(report, "address lock")
    assert fixed["status"] == "fixed" and str(lock) in fixed["message"], fixed
    st = os.lstat(lock)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_gid == grp.getgrnam(ADMIN_GROUP).gr_gid
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert check(report, "address lock")["status"] == "ok"


def _ruled() -> set[str]:
    from coi import network

    proc = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True, check=True)
    return network.containers_in_ruleset(json.loads(proc.stdout or "{}"))


def test_fix_removes_the_rules_of_a_container_that_is_gone(incus, tmp_path):
    """Rules for a container that never existed, on a documentation subnet and an interface
    that does not exist either, so no real traffic is ever matched."""
    from coi.network import helper

    name, tag = f"{TEST_PREFIX}orphan-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    helper.execute({"action": "apply", "container": name, "ipv4": "192.0.2.77", "veth": f"ctd{tag}",
                    "gateway": "192.0.2.1", "subnet": "192.0.2.0/24", "mode": "restricted"})
    try:
        assert name in _ruled()
        assert check(doctor(tmp_path), "network rules")["status"] == "warning"
        report = doctor(tmp_path, "--fix")
        fixed = fix_for(report, "network rules")
        assert fixed["status"] == "fixed" and name in fixed["message"], fixed
        assert name not in _ruled()
        assert check(report, "network rules")["status"] == "ok"
    finally:
        helper.execute({"action": "remove", "container": name})


def _incus(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["incus", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def bare_project(incus):
    """An Incus project with profiles of its own and no coi profile (images, storage and
    networks are the default project's); removed afterwards with what --fix made in it."""
    project = f"{TEST_PREFIX}doctor-{uuid.uuid4().hex[:6]}"
    _incus("project", "create", project, "-c", "features.profiles=true", "-c", "features.images=false",
           "-c", "features.storage.volumes=false", "-c", "features.networks=false")
    try:
        yield project
    finally:
        _incus("profile", "delete", "coi", "--project", project, check=False)
        _incus("project", "delete", project, check=False)


def test_fix_makes_coi_s_profile_where_it_is_missing(incus, tmp_path, bare_project):
    env = {"COI_INCUS_PROJECT": bare_project}
    before = check(doctor(tmp_path, env=env), "profile")
    assert before["status"] == "error" and "does not exist" in before["message"], before
    report = doctor(tmp_path, "--fix", env=env)
    assert fix_for(report, "profile")["status"] == "fixed"
    assert check(report, "profile")["status"] == "ok"
    shown = json.loads(_incus("query", f"/1.0/profiles/coi?project={bare_project}").stdout)
    assert shown["devices"]["eth0"]["network"] == "coibr0" and shown["devices"]["root"]["path"] == "/"
    assert shown["devices"]["root"]["pool"] in {p["name"] for p in incus.storage_pools()}
