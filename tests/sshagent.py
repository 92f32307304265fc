"""A real SSH agent of a test user's, with a key the test made (ssh-keygen, no passphrase),
for the SSH agent forwarding tests. Everything is removed again, the agent ended by its pid."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest


@dataclass(frozen=True)
class Agent:
    socket: Path  # what SSH_AUTH_SOCK names
    key: Path  # the private key (stays on the host)
    fingerprint: str  # as ssh-add -l prints it
    comment: str
    public: str  # the public key line

    @property
    def env(self) -> dict[str, str]:
        return {"SSH_AUTH_SOCK": str(self.socket)}

    def secret_line(self) -> str:
        """A line from the middle of the private key: found nowhere but in this file."""
        lines = self.key.read_text().splitlines()
        return lines[len(lines) // 2]


def _as(user: Any, argv: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(user.argv(argv, env=env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{argv[0]}: {proc.stderr}"
    return proc.stdout


@contextmanager
def running_agent(user: Any) -> Iterator[Agent]:
    """``ssh-agent`` run as ``user``, its socket in a directory of the user's (0700), one
    ed25519 key of the test's added to it."""
    for tool in ("ssh-agent", "ssh-keygen", "ssh-add"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/install.sh --test installs openssh-client")
    tag = uuid.uuid4().hex[:8]
    home = Path(user.home) / f".coi-test-ssh-{tag}"
    home.mkdir(mode=0o700)
    os.chown(home, user.uid, user.gid)
    pid = None
    try:
        comment = f"coi-test-key-{tag}"
        key = home / "id_ed25519"
        _as(user, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
        sock = home / "agent.sock"
        said = _as(user, ["ssh-agent", "-s", "-a", str(sock)])  # it forks, says its pid, and is ready
        pid = int(re.search(r"SSH_AGENT_PID=(\d+)", said)[1])
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        _as(user, ["ssh-add", "-q", str(key)], env={"SSH_AUTH_SOCK": str(sock)})
        fingerprint = _as(user, ["ssh-keygen", "-l", "-f", f"{key}.pub"]).split()[1]
        yield Agent(sock, key, fingerprint, comment, (home / "id_ed25519.pub").read_text().strip())
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(home, ignore_errors=True)
