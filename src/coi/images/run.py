"""Running commands in a builder: the one place the image build execs.

``run_in_builder`` runs a build step through Incus's own client (``incus exec``)
so its output streams line by line; ``capture`` asks a short question through
the REST API. Both follow coi's one policy for a command Incus lost
(``coi.incus.failures``).
"""

from __future__ import annotations

import shlex
import subprocess
from typing import TYPE_CHECKING, Mapping

from coi.errors import CoiError
from coi.images.log import Log
from coi.incus.failures import EXEC_NOT_STARTED, LOST, again_while_lost

if TYPE_CHECKING:
    from coi.incus import IncusClient

def run_in_builder(client: IncusClient, builder: str, command: list[str], *, env: Mapping[str, str] | None = None,
                   cwd: str = "/root", record: Log, output: Log | None = None, idempotent: bool = False) -> int:
    """Run ``command`` as root in ``builder``; its exit code. Output goes to ``record``
    (the log file; ``$ <command>`` first) and, indented, to ``output``.

    Lost-PID policy (coi's one, ``coi.incus.failures``): when Incus loses track of
    the command (exit code 255 and ``EXEC_NOT_STARTED`` in its output), an
    ``idempotent`` command is asked for again; any other command is never run twice,
    and its 255 is returned. Raises CoiError when the ``incus`` client is missing.
    """
    def attempt() -> object:
        argv = client.exec_argv(builder, command, user=0, group=0, cwd=cwd, env=env, terminal=False)
        record("$ " + shlex.join(command))
        code, lost = _stream(argv, record=record, output=output)
        return LOST if lost and idempotent else code
    return again_while_lost(attempt, what=f"{builder} to run a build step")


def _stream(argv: list[str], *, record: Log, output: Log | None) -> tuple[int, bool]:
    """Exit code of ``argv`` (an ``incus exec``), and whether Incus lost track of its command."""
    lost = False
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise CoiError(f"the '{argv[0]}' command is not installed",
                       "coi streams build steps through Incus's own client: run 'sudo coi setup'") from None
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lost = lost or EXEC_NOT_STARTED in line
            record(line)
            if output is not None:
                output("    " + line)
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return code, code == 255 and lost


def capture(client: IncusClient, builder: str, command: list[str]) -> tuple[int, str]:
    """Exit code and standard output of a short command in ``builder`` (as root).

    Lost-PID policy: ``Incus.exec`` with ``retry`` (asked again), so only commands
    that are harmless to run twice go here.
    """
    result = client.exec(builder, command)
    return result.exit_code, result.stdout
