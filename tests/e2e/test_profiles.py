"""Profiles, resource limits and the untrusted workspace file, against real containers."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture
def profile_user(session_user, coi_user):
    extra = coi_user.workspace()
    cfg = session_user.home / ".config" / "coi" / "config.toml"
    original = cfg.read_text()
    cfg.write_text(original + f"""
[profiles.small]
environment = {{ PROFILE_VAR = "from profile $x" }}
mounts = [{{ host = "{extra}", container = "/extra" }}]
limits = {{ memory = "256MiB", processes = 300, cpu = "1" }}

[profiles.broken]
limits = {{ memory = "lots" }}
""")
    yield session_user, extra
    cfg.write_text(original)


def test_profile_environment_mounts_and_limits_reach_the_container(profile_user, workspace):
    user, extra = profile_user
    cg = "/sys/fs/cgroup"  # cgroup v2, or the v1 controllers some hosts (this one) still use
    probe = (f"cat {cg}/memory.max 2>/dev/null || cat {cg}/memory/memory.limit_in_bytes; "
             f"cat {cg}/pids.max 2>/dev/null || cat {cg}/pids/pids.max; "
             'nproc; printf %s "$PROFILE_VAR"; touch /extra/x')
    proc = user.run(["run", "--profile", "small", "--", "sh", "-c", probe], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(256 * 1024 * 1024), "300", "1", "from profile $x"]
    assert (extra / "x").exists()


def test_list_shows_limits_and_resume_reapplies_the_profile(profile_user, workspace, incus):
    user, _ = profile_user
    name = user.background(workspace, "--profile", "small", "--debug")["container"]
    assert "Limits: cpu=1, memory=256MiB, processes=300" in user.run(["list"], cwd=workspace).stdout
    assert user.run(["shutdown", name, "--timeout", "20"], cwd=workspace).returncode == 0
    saved = json.loads(user.run(["list", "--all", "--format", "json"], cwd=workspace).stdout)["saved_sessions"]
    assert saved[0]["profile"] == "small"
    name = user.background(workspace, "--resume", "--debug")["container"]
    assert incus.instance(name)["config"]["limits.memory"] == "256MiB"


@pytest.mark.parametrize("args, message", [
    (["--profile", "broken"], "limits.memory = 'lots' is not a memory size"),
    (["--profile", "nope"], "unknown profile 'nope'"),
])
def test_bad_profiles_are_refused_before_anything_exists(profile_user, workspace, incus, args, message):
    user, _ = profile_user
    proc = user.run(["run", *args, "--", "true"], cwd=workspace)
    assert proc.returncode in (1, 2) and message in proc.stderr, proc.stderr
    assert not [i for i in incus.instances() if i["config"].get("user.coi.workspace") == str(workspace)]


def test_workspace_file_cannot_weaken_the_network_or_mount_outside(session_user, workspace):
    (workspace / ".coi.toml").write_text('[network]\nmode = "open"\n\n[[mounts.default]]\nhost = "/etc"\n'
                                         'container = "/hostetc"\n')
    os.chown(workspace / ".coi.toml", session_user.uid, session_user.gid)
    proc = session_user.run(["config", "show", "--format", "json"], cwd=workspace)
    data = json.loads(proc.stdout)
    assert data["config"]["network"]["mode"] == "restricted" and data["config"]["mounts"]["default"] == []
    assert "ignored network.mode" in proc.stderr and "outside the workspace (/etc)" in proc.stderr
    proc = session_user.run(["run", "--", "test", "-e", "/hostetc"], cwd=workspace)
    assert proc.returncode == 1
