"""Commands in a session container: as user ``code`` with its groups, with the
environment passed in a file, behind the run-once guard, captured, streamed or
attached to the terminal.

Incus's lost-PID error (``incus.EXEC_NOT_STARTED``): Incus sometimes says it lost a
command it did start. coi's one policy for it: a command that is harmless to run
twice (``true``, ``tmux has-session``, ``tmux attach``) is simply asked for again
(``Incus.exec(retry=True)``, ``run_attached(again_if_lost=True)``); every other
command runs behind the run-once guard (``data/run-once.sh``, ``once_argv``), so that
asking again can only recover its exit status, never start it a second time.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from coi.errors import CoiError, OperationFailedError
from coi.sessions.spec import WORKSPACE, tmux_env

if TYPE_CHECKING:
    from coi.incus import IncusClient
    from coi.messages import Log

# Loads the environment file written next to a command (see ``env_via_file``), removes
# it, and runs the command. A second start after Incus lost track of the first finds
# the file gone and goes on to the command's own guard.
_ENV_LOADER = 'if [ -f "$0" ]; then . "$0"; fi; rm -f "$0"; exec "$@"'


def env_file_text(env: Mapping[str, str]) -> bytes:
    """``export KEY='value'`` lines a POSIX shell reads back byte for byte."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items()).encode()


def env_via_file(client: IncusClient, name: str, command: list[str], env: Mapping[str, str], *, uid: int) -> list[str]:
    """``command`` with ``env`` set from a file written through the REST API, so that no
    value (an API key given with ``--env``) appears in a process list on the host, as the
    arguments of ``incus exec`` would."""
    path = f"/tmp/.coi-env-{os.urandom(8).hex()}"
    client.push_file(name, path, env_file_text(env), uid=uid, gid=uid, mode=0o600)
    return ["sh", "-c", _ENV_LOADER, path, *command]


def as_user(command: list[str], *, uid: int, gid: int | None = None) -> list[str]:
    """``command`` run as ``uid`` with that user's full group list, as a login gives it
    (``docker``, ``sudo``): Incus's own ``user``/``group`` start a process with no
    supplementary groups. Run the result as root; ``setpriv`` drops to the user."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}", "--init-groups", "--",
            *command]


def exec_code(client: IncusClient, name: str, argv: list[str], *, code_uid: int, cwd: str = WORKSPACE,
              capture: bool = True, retry: bool = True):
    return client.exec(name, as_user(argv, uid=code_uid), env=tmux_env(), cwd=cwd, capture=capture,
                       retry=retry)


# The run-once guard's own lines (data/run-once.sh writes them to stderr).
_LOST = "coi: the command had already started once; its exit status is unknown"
_RECOVERED = "coi: Incus lost track of the command; its exit status was recovered, its output may be incomplete"
GUARD = Path(__file__).resolve().parent.parent / "data" / "run-once.sh"


@lru_cache(maxsize=1)
def guard_script() -> str:
    """``data/run-once.sh`` without its comment lines (it goes on a command line)."""
    lines = GUARD.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#")) + "\n"


def once_argv(command: list[str], *, terminal: bool = False) -> list[str]:
    """``command`` behind the guard that never starts it twice (``data/run-once.sh``)."""
    return ["sh", "-c", guard_script(), f"/tmp/.coi-run-{os.urandom(8).hex()}",
            "terminal" if terminal else "recorded", *command]


def captured(client: IncusClient, name: str, argv: list[str], **kw: Any) -> Any:
    """``Incus.exec`` of a guarded command (``once_argv``), captured. Incus answers a
    command that exits 127 with "Command not found" instead of its result: that is
    the command's own exit code 127, given back as a result like any other."""
    from coi.errors import CommandNotFoundError
    from coi.incus import ExecResult

    try:
        return client.exec(name, argv, **kw)
    except CommandNotFoundError:
        return ExecResult(127, "", "command not found\n")


def lost_track(exit_code: int, stderr: str) -> CoiError | None:
    """The error to report when a second start found the first one's exit status unknown."""
    if exit_code == 254 and _LOST in stderr:
        return OperationFailedError("Incus lost track of the command after starting it; its result is unknown",
                                    "look at its effects in the workspace, then run it again if needed")
    return None


def guard_lines(stderr: str) -> list[str]:
    """The guard's own lines in ``stderr`` (shown as coi's, not the command's)."""
    return [line for line in stderr.splitlines() if line in (_LOST, _RECOVERED)]


def _warning(guard_line: str) -> str:
    return guard_line.removeprefix("coi: ")


def checked_stderr(result: Any, warn: Log) -> str:
    """A captured guarded run: raise when its result was lost, warn when it was
    recovered; the command's own stderr."""
    error = lost_track(result.exit_code, result.stderr)
    if error:
        raise error
    guard = guard_lines(result.stderr)
    for line in guard:
        warn(_warning(line))
    return "".join(l for l in result.stderr.splitlines(keepends=True) if l.rstrip("\n") not in guard)


def run_streamed(argv: list[str], *, timeout: float | None, warn: Log, stdin: bool = False) -> int:
    """Run ``incus exec`` of a ``once_argv`` command with output streamed; its exit code.

    The command reads coi's stdin when that is a terminal or ``stdin`` is set.

    stderr is relayed line by line so that Incus's "lost the PID" failure can be
    recognised and the run asked for again (``incus.failures.again_while_lost``); the
    guard of ``once_argv`` makes sure the command itself never starts twice (raises
    ``lost_track``'s error if it had).
    """
    from coi.incus.failures import again_while_lost

    return again_while_lost(lambda: _stream_once(argv, timeout=timeout, warn=warn, stdin=stdin),
                            what="Incus to run the command")


def _stream_once(argv: list[str], *, timeout: float | None, warn: Log, stdin: bool) -> Any:
    """One run of ``run_streamed``: the exit code, or ``LOST`` when Incus lost the command."""
    import subprocess
    import threading

    from coi.incus.failures import EXEC_NOT_STARTED, LOST

    proc = subprocess.Popen(argv, stdin=None if stdin or sys.stdin.isatty() else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen: list[bytes] = []

    def relay() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            if EXEC_NOT_STARTED.encode() in line or guard_lines(line.decode(errors="replace")):
                seen.append(line)
            else:
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
    relayer = threading.Thread(target=relay, daemon=True)
    relayer.start()
    try:
        code = proc.wait(timeout=timeout)
    except BaseException:
        proc.terminate()  # incus passes TERM on: the command ends, not only its client
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    relayer.join()
    told = b"".join(seen).decode(errors="replace")
    error = lost_track(code, told)
    if error:
        raise error
    if _RECOVERED in told:
        warn(_warning(_RECOVERED))
        return code
    return LOST if code == 255 and EXEC_NOT_STARTED in told else code


def run_attached(argv: list[str], *, again_if_lost: bool = False) -> int:
    """Hand the terminal to ``argv`` (``incus exec -t``) until it returns.

    ``again_if_lost``: for ``tmux attach``, which is harmless to run twice: a failure
    within ``ATTACH_RETRY_WINDOW`` (Incus's "Failed to retrieve PID" under load, say)
    tries once more instead of leaving the person outside a running session (the
    narrow rule of coi's lost-command policy, ``coi.incus.failures``).
    """
    import subprocess

    from coi.incus.failures import ATTACH_RETRY_WINDOW

    started = time.monotonic()
    code = subprocess.run(argv).returncode
    if again_if_lost and code != 0 and time.monotonic() - started < ATTACH_RETRY_WINDOW:
        code = subprocess.run(argv).returncode
    return code
