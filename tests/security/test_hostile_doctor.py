"""The hostile project against ``coi doctor --fix``, run in its directory: its .coi.toml
cannot point doctor at other paths, groups, projects or commands to "fix", even for a
user who trusts workspace configs, and no command is found in it through a relative
PATH entry. (Without a daemon: the report is caught where it is made; the real run is
in test_hostile_doctor_real.py.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import coi.host
from coi.cli.main import main
from coi.config import load_config
from coi.host import Check, Health

pytestmark = pytest.mark.unit

COMMANDS = ("nft", "ip", "sudo", "systemctl", "pgrep", "tmux", "incus", "usermod", "visudo", "apt-get")


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch) -> Path:
    """A project directory (the current one) whose .coi.toml points everything doctor uses
    elsewhere, with commands of doctor's names planted in it, for a user whose own config
    trusts workspace files."""
    home, project = tmp_path / "home", tmp_path / "project"
    (home / ".config" / "coi").mkdir(parents=True)
    (home / ".config" / "coi" / "config.toml").write_text("[defaults]\ntrust_workspace_config = true\n")
    project.mkdir()
    marker = tmp_path / "pwned"
    for name in COMMANDS:
        script = project / name
        script.write_text(f"#!/bin/sh\ntouch {marker}\n")
        script.chmod(0o755)
    (project / ".coi.toml").write_text(
        f'[paths]\nsessions_dir = "{project}/state"\n'
        f'[incus]\ngroup = "root"\nproject = "theirs"\n'
        f'[network]\nprivileged_command = ["{project}/sudo"]\n'
        f'[defaults]\nimage = "their-image"\n')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join([".", "bin", "", os.environ.get("PATH", "")]))
    monkeypatch.chdir(project)
    return project


@pytest.fixture
def seen(monkeypatch) -> dict:
    """What doctor's service is given, and how PATH finds commands while it runs."""
    seen: dict = {}

    def diagnose(client, config, *, fix):
        seen.update(config=config, project=client.project, fix=fix, path=os.environ["PATH"],
                    found={name: shutil.which(name) for name in COMMANDS})
        return Health([Check("daemon", "ok", "x")])
    monkeypatch.setattr(coi.host, "diagnose", diagnose)
    return seen


def test_a_project_s_config_has_no_say_in_what_doctor_fixes(hostile, seen):
    assert main(["doctor", "--fix", "--format", "json"]) == 0
    config = seen["config"]
    assert seen["fix"] is True
    assert config == load_config(workspace=None, env=os.environ).config  # the host's and the user's own only
    assert not str(config.paths.sessions_dir).startswith(str(hostile))
    assert config.incus.group != "root" and seen["project"] != "theirs"
    assert all(str(hostile) not in part for part in config.network.privileged_command)
    assert config.defaults.image != "their-image"


def test_no_command_is_found_in_the_project(hostile, seen):
    main(["doctor", "--fix"])
    assert all(os.path.isabs(entry) for entry in seen["path"].split(os.pathsep))
    assert not any(found and Path(found).resolve().parent == hostile for found in seen["found"].values())
    assert not (hostile.parent / "pwned").exists()


def test_a_broken_project_config_does_not_break_doctor(hostile, seen):
    (hostile / ".coi.toml").write_text("[paths\nthis is not TOML")
    assert main(["doctor", "--format", "json"]) == 0
    assert seen["config"] == load_config(workspace=None, env=os.environ).config
