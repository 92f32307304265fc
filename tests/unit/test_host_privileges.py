"""What coi setup lets a user do as root: the launcher, sudoers and drop-in texts, the
legacy-grant match and the path checks (table-driven, no root needed), and the grant
step on temporary files."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from coi.errors import CoiError
from coi.host import Step, privileges
from coi.host.privileges import (
    dropin_text,
    grant_path,
    helper_inputs,
    launcher_text,
    legacy_grant_user,
    path_problem,
    sudoers_rule,
    untrusted_paths,
)

pytestmark = pytest.mark.unit

HELPER = "/usr/local/libexec/coi/coi-nft"


# ---- texts ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("interpreter", "root"), [
    ("/opt/coi/bin/python", "/opt/coi/lib/python3.11/site-packages"),
    ("/usr/bin/python3", "/usr/lib/python3/dist-packages"),
    ("/x", "/it's/quoted"),
])
def test_launcher_text(interpreter, root):
    assert launcher_text(interpreter, root) == (
        f"#!{interpreter} -I\n"
        "# coi's privileged nftables helper, written by 'coi setup' (see coi.network.helper).\n"
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from coi.network.helper import main\n"
        "sys.exit(main())\n")


@pytest.mark.parametrize("interpreter", [
    "python3", "./python3", "/opt/my coi/python", "/x\n-c", "/x\t", "/" + "p" * 200, "",
])
def test_launcher_refuses_an_interpreter_a_shebang_cannot_name(interpreter):
    with pytest.raises(CoiError):
        launcher_text(interpreter, "/x")


@pytest.mark.parametrize(("uid", "helper", "rule", "name"), [
    (1234, HELPER, f'#1234 ALL=(root) NOPASSWD: {HELPER} ""\n', "coi-1234"),
    (0, "/h/coi-nft", '#0 ALL=(root) NOPASSWD: /h/coi-nft ""\n', "coi-0"),
    ("1000", HELPER, f'#1000 ALL=(root) NOPASSWD: {HELPER} ""\n', "coi-1000"),  # a number, whatever its type
])
def test_sudoers_rule_and_grant_path(uid, helper, rule, name):
    assert sudoers_rule(uid, helper) == rule
    assert grant_path(uid) == Path("/etc/sudoers.d") / name and "." not in name
    assert grant_path(uid, Path("/tmp/s")) == Path("/tmp/s") / name


@pytest.mark.parametrize("uid", ["1000 ALL=(ALL) ALL", "x", 1.5j])
def test_a_uid_must_be_a_number(uid):
    with pytest.raises((ValueError, TypeError)):
        sudoers_rule(uid, HELPER)


@pytest.mark.parametrize("helper", [HELPER, "/h/coi-nft"])
def test_dropin_text(helper):
    assert dropin_text(helper) == ("# Written by coi setup: load coi's bridge gate before Incus starts containers.\n"
                                   f"[Service]\nExecStartPre={helper} --gate\n")


@pytest.mark.parametrize(("text", "user"), [
    pytest.param("alice ALL=(root) NOPASSWD: /usr/sbin/nft\n", "alice", id="as-written"),
    pytest.param("alice ALL=(root) NOPASSWD: /usr/sbin/nft", "alice", id="no-newline"),
    pytest.param("a.b ALL=(root) NOPASSWD: /sbin/nft\n", "a.b", id="dotted-user"),
    pytest.param("alice ALL=(root) NOPASSWD: /usr/sbin/nft list ruleset\n", None, id="with-arguments"),
    pytest.param("alice ALL=(root) NOPASSWD: nft\n", None, id="relative-nft"),
    pytest.param("alice ALL=(ALL) NOPASSWD: /usr/sbin/nft\n", None, id="any-target"),
    pytest.param("alice ALL=(root) NOPASSWD: /usr/sbin/nft\nbob ALL=(ALL) ALL\n", None, id="more-lines"),
    pytest.param("", None, id="empty"),
])
def test_legacy_grant_user(text, user):
    assert legacy_grant_user(text) == user


# ---- who could change what the launcher runs ---------------------------------------------------

def st(kind: int, mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((kind | mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(("st_", "problem"), [
    pytest.param(st(stat.S_IFREG, 0o644), None, id="root-file"),
    pytest.param(st(stat.S_IFREG, 0o755), None, id="root-executable"),
    pytest.param(st(stat.S_IFDIR, 0o755), None, id="root-dir"),
    pytest.param(st(stat.S_IFDIR, 0o1777), None, id="sticky-tmp"),
    pytest.param(st(stat.S_IFLNK, 0o777), None, id="root-link"),
    pytest.param(st(stat.S_IFREG, 0o664), "/p is writable by group or others", id="group-writable"),
    pytest.param(st(stat.S_IFREG, 0o646), "/p is writable by group or others", id="world-writable"),
    pytest.param(st(stat.S_IFDIR, 0o777), "/p is writable by group or others", id="open-dir"),
    pytest.param(st(stat.S_IFREG, 0o600, uid=1000), "/p is owned by uid 1000, not root", id="user-file"),
    pytest.param(st(stat.S_IFLNK, 0o777, uid=1000), "/p is owned by uid 1000, not root", id="user-link"),
])
def test_path_problem(st_, problem):
    assert path_problem(Path("/p"), st_) == problem


def test_untrusted_paths_looks_at_every_parent_once(monkeypatch):
    tree = {"/": st(stat.S_IFDIR, 0o755), "/opt": st(stat.S_IFDIR, 0o777),
            "/opt/coi": st(stat.S_IFDIR, 0o755, uid=1000), "/opt/coi/a": st(stat.S_IFREG, 0o644)}
    looked: list[str] = []

    def lstat(path):
        looked.append(str(path))
        if str(path) not in tree:
            raise FileNotFoundError(path)
        return tree[str(path)]
    monkeypatch.setattr(os, "lstat", lstat)
    assert untrusted_paths([Path("/opt/coi/a"), Path("/opt/coi/b")]) == [
        "/opt/coi is owned by uid 1000, not root", "/opt is writable by group or others", "/opt/coi/b is missing"]
    assert sorted(looked) == sorted(set(looked))


def test_helper_inputs_are_the_interpreter_its_venv_the_package_and_pth_files(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3.11").write_text("")
    (venv / "bin" / "python").symlink_to("python3.11")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    site = venv / "lib" / "site-packages"
    (site / "coi" / "host").mkdir(parents=True)
    (site / "coi" / "__init__.py").write_text("")
    (site / "coi" / "host" / "__init__.py").write_text("")
    (site / "b.pth").write_text("")
    (site / "a.pth").write_text("")
    (site / "other.py").write_text("")
    paths = helper_inputs(venv / "bin" / "python", site / "coi")
    assert paths[:4] == [venv / "bin" / "python", (venv / "bin" / "python3.11").resolve(), venv / "pyvenv.cfg",
                         site / "coi"]
    assert set(paths[4:-2]) == {site / "coi" / "__init__.py", site / "coi" / "host",
                                site / "coi" / "host" / "__init__.py"}
    assert paths[-2:] == [site / "a.pth", site / "b.pth"]


# ---- the grant, on temporary files ----------------------------------------------------------------

@pytest.fixture
def as_root_files(monkeypatch):
    """visudo says yes and chown is a no-op, so the grant step runs without root; returns the argv run."""
    runs: list[list[str]] = []
    monkeypatch.setattr(privileges, "run", lambda argv, **kw: runs.append(argv) or subprocess.CompletedProcess(argv, 0))
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: None)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    return runs


def test_network_privileges_grant_the_helper_and_say_so_in_the_system_config(tmp_path, as_root_files):
    import pwd

    uid = pwd.getpwnam("nobody").pw_uid
    helper, sudoers, config = tmp_path / "coi-nft", tmp_path / "sudoers.d", tmp_path / "etc" / "config.toml"
    helper.write_text("#!/bin/false\n")
    sudoers.mkdir()
    (sudoers / "coi-nft-nobody").write_text("nobody ALL=(root) NOPASSWD: /usr/sbin/nft\n")
    steps: list[Step] = []
    privileges.ensure_network_privileges("nobody", steps.append, helper=helper, sudoers_dir=sudoers,
                                         system_config=config)
    assert sorted(p.name for p in sudoers.iterdir()) == [f"coi-{uid}"]
    assert (sudoers / f"coi-{uid}").read_text() == sudoers_rule(uid, str(helper))
    assert stat.S_IMODE((sudoers / f"coi-{uid}").stat().st_mode) == 0o440
    assert as_root_files == [["visudo", "-cf", str(sudoers / f".coi-{uid}.tmp")]]
    assert 'privileged_command = ["sudo", "-n"]' in config.read_text()
    assert [s.changed for s in steps] == [True, True, True]


@pytest.mark.skipif(os.geteuid() != 0, reason="a grant is in place only when root owns it")
def test_network_privileges_again_change_nothing(tmp_path, as_root_files):
    helper, config = tmp_path / "coi-nft", tmp_path / "config.toml"
    helper.write_text("#!/bin/false\n")
    config.write_text('[network]\nprivileged_command = ["sudo", "-n"]\n')
    for _ in range(2):
        steps: list[Step] = []
        privileges.ensure_network_privileges("nobody", steps.append, helper=helper, sudoers_dir=tmp_path,
                                             system_config=config)
    assert steps == [Step("isolation", False, f"nobody may run {helper} through sudo -n")]
    assert len(as_root_files) == 1  # visudo, the first time only


@pytest.mark.parametrize("user", [None, "", "root"])
def test_no_grant_for_root_or_nobody_named(tmp_path, as_root_files, user):
    steps: list[Step] = []
    privileges.ensure_network_privileges(user, steps.append, helper=tmp_path / "none", sudoers_dir=tmp_path,
                                         system_config=tmp_path / "config.toml")
    assert steps == [] and as_root_files == [] and not list(tmp_path.iterdir())


def test_no_grant_without_the_helper(tmp_path, as_root_files):
    with pytest.raises(CoiError) as info:
        privileges.ensure_network_privileges("nobody", lambda s: None, helper=tmp_path / "none",
                                             sudoers_dir=tmp_path, system_config=tmp_path / "config.toml")
    assert info.value.hint == "run 'sudo coi setup'"
