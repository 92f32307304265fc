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


class ImageNotFoundError(NotFoundError):
    """Incus has no image under the name a container was to be created from."""


class CommandNotFoundError(NotFoundError):
    """The command to run in a container does not exist there."""


class ConflictError(CoiError):
    """The thing already exists or is in a state that forbids the operation."""


class DaemonUnavailableError(CoiError):
    """The Incus daemon is not installed, not running, or not answering."""


class PermissionDeniedError(CoiError):
    """The user may not talk to the Incus daemon (socket permission)."""


class OperationFailedError(CoiError):
    """Incus accepted a request but the operation failed; carries its reason."""


class ExecLostError(OperationFailedError):
    """Incus lost the PID of a command it was starting: whether it ran is unknown
    (see ``coi.sessions.commands`` for what coi does about it)."""


class TimedOutError(CoiError):
    """Something waited for did not happen in time (what, and how long, in the message)."""


class ConfigError(CoiError):
    """A configuration file or value is wrong."""


class TooLargeError(CoiError):
    """Something read from a container is bigger than coi allows (a save's size limit)."""
