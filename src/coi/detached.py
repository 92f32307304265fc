"""coi's own host processes that outlive the ``coi`` that started them (the network
watcher, the session timer): started detached, found again and checked by pid.

Each is isolated Python (``python -I -m MODULE ...``), in a session of its own, cwd
``/``, stdin closed, its output appended to a log file coi owns, with only the named
variables of coi's environment and the system's PATH: nothing of a workspace reaches it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def start(argv: list[str], *, log: Path, keep_env: Iterable[str], client: Any = None) -> int:
    """Start ``argv`` detached; returns its pid. ``client``: the Incus client whose socket
    the process is to use too (``INCUS_SOCKET``)."""
    env = {k: os.environ[k] for k in keep_env if k in os.environ}
    env["PATH"] = SYSTEM_PATH
    socket_path = getattr(client, "path", None)
    if socket_path:
        env["INCUS_SOCKET"] = socket_path
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        proc = subprocess.Popen(argv, cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    return proc.pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; one of our own children is reaped)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def argv_of(pid: int) -> list[bytes]:
    """The process's command line ([b""] when it has none: gone, a zombie, or not exec'd yet)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return [b""]
