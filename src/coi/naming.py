"""Names coi gives things: containers, tmux sessions, builders.

Pure functions; ``COI_CONTAINER_PREFIX`` lets tests use ``coi-test-`` so they
never touch a user's own sessions.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

DEFAULT_PREFIX = "coi-"
CONFIG_PREFIX = "user.coi."
_SLOT_RE = re.compile(r"-(\d+)$")


def container_prefix(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("COI_CONTAINER_PREFIX") or DEFAULT_PREFIX


def workspace_hash(workspace: str) -> str:
    """First 8 hex digits of SHA-256 over the absolute path (symlinks kept)."""
    import hashlib  # imported here: coi list never needs it

    return hashlib.sha256(os.path.abspath(workspace).encode()).hexdigest()[:8]


def container_name(workspace: str, slot: int, *, prefix: str) -> str:
    return f"{prefix}{workspace_hash(workspace)}-{slot}"


def slot_of(name: str) -> int | None:
    match = _SLOT_RE.search(name)
    return int(match.group(1)) if match else None


def tmux_session(container: str) -> str:
    return f"coi-{container}"


def builder_name(prefix: str) -> str:
    """A throw-away build container, under the same prefix as sessions."""
    return f"{prefix}build-{os.urandom(4).hex()}"
