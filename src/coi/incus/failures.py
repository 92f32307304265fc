"""Incus's failures, each mapped to a typed ``coi.errors`` exception in one place."""

from __future__ import annotations

from typing import Any, Mapping

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
