"""What every step of ``coi setup`` shares: its result (``Step``), the callback that
reports one, and how a step runs a host command (an argv list, never a shell)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from coi.errors import CoiError

RUN_SETUP = "run 'sudo coi setup'"


@dataclass(frozen=True)
class Step:
    """One set-up step: what it is about and what happened."""

    name: str
    changed: bool
    detail: str


Report = Callable[[Step], None]


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a host command to its end; the caller looks at the exit code."""
    return subprocess.run(argv, check=False, text=True, **kw)


def apt(args: list[str], what: str) -> None:
    """``apt-get -y ARGS`` with no questions; a failure shows apt's last lines."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = run(["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args], env=env,
               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise CoiError(f"{what} failed (apt-get exit {proc.returncode}):\n{tail}",
                       "check the package sources, then run 'sudo coi setup' again")


def systemd_runs() -> bool:
    """Whether systemd manages this host (containers in CI often have no init system)."""
    return Path("/run/systemd/system").is_dir()


def require_root() -> None:
    if os.geteuid() != 0:
        raise CoiError("coi setup must run as root: it installs packages and configures Incus",
                       RUN_SETUP)
