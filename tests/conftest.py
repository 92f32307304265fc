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
    from coi.errors import NotFoundError

    for img in client.images():
        if any(a["name"].startswith(TEST_PREFIX) for a in img.get("aliases") or []):
            try:
                client.delete_image(img["fingerprint"])
            except NotFoundError:
                pass  # removed meanwhile


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
    """A normal user set up the way people are: 'sudo coi setup' run on their behalf."""
    user = _user(TEST_USER, [])
    proc = subprocess.run(["coi", "setup", "--user", TEST_USER], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return user


@pytest.fixture(scope="session")
def outsider() -> User:
    """A normal user outside the Incus admin group."""
    return _user(OUTSIDER, [])


@pytest.fixture
def workspace(coi_user):
    path = coi_user.workspace()
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- sessions: the test image with the stand-in agent -----------------------------

SANDBOX_IMAGE = "coi-sandbox-test"  # cached across runs like the base image; rebuilt when its inputs change
IMAGES_DIR = Path(__file__).parent / "images"


def sandbox_script() -> str:
    """The build script: the image set-up plus the stand-in agent installed as fake-claude."""
    agent = (IMAGES_DIR / "fake-claude").read_text()
    return ((IMAGES_DIR / "sandbox.sh").read_text()
            + "\ncat > /usr/local/bin/fake-claude <<'COI_AGENT'\n" + agent + "COI_AGENT\n"
            + "chmod 0755 /usr/local/bin/fake-claude\n")


@pytest.fixture(scope="session")
def sandbox_image(incus, base_image, tmp_path_factory):
    """An image for session tests, built with coi's own 'build custom' code."""
    import hashlib

    script = sandbox_script()
    digest = hashlib.sha256(script.encode()).hexdigest()[:16]
    if incus.image_exists(SANDBOX_IMAGE):
        if incus.image_by_alias(SANDBOX_IMAGE).get("properties", {}).get("coi.test_inputs") == digest:
            return SANDBOX_IMAGE
    from coi.config import default_config
    from coi.images import build_custom

    path = tmp_path_factory.mktemp("sandbox") / "sandbox.sh"
    path.write_text(script)
    info = build_custom(incus, name=SANDBOX_IMAGE, script=path, base=base_image, force=True,
                        config=default_config(env=os.environ), log=print)
    incus.update_image_properties(info["fingerprint"], {"coi.test_inputs": digest})
    return SANDBOX_IMAGE


@pytest.fixture
def session_user(coi_user, sandbox_image):
    """The test user, configured to use the test image and the stand-in agent."""
    cfg = coi_user.home / ".config" / "coi"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_text(
        f'[defaults]\nimage = "{sandbox_image}"\n\n[tool]\nbinary = "fake-claude"\n')
    for p in (coi_user.home / ".config", cfg, cfg / "config.toml"):
        os.chown(p, coi_user.uid, coi_user.gid)
    yield coi_user
    # Remove every coi-test- container the test left (sessions of this user).
    subprocess.run(coi_user.argv(["coi", "kill", "--all", "--force"]), capture_output=True)
    shutil.rmtree(coi_user.home / ".coi", ignore_errors=True)


# ---- images: the full coi image -----------------------------------------------------


@pytest.fixture(scope="session")
def coi_image(incus, base_image):
    """The real ``coi`` image, built by coi's own code once and reused while its inputs
    (build script, tools, code uid, base, host CA certificates) are unchanged."""
    from coi.config import default_config
    from coi.errors import NotFoundError
    from coi.images import COI_ALIAS, build_coi, coi_inputs_hash

    config = default_config(env=os.environ)
    tools = list(config.build.tools)
    wanted = coi_inputs_hash(tools=tools, config=config)
    try:
        have = (incus.image_by_alias(COI_ALIAS).get("properties") or {}).get("coi.inputs")
    except NotFoundError:
        have = None
    if have != wanted:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("COI_CONTAINER_PREFIX", TEST_PREFIX)  # the builder is a coi-test- container
            build_coi(incus, force=True, tools=tools, config=config, log=print)
    return COI_ALIAS
