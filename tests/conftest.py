"""Shared fixtures: the real Incus daemon, a normal test user in the Incus
admin group, the test image, and clean-up of everything tests create.

Every container a test makes is named with the ``coi-test-`` prefix, so a
user's own sessions are never touched; a session-wide finaliser removes any
``coi-test-`` container and test image left behind, even after failures.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_PREFIX = "coi-test-"
TEST_USER = "coi-tester"
OUTSIDER = "coi-outsider"  # a user *not* in the Incus admin group
ADMIN_GROUP = "incus-admin"


def pytest_collection_modifyitems(items):
    """Tests carry their tier as a marker; the folder decides when they do not."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("unit", "integration", "e2e")):
            tier = Path(str(item.fspath)).parent.name
            if tier in ("unit", "integration", "e2e"):
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def incus():
    """The real daemon (coi setup must have run: scripts/test.sh does it)."""
    from coi.incus import Incus

    client = Incus.from_environment()
    client.server()  # fails loudly when the daemon is not there
    yield client
    _remove_test_leftovers(client)
    client.close()


def _remove_test_leftovers(client) -> None:
    for inst in client.instances(recursion=1):
        if inst["name"].startswith(TEST_PREFIX):
            subprocess.run(["incus", "delete", "--force", inst["name"]], capture_output=True)
    for img in client.images():
        if any(a["name"].startswith(TEST_PREFIX) for a in img.get("aliases") or []):
            client.delete_image(img["fingerprint"])


@pytest.fixture
def container_name(incus):
    """A fresh test container name; the container is deleted after the test."""
    name = f"{TEST_PREFIX}{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["incus", "delete", "--force", name], capture_output=True)


@pytest.fixture(scope="session")
def base_image(incus):
    """The local Debian base image, built by coi's own code (cached across runs)."""
    from coi.bootstrap import ensure_base

    return ensure_base(incus, "bookworm", log=print)


def _ensure_user(name: str, groups: list[str]) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        pw = pwd.getpwnam(name)
    for group in groups:
        if name not in grp.getgrnam(group).gr_mem:
            subprocess.run(["usermod", "-aG", group, name], check=True)
    return pw


@dataclass
class User:
    """A normal host user that runs ``coi`` the way people do."""

    name: str
    uid: int
    gid: int
    home: Path

    def run(self, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``coi ARGS`` as this user with a clean login-like environment."""
        return subprocess.run(self.argv(["coi", *args], env=env), cwd=cwd or self.home, input=input,
                              capture_output=True, text=True, timeout=timeout)

    def argv(self, command: list[str], *, env: dict[str, str] | None = None) -> list[str]:
        base = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                "COI_CONTAINER_PREFIX": TEST_PREFIX}
        base.update(env or {})
        prefix = [] if os.geteuid() == pwd.getpwnam(self.name).pw_uid else ["runuser", "-u", self.name, "--"]
        return [*prefix, "env", "-i", *(f"{k}={v}" for k, v in base.items()), *command]

    def workspace(self, name: str | None = None) -> Path:
        """A fresh directory owned by this user, removed by the caller's tmp clean-up."""
        path = self.home / "workspaces" / (name or uuid.uuid4().hex[:8])
        path.mkdir(parents=True, exist_ok=True)
        for p in (path, path.parent):
            os.chown(p, self.uid, self.gid)
        return path


def _user(name: str, groups: list[str]) -> User:
    if os.geteuid() != 0:
        pytest.skip("creating test users needs root (scripts/test.sh runs as root)")
    pw = _ensure_user(name, groups)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


@pytest.fixture(scope="session")
def coi_user() -> User:
    """A normal user in the Incus admin group, like the people who run coi."""
    return _user(TEST_USER, [ADMIN_GROUP])


@pytest.fixture(scope="session")
def outsider() -> User:
    """A normal user outside the Incus admin group."""
    return _user(OUTSIDER, [])


@pytest.fixture
def workspace(coi_user):
    path = coi_user.workspace()
    yield path
    shutil.rmtree(path, ignore_errors=True)
