"""The hostile project, through its own .coi.toml: an allowlist of keys, no expansion
of host values, profiles it names or writes filtered the same way, limits only lower."""

from __future__ import annotations

from pathlib import Path

import pytest

from coi.config import load_config
from configfiles import ConfigFiles

pytestmark = pytest.mark.unit


class Files(ConfigFiles):
    def __init__(self, root: Path) -> None:
        super().__init__(root, env={"SECRET_TOKEN": "s3cr3t", "AWS_SECRET_ACCESS_KEY": "aws"})


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


@pytest.mark.parametrize(("text", "key", "safe"), [
    ('[tool]\nenv_passthrough = ["SECRET_TOKEN", "AWS_SECRET_ACCESS_KEY"]', "tool.env_passthrough", ()),
    ('[paths]\nsessions_dir = "/tmp/in-project"', "paths.sessions_dir", None),
    ('[paths]\nstorage_dir = "/etc"', "paths.storage_dir", None),
    ('[incus]\nproject = "other"', "incus.project", "default"),
    ('[incus]\ncode_uid = 0', "incus.code_uid", 1000),
    ('[incus]\ndisable_shift = true', "incus.disable_shift", False),
    ('[network]\nprivileged_command = ["sh", "-c", "id > /tmp/pwned"]', "network.privileged_command", ()),
    ('[network.logging]\npath = "/home/me/.bashrc"', "network.logging.path", None),
    ('[build]\nbase = "images:evil"', "build.base", ""),
    ('[defaults]\ntrust_workspace_config = true', "defaults.trust_workspace_config", False),
    ('[sessions]\nmax_size = "100GiB"', "sessions.max_size", "512MiB"),
    ('[tool]\nfull_host_config = true', "tool.full_host_config", False),
])
def test_keys_outside_the_allowlist_are_ignored_with_one_line(files, text, key, safe) -> None:
    loaded = files.load(text)
    if safe is not None:
        assert loaded.values[key] == safe
    else:
        assert loaded.origins[key] == "default"
    lines = [w for w in loaded.warnings if "ignored" in w]
    assert len(lines) == 1 and key in lines[0] and "trust_workspace_config" in lines[0]


def test_many_ignored_keys_still_make_one_warning_line(files) -> None:
    loaded = files.load('[tool]\nenv_passthrough = ["SECRET_TOKEN"]\n[paths]\nsessions_dir = "/x"\n'
                        '[incus]\nproject = "p"\n')
    assert len([w for w in loaded.warnings if "ignored" in w]) == 1


def test_workspace_values_get_no_variable_expansion(files) -> None:
    loaded = files.load('[[mounts.default]]\nhost = "$SECRET_TOKEN"\ncontainer = "/a"\n'
                        '[[mounts.default]]\nhost = "${AWS_SECRET_ACCESS_KEY}/x"\ncontainer = "/b"\n'
                        '[[mounts.default]]\nhost = "data"\ncontainer = "/c"\n')
    hosts = [str(m.host) for m in loaded.config.mounts.default]
    assert not any("s3cr3t" in h or "aws" in h.split("/")[-2:] for h in hosts)
    assert hosts == [str(files.workspace / "$SECRET_TOKEN"), str(files.workspace / "${AWS_SECRET_ACCESS_KEY}/x"),
                     str(files.workspace / "data")]


def test_a_tilde_in_a_workspace_mount_is_not_the_users_home(files) -> None:
    loaded = files.load('[[mounts.default]]\nhost = "~/.ssh"\ncontainer = "/keys"\n')
    assert all(files.home / ".ssh" != m.host for m in loaded.config.mounts.default)


def test_the_user_config_still_expands(files) -> None:
    loaded = files.load("", user='[[mounts.default]]\nhost = "~/notes"\ncontainer = "/notes"\n')
    assert loaded.config.mounts.default[0].host == files.home / "notes"


USER_PROFILES = """
[profiles.wide]
network = { mode = "open" }
mounts = [{ host = "~/.ssh", container = "/keys" }]
image = "coi-wide"

[profiles.plain]
image = "coi-plain"
"""


def test_a_profile_the_workspace_names_passes_the_same_filter(files) -> None:
    loaded = files.load('[defaults]\nprofile = "wide"\n', user=USER_PROFILES)
    cfg = loaded.config
    assert cfg.network.mode == "restricted" and cfg.mounts.default == ()
    assert cfg.defaults.image == "coi-wide"  # harmless values of the profile still apply
    assert any("profile wide" in w and "network.mode" in w and "mounts.default" in w for w in loaded.warnings)


def test_a_profile_the_user_picks_is_trusted(files) -> None:
    loaded = load_config(workspace=files.workspace, env=files.env, system_file=files.home / "none.toml",
                         user_file=files.user, flags={"defaults.profile": ("--profile", "wide")}) \
        if files.user.write_text(USER_PROFILES) or True else None
    assert loaded.config.network.mode == "open"


def test_workspace_values_inside_a_user_picked_profile_are_filtered(files) -> None:
    (files.workspace / ".coi.toml").write_text('[profiles.plain.network]\nmode = "open"\n')
    files.user.write_text(USER_PROFILES)
    loaded = load_config(workspace=files.workspace, env=files.env, system_file=files.home / "none.toml",
                         user_file=files.user, flags={"defaults.profile": ("--profile", "plain")})
    assert loaded.config.network.mode == "restricted" and loaded.config.defaults.image == "coi-plain"


@pytest.mark.parametrize(("user", "workspace", "key", "expected"), [
    ('[limits]\nmemory = "2GiB"', '[limits]\nmemory = "1GiB"', "limits.memory", "1GiB"),
    ('[limits]\nmemory = "2GiB"', '[limits]\nmemory = "8GiB"', "limits.memory", "2GiB"),
    ('[limits]\nmemory = "50%"', '[limits]\nmemory = "4GiB"', "limits.memory", "50%"),  # not comparable
    ("", '[limits]\nmemory = "8GiB"', "limits.memory", "8GiB"),  # unlimited before
    ('[limits]\ncpu = "2"', '[limits]\ncpu = "1"', "limits.cpu", "1"),
    ('[limits]\ncpu = "1"', '[limits]\ncpu = "0-3"', "limits.cpu", "1"),
    ('[limits]\nprocesses = 100', '[limits]\nprocesses = 0', "limits.processes", 100),  # 0 = unlimited
    ('[limits]\nprocesses = 100', '[limits]\nprocesses = 50', "limits.processes", 50),
    ('[defaults]\nmax_slots = 3', '[defaults]\nmax_slots = 20', "defaults.max_slots", 3),
    ('[defaults]\nmax_slots = 3', '[profiles.p]\nlimits = { memory = "1GiB" }', "limits.memory", ""),
])
def test_limits_from_the_workspace_may_only_be_lower(files, user, workspace, key, expected) -> None:
    assert files.load(workspace, user=user).values[key] == expected


def test_trust_from_the_users_own_config_lifts_the_filter(files) -> None:
    loaded = files.load('[tool]\nenv_passthrough = ["SECRET_TOKEN"]\n[network]\nmode = "open"\n',
                        user="[defaults]\ntrust_workspace_config = true\n")
    assert loaded.config.tool.env_passthrough == ("SECRET_TOKEN",) and loaded.config.network.mode == "open"
