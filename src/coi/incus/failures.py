"""Incus's failures, each mapped to a typed ``coi.errors`` exception in one place."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from coi.errors import (
    CommandNotFoundError,
    ConflictError,
    ExecLostError,
    ImageNotFoundError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
)

SETUP_HINT = "run 'sudo coi setup' to install and start Incus"


GROUP_HINT = (
    "join the Incus admin group ('sudo usermod -aG incus-admin $USER'), "
    "then log out and in again"
)


# What Incus says when it lost the PID of a command it was starting (seen while
# a container boots, and under load). Usually the command did not run, but not
# always: only a command that is safe to run twice may simply be tried again.
EXEC_NOT_STARTED = "Failed to retrieve PID of executing child process"

# ---- coi's one policy for a command Incus lost ----------------------------------------
#
# A command Incus lost is asked for again, for up to LOST_RETRY_SECONDS, only when asking
# again cannot run it twice: it is harmless to repeat (``true``, ``tmux has-session``,
# a build step marked idempotent), or it runs behind the run-once guard
# (``data/run-once.sh``), which recovers its exit status instead of starting it again.
# Any other command is never asked again: its error says that its result is unknown.
# ``tmux attach`` is the one exception with a narrower rule (``run_attached``): its own
# failures look like Incus's from outside, so it is tried once more, and only when it
# failed within ATTACH_RETRY_WINDOW.
LOST_RETRY_SECONDS = 20.0
ATTACH_RETRY_WINDOW = 2.0  # seconds: a tmux attach that failed this fast was Incus's failure
LOST = object()  # what one attempt returns when Incus lost the command


def again_while_lost(attempt: Callable[[], Any], *, what: str) -> Any:
    """The result of ``attempt`` (one run of a command that may be asked for again, see
    above), run again while it returns ``LOST``; TimedOutError after LOST_RETRY_SECONDS."""
    from coi.wait import wait_for

    def once() -> tuple[Any] | None:
        result = attempt()
        return None if result is LOST else (result,)
    return wait_for(once, timeout=LOST_RETRY_SECONDS, what=what)[0]


def _raise_for(status: int, payload: Mapping[str, Any], what: str) -> None:
    """Map an Incus error response to coi's error tree (the one place)."""
    reason = str(payload.get("error") or f"HTTP {status}")
    lowered = reason.lower()
    if status == 404:
        raise NotFoundError(f"{what}: not found")
    if "command not found" in lowered:
        raise CommandNotFoundError(f"{what}: {reason}")
    if "not found" in lowered:
        raise NotFoundError(f"{what}: {reason}")
    if EXEC_NOT_STARTED in reason:
        raise ExecLostError(f"{what}: {reason}")
    if "image not provided" in lowered:
        raise ImageNotFoundError(f"{what}: {reason}")
    if status == 409 or "already exists" in lowered or "unique constraint failed" in lowered:
        raise ConflictError(f"{what}: {reason}")
    if status == 403:
        raise PermissionDeniedError(f"{what}: {reason}", GROUP_HINT)
    raise OperationFailedError(f"{what}: {reason}")
