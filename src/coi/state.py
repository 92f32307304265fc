"""Saved session state on the host: ``<sessions_dir>/sessions-<tool>/<id>/``.

A save copies the agent's state directory out of the container (running or
stopped) into a temporary directory, writes ``metadata.json``, and only then
renames it into place, so an interrupted save never destroys the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coi.errors import CoiError, NotFoundError, UsageError
from coi.incus import Incus
from coi.tools import Tool

CODE_HOME = "/home/code"


def check_session_id(value: str) -> str:
    """A session id must be a UUID: no path is ever built from anything else."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise UsageError(f"{value!r} is not a session id (a UUID)", "see 'coi list --all' for saved sessions") from None
    return str(parsed)


def sessions_root(sessions_dir: Path, tool: str) -> Path:
    return sessions_dir / f"sessions-{tool}"


@dataclass(frozen=True)
class SavedSession:
    path: Path
    metadata: dict[str, Any]

    @property
    def session_id(self) -> str:
        return self.metadata["session_id"]

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_session(client: Incus, container: str, *, tool: Tool, sessions_dir: Path,
                 metadata: dict[str, Any]) -> SavedSession:
    """Copy the agent's state out of ``container`` and record ``metadata``.

    Credentials are left out: they are injected fresh on every start.
    """
    session_id = check_session_id(metadata["session_id"])
    root = sessions_root(sessions_dir, metadata["tool"])
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    target = root / session_id
    staging = Path(tempfile.mkdtemp(prefix=f".{session_id}.", dir=root))
    try:
        try:
            client.pull_tree(container, f"{CODE_HOME}/{tool.state_dir}", staging / "state")
        except NotFoundError:
            (staging / "state").mkdir()  # the agent never wrote any state
        for rel in tool.credential_files:
            inside = Path(rel).relative_to(tool.state_dir) if rel.startswith(tool.state_dir + "/") else None
            if inside is not None:
                (staging / "state" / inside).unlink(missing_ok=True)
        data = dict(metadata, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_json_atomic(staging / "metadata.json", data)
        os.chmod(staging, 0o700)
        old = None
        if target.exists():
            old = root / f".{session_id}.old.{os.getpid()}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SavedSession(target, data)


def load(path: Path) -> SavedSession | None:
    try:
        return SavedSession(path, json.loads((path / "metadata.json").read_text()))
    except (OSError, ValueError):
        return None


def saved_sessions(sessions_dir: Path, tool: str | None = None) -> list[SavedSession]:
    """All saved sessions (of one tool, or every tool), oldest first."""
    roots = [sessions_root(sessions_dir, tool)] if tool else sorted(sessions_dir.glob("sessions-*"))
    found = [s for root in roots if root.is_dir() for p in root.iterdir()
             if not p.name.startswith(".") and (s := load(p)) is not None]
    return sorted(found, key=lambda s: s.metadata.get("saved_at", ""))


def find_session(sessions_dir: Path, tool: str, *, session_id: str | None, workspace: Path) -> SavedSession:
    """A given session (must exist), or the latest of ``workspace`` only."""
    if session_id:
        sid = check_session_id(session_id)
        found = load(sessions_root(sessions_dir, tool) / sid)
        if found is None:
            raise NotFoundError(f"no saved session {sid}", "see 'coi list --all'")
        return found
    mine = [s for s in saved_sessions(sessions_dir, tool) if s.metadata.get("workspace") == str(workspace)]
    if not mine:
        raise NotFoundError(f"no saved session for workspace {workspace}",
                            "start one with 'coi shell'; sessions are saved when they end")
    return mine[-1]


def update_metadata(saved: SavedSession, **changes: Any) -> None:
    _write_json_atomic(saved.path / "metadata.json", dict(saved.metadata, **changes))


def delete_saved(saved: SavedSession) -> None:
    if not saved.path.is_dir():
        raise CoiError(f"{saved.path} is not a saved session")
    shutil.rmtree(saved.path)
