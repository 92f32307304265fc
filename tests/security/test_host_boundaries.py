"""Unit-level cases of the host boundaries: the state directory, mount sources,
the environment file, the watcher's start, and clean-up across projects."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from coi import network, sessions
from coi.sessions import commands
from coi.errors import CoiError
from coi.statedir import check_state_dir

pytestmark = pytest.mark.unit


# ---- the state directory ----------------------------------------------------------------

def test_state_dir_is_made_private(tmp_path):
    state = tmp_path / "home" / ".coi"
    check_state_dir(state)
    assert state.stat().st_mode & 0o777 == 0o700


def test_a_wider_state_dir_of_the_users_own_is_narrowed(tmp_path):
    state = tmp_path / ".coi"
    (state / "network").mkdir(parents=True)
    os.chmod(state, 0o755)
    os.chmod(state / "network", 0o777)
    check_state_dir(state)
    assert state.stat().st_mode & 0o777 == 0o700 and (state / "network").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("layout", ["inside", "around", "same", "via-link"])
def test_a_state_dir_a_container_sees_is_refused(tmp_path, layout):
    workspace = tmp_path / "project"
    workspace.mkdir()
    state = {"inside": workspace / ".coi", "around": tmp_path, "same": workspace,
             "via-link": tmp_path / "link" / ".coi"}[layout]
    if layout == "via-link":
        (tmp_path / "link").symlink_to(workspace)
    with pytest.raises(CoiError, match="which a container can write"):
        check_state_dir(state, exposed=[workspace])


def test_a_link_in_the_state_dir_is_refused(tmp_path):
    state = tmp_path / ".coi"
    state.mkdir()
    (state / "network").symlink_to(tmp_path)
    with pytest.raises(CoiError, match="symbolic link"):
        check_state_dir(state)


def test_someone_elses_state_dir_is_refused(tmp_path, monkeypatch):
    state = tmp_path / ".coi"
    state.mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(state).st_uid + 1)
    with pytest.raises(CoiError, match="not to you"):
        check_state_dir(state)


# ---- mount sources ----------------------------------------------------------------------

def _instance(**devices):
    return {"name": "coi-test-abc-1", "devices": devices}


def test_mount_sources_are_recorded_without_links(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    from coi.config import Mount

    _, devices = sessions.container_spec(
        image="coi", workspace=tmp_path / "alias", slot=1, session_id="s", persistent=False, tool="claude",
        mounts=[Mount(tmp_path / "alias", "/data")], storage=None, host_uid=1000, host_gid=1000, code_uid=1000,
        shift=True, base_config={})
    assert devices["workspace"]["source"] == devices["mount1"]["source"] == str(real)
    sessions.check_mount_sources(_instance(**devices))


@pytest.mark.parametrize("swap", ["link", "parent-link", "missing", "file"])
def test_a_mount_source_swapped_since_creation_is_refused(tmp_path, swap):
    data = tmp_path / "ws" / "data"
    data.mkdir(parents=True)
    device = {"type": "disk", "source": str(data), "path": "/data"}
    sessions.check_mount_sources(_instance(mount1=device))
    data.rmdir()
    if swap == "link":
        data.symlink_to(Path.home())
    elif swap == "parent-link":
        (tmp_path / "elsewhere" / "data").mkdir(parents=True)
        (tmp_path / "ws").rmdir()
        (tmp_path / "ws").symlink_to(tmp_path / "elsewhere")
    elif swap == "file":
        data.write_text("x")
    with pytest.raises(CoiError, match="will not start"):
        sessions.check_mount_sources(_instance(mount1=device))


def test_pool_volumes_and_the_root_disk_are_not_host_paths():
    sessions.check_mount_sources(_instance(root={"type": "disk", "pool": "coi", "path": "/"},
                                           vol={"type": "disk", "pool": "coi", "source": "vol1", "path": "/v"}))


# ---- the environment file ------------------------------------------------------------------

NASTY = {"QUOTES": "it's \"quoted\"", "SUBST": "$(touch /tmp/x) `id` ${HOME}", "LINES": "one\ntwo\n",
         "EMPTY": "", "BACKSLASH": "a\\b\\", "UNICODE": "grüße ✓"}


def test_the_environment_file_arrives_byte_for_byte(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_bytes(sessions.env_file_text(NASTY))
    script = ". " + str(env_file) + "; for k in " + " ".join(NASTY) + "; do eval printf '%s\\\\0' \\\"\\${$k}\\\"; done"
    out = subprocess.run(["sh", "-c", script], capture_output=True, env={"PATH": os.environ["PATH"]}).stdout
    assert out.decode().split("\0")[:-1] == list(NASTY.values())


class _Files:
    def __init__(self):
        self.pushed = []

    def push_file(self, name, path, content, *, uid=0, gid=0, mode=0o644):
        self.pushed.append((path, content, uid, mode))


def test_env_via_file_keeps_values_out_of_the_argv():
    fake = _Files()
    argv = sessions.env_via_file(fake, "c", ["make", "test"], {"API_KEY": "secret-value"}, uid=1000)
    assert not any("secret-value" in a for a in argv)
    (path, content, uid, mode), = fake.pushed
    assert argv[-2:] == ["make", "test"] and path in argv and path.startswith("/tmp/.coi-env-")
    assert b"secret-value" in content and (uid, mode) == (1000, 0o600)


def test_the_loader_runs_the_command_and_removes_the_file(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_bytes(sessions.env_file_text({"V": "x y"}))
    argv = ["sh", "-c", commands._ENV_LOADER, str(env_file), "sh", "-c", 'printf %s "$V"']
    assert subprocess.run(argv, capture_output=True, text=True).stdout == "x y"
    assert not env_file.exists()
    # A second start (Incus lost track of the first) finds no file and still runs the command.
    assert subprocess.run(argv, capture_output=True, text=True).returncode == 0


# ---- the watcher -----------------------------------------------------------------------------

def test_the_watcher_runs_isolated():
    argv = network.watcher_argv("coi-test-abc-1", Path("/home/u/.coi"))
    assert argv[1:4] == ["-I", "-m", "coi.network.watcher"]
    assert "PYTHONPATH" not in network.WATCHER_ENV and "PATH" not in network.WATCHER_ENV
