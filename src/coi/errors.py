"""The one error tree of coi.

Every failure a user can cause or meet is a CoiError: a plain message and,
where it helps, a hint. The CLI prints them once at the top level.
"""

from __future__ import annotations


class CoiError(Exception):
    """A failure to show the user: ``Error: <message>`` and an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CoiError):
    """Bad command-line usage (exit code 2)."""

    exit_code = 2


class NotFoundError(CoiError):
    """A named thing (container, image, session, network...) does not exist."""


class ConflictError(CoiError):
    """The thing already exists or is in a state that forbids the operation."""


class DaemonUnavailableError(CoiError):
    """The Incus daemon is not installed, not running, or not answering."""


class PermissionDeniedError(CoiError):
    """The user may not talk to the Incus daemon (socket permission)."""


class OperationFailedError(CoiError):
    """Incus accepted a request but the operation failed; carries its reason."""


class ConfigError(CoiError):
    """A configuration file or value is wrong."""


class TooLargeError(CoiError):
    """Something read from a container is bigger than coi allows (a save's size limit)."""
