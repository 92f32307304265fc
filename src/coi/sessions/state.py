"""Saved session state on the host: ``<sessions_dir>/sessions-<tool>/<id>/``.

A save copies the agent's state directory out of the container (running or
stopped) into a temporary directory, writes ``metadata.json``, and only then
renames it into place, so an interrupted save never destroys the previous one.

The agent is root in its container and may be hostile, so what comes out is
bounded and tamed: a total size, a number of entries and a depth
(``[sessions]``); only regular files and directories, under names that are
plain file names, with the user's own modes (0600/0700, nothing else);
anything that fails is left out with a warning and the save goes on.

A session keeps its last ``keep`` saves (generations). The newest is where it
always was (``<id>/metadata.json``, ``<id>/state/``); older ones are in
``<id>/generations/<n>/`` (2 = the one before the newest), each with its own
``metadata.json``. An empty state never replaces a save that has files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterable

from coi.errors import CoiError, ConfigError, NotFoundError, TooLargeError, UsageError
from coi.sessions.spec import CODE_HOME
from coi.tools import Tool

if TYPE_CHECKING:
    from coi.incus import IncusClient
    from coi.config import Sessions

GENERATIONS = "generations"
_MAX_NAME = 255  # bytes of one file name, as on Linux file systems
_NOTED = 10  # warnings about single entries per save; further ones are only counted

Warn = Callable[[str], None]


def _quiet(text: str) -> None:
    pass


def check_session_id(value: str) -> str:
    """A session id must be a UUID: no path is ever built from anything else."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise UsageError(f"{value!r} is not a session id (a UUID)", "see 'coi list --all' for saved sessions") from None
    return str(parsed)


def sessions_root(sessions_dir: Path, tool: str) -> Path:
    return sessions_dir / f"sessions-{tool}"


# ---- limits of one save ----------------------------------------------------------

_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str, *, key: str = "sessions.max_size") -> int:
    """``"512MiB"`` -> bytes. Units B, KiB, MiB, GiB (powers of 2), kB, MB, GB (of 10)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text) if isinstance(text, str) else None
    unit = _UNITS.get(match[2].lower() or "b") if match else None
    size = int(float(match[1]) * unit) if match and unit else 0
    if size < 1:
        raise ConfigError(f"{key} = {text!r} is not a size",
                          'use a number and a unit (B, KiB, MiB, GiB, kB, MB, GB), such as "512MiB"')
    return size


@dataclass(frozen=True)
class SaveLimits:
    """Bounds of one save, and how many saves of a session are kept."""

    max_size: int = 512 << 20  # bytes of file content in all
    max_files: int = 20000  # entries (files and directories) read
    max_depth: int = 32  # directory levels below the state dir
    keep: int = 3  # saves (generations) kept per session


def save_limits(sessions: Sessions) -> SaveLimits:
    """The ``[sessions]`` config as SaveLimits (a bad ``max_size`` is a ConfigError)."""
    return SaveLimits(max_size=parse_size(sessions.max_size), max_files=sessions.max_files,
                      max_depth=sessions.max_depth, keep=sessions.keep)


# ---- what may come out of the container ---------------------------------------------

def name_problem(name: object) -> str | None:
    """Why ``name`` (an entry of a directory in the container) cannot be a host file name; None if it can."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if name in (".", ".."):
        return "is . or .."
    if "/" in name or "\0" in name:
        return "has a '/' or NUL in it"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not UTF-8"
    if size > _MAX_NAME:
        return f"is longer than {_MAX_NAME} bytes"
    return None


def _shown(text: object) -> str:
    """A name from the container as it may be printed: quoted, escaped, not too long."""
    text = str(text)
    return repr(text if len(text) <= 100 else text[:100] + "...")


def _printable(text: str) -> str:
    """A message that may quote names from the container, with control characters escaped."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= 300 else text[:300] + "..."


def saved_mode(kind: str, mode: int) -> int:
    """The mode a saved entry gets: the user's alone, executable only if the owner could run it."""
    if kind == "directory":
        return 0o700
    return 0o700 if mode & 0o100 else 0o600


@dataclass(frozen=True)
class CopyReport:
    files: int  # regular files copied
    bytes: int  # their size in all


def _write_private(path: Path, content: bytes, mode: int) -> None:
    """A new file (never an existing one, never through a link) with exactly ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with open(fd, "wb") as fh:
        os.fchmod(fd, mode)  # the umask may have taken bits off
        fh.write(content)


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)


class _Notes:
    """Warnings about single entries: the first few said, the rest counted."""

    def __init__(self, warn: Warn) -> None:
        self.warn, self.said, self.unsaid = warn, 0, 0

    def __call__(self, text: str) -> None:
        if self.said < _NOTED:
            self.warn(text)
            self.said += 1
        else:
            self.unsaid += 1

    def close(self) -> None:
        if self.unsaid:
            self.warn(f"{self.unsaid} more entries of the agent's state were left out")


def copy_state(client: IncusClient, container: str, remote: str, local: Path, *, limits: SaveLimits,
               warn: Warn = _quiet, exclude: Iterable[str] = ()) -> CopyReport:
    """Copy the directory ``remote`` of ``container`` to the new directory ``local``, within ``limits``.

    ``exclude``: paths relative to ``remote`` that are never read (credentials).
    A missing ``remote``, or one that is not a directory, gives an empty copy.
    """
    _make_private_dir(local)
    entries = _top_entries(client, container, remote, warn)
    if entries is None:
        return CopyReport(0, 0)
    walk = _Walk(client, container, remote, local, limits=limits, warn=warn,
                 skip={PurePosixPath(rel) for rel in exclude})
    walk.queue(PurePosixPath(), entries, 1)
    walk.run()
    return walk.finish()


def _top_entries(client: IncusClient, container: str, remote: str, warn: Warn) -> list[Any] | None:
    """The names in the agent's state directory; None when there is nothing to copy."""
    try:
        _, info = client.pull_file(container, remote, max_bytes=0)
    except NotFoundError:
        return None  # the agent never wrote any state
    except TooLargeError:  # a file where the directory should be
        info = {"type": "file"}
    except CoiError as exc:
        warn(f"the agent's state was not saved: {_printable(exc.message)}")
        return None
    if info["type"] != "directory":
        warn(f"{remote} in {container} is not a directory: no state saved")
        return None
    return info.get("entries") or []


class _Walk:
    """One bounded copy of a state directory, depth first in name order: entries are
    queued while the file budget lasts, content copied while the byte budget lasts."""

    def __init__(self, client: IncusClient, container: str, remote: str, local: Path, *,
                 limits: SaveLimits, warn: Warn, skip: set[PurePosixPath]) -> None:
        self.client, self.container, self.remote, self.local = client, container, remote, local
        self.limits, self.warn, self.skip = limits, warn, skip
        self.note = _Notes(warn)
        self.budget = limits.max_files  # entries that may still be queued
        self.left = limits.max_size  # bytes of content that may still be copied
        self.files = 0
        self.too_big: list[str] = []
        self.too_deep: list[str] = []
        self.pending: list[tuple[PurePosixPath, int]] = []  # (path below remote, depth); a stack
        self.full = False

    def queue(self, parent: PurePosixPath, entries: list[Any], depth: int) -> None:
        wanted = []
        for name in entries:
            problem = name_problem(name)
            if problem:
                self.note(f"left out an entry of {_shown(parent)}: its name {_shown(name)} {problem}")
                continue
            if parent / name in self.skip:
                continue
            if self.budget == 0:
                self.full = True
                break
            self.budget -= 1
            wanted.append((parent / name, depth))
        self.pending.extend(reversed(wanted))  # popped in name order

    def run(self) -> None:
        while self.pending and self.left > 0:
            self._copy(*self.pending.pop())

    def _copy(self, rel: PurePosixPath, depth: int) -> None:
        try:
            content, info = self.client.pull_file(self.container, f"{self.remote}/{rel}", max_bytes=self.left)
        except TooLargeError:
            self.too_big.append(str(rel))
            return
        except CoiError as exc:
            self.note(f"left out {_shown(rel)}: {_printable(exc.message)}")
            return
        target = self.local / rel
        try:
            if info["type"] == "file":
                _write_private(target, content, saved_mode("file", info["mode"]))
                self.files += 1
                self.left -= len(content)
            elif info["type"] == "directory":
                _make_private_dir(target)
                entries = info.get("entries") or []
                if depth < self.limits.max_depth:
                    self.queue(rel, entries, depth + 1)
                elif entries:
                    self.too_deep.append(str(rel))
            # symlinks and special files are skipped on purpose: nothing from the
            # container may point a host path somewhere else.
        except OSError as exc:
            self.note(f"left out {_shown(rel)}: {exc.strerror or exc}")

    def finish(self) -> CopyReport:
        self.note.close()
        limits = self.limits
        if self.too_big or self.pending:  # the walk stops with entries pending only when no byte is left
            first = _shown(self.too_big[0] if self.too_big else self.pending[-1][0])
            self.warn(f"sessions.max_size ({limits.max_size} bytes) reached: files of the agent's state left "
                      f"out of the save, the first {first}")
        if self.full:
            self.warn(f"sessions.max_files ({limits.max_files}) reached: the rest of the agent's state is left out")
        if self.too_deep:
            self.warn(f"sessions.max_depth ({limits.max_depth}) reached: {len(self.too_deep)} directories saved "
                      f"without their contents, the first {_shown(self.too_deep[0])}")
        return CopyReport(self.files, limits.max_size - self.left)


# ---- saved sessions and their generations ---------------------------------------------

@dataclass(frozen=True)
class SavedSession:
    path: Path
    metadata: dict[str, Any]
    generation: int = 1  # 1 = the newest save; older ones live in <id>/generations/<n>/

    @property
    def session_id(self) -> str:
        return self.metadata["session_id"]

    def size(self) -> int:
        """Bytes on disk under ``path``: for the newest save, every generation of the session."""
        return _tree_size(self.path)

    def generation_size(self) -> int:
        """Bytes of this save alone: its metadata and state."""
        return _tree_size(self.path / "state") + _tree_size(self.path / "metadata.json")


def _tree_size(path: Path) -> int:
    if path.is_file() and not path.is_symlink():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _has_files(state: Path) -> bool:
    return any(p.is_file() and not p.is_symlink() for p in state.rglob("*"))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_private(tmp, (json.dumps(data, indent=2) + "\n").encode(), 0o600)
    os.replace(tmp, path)


def _generation_dirs(session: Path) -> list[Path]:
    """The directories of a session's saves, newest first: the session dir, then generations/2, 3..."""
    older = session / GENERATIONS
    numbers = sorted(int(p.name) for p in older.iterdir() if re.fullmatch(r"[0-9]+", p.name)) if older.is_dir() else []
    return [session] + [older / str(n) for n in numbers if n >= 2]


def _link_or_copy(src: str, dst: str) -> None:
    """A saved file is never changed in place, so a hard link is as good as a copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_generations(session: Path, staging: Path, keep: int) -> None:
    """Put the previous saves of ``session`` into ``staging`` one generation older.

    The newest becomes 2 and so on up to ``keep``; empty saves and older ones are
    dropped. Linked, not moved: an interrupted save leaves the session as it was.
    """
    previous = [d for d in _generation_dirs(session) if load(d) is not None and _has_files(d / "state")]
    for number, source in enumerate(previous[:keep - 1], start=2):
        dest = staging / GENERATIONS / str(number)
        dest.mkdir(parents=True, mode=0o700)
        os.chmod(dest.parent, 0o700)
        shutil.copytree(source / "state", dest / "state", symlinks=True, copy_function=_link_or_copy)
        _link_or_copy(str(source / "metadata.json"), str(dest / "metadata.json"))


def save_session(client: IncusClient, container: str, *, tool: Tool, sessions_dir: Path,
                 metadata: dict[str, Any], limits: SaveLimits = SaveLimits(),
                 warn: Warn = _quiet) -> SavedSession:
    """Copy the agent's state out of ``container`` as the session's newest save; returns the newest.

    Credentials and logins are left out: they are injected fresh on every start. When the
    agent's state is empty and the newest save is not, that save stays the newest.
    """
    session_id = check_session_id(metadata["session_id"])
    root = sessions_root(sessions_dir, metadata["tool"])
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    target = root / session_id
    staging = Path(tempfile.mkdtemp(prefix=f".{session_id}.", dir=root))
    try:
        report = copy_state(client, container, f"{CODE_HOME}/{tool.state_dir}", staging / "state",
                            limits=limits, warn=warn, exclude=tool.unsaved_files())
        current = load(target)
        if report.files == 0 and current is not None and _has_files(target / "state"):
            warn(f"the agent's state in {container} is empty: the save of "
                 f"{current.metadata.get('saved_at', '?')} stays the newest")
            shutil.rmtree(staging)
            return current
        data = dict(metadata, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_json_atomic(staging / "metadata.json", data)
        if target.is_dir():
            _carry_generations(target, staging, limits.keep)
        os.chmod(staging, 0o700)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{session_id}.old.", dir=root))
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SavedSession(target, data)


def load(path: Path, generation: int = 1) -> SavedSession | None:
    try:
        data = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return SavedSession(path, data, generation) if isinstance(data, dict) else None


def generations(saved: SavedSession) -> list[SavedSession]:
    """Every save of the session of ``saved`` (its newest), newest first."""
    found = [saved]
    for path in _generation_dirs(saved.path)[1:]:
        older = load(path, int(path.name))
        if older is not None:
            found.append(older)
    return found


def saved_sessions(sessions_dir: Path, tool: str | None = None) -> list[SavedSession]:
    """All saved sessions (of one tool, or every tool), oldest first."""
    roots = [sessions_root(sessions_dir, tool)] if tool else sorted(sessions_dir.glob("sessions-*"))
    found = [s for root in roots if root.is_dir() for p in root.iterdir()
             if not p.name.startswith(".") and (s := load(p)) is not None]
    return sorted(found, key=lambda s: s.metadata.get("saved_at", ""))


class NoSavedSession(NotFoundError):
    """The workspace has no saved session at all."""


def find_session(sessions_dir: Path, tool: str, *, session_id: str | None, workspace: Path,
                 generation: int = 1, branch: str | None = None) -> SavedSession:
    """A given session (must exist), or the latest of ``workspace`` only (on copy ``branch``,
    when given); its newest save, or with ``generation`` an older one (2 = the one before
    the newest)."""
    if session_id:
        sid = check_session_id(session_id)
        found = load(sessions_root(sessions_dir, tool) / sid)
        if found is None:
            raise NotFoundError(f"saved session {sid} not found", "see 'coi list --all'")
    else:
        mine = [s for s in saved_sessions(sessions_dir, tool) if s.metadata.get("workspace") == str(workspace)
                and (branch is None or s.metadata.get("branch") == branch)]
        if not mine:
            on = f" on branch coi/{branch}" if branch else ""
            raise NoSavedSession(f"no saved sessions for workspace {workspace}{on}",
                                "start one with 'coi shell'; sessions are saved when they end")
        found = mine[-1]
    if generation == 1:
        return found
    kept = generations(found)
    picked = next((g for g in kept if g.generation == generation), None)
    if picked is None:
        numbers = ", ".join(str(g.generation) for g in kept)
        raise NotFoundError(f"session {found.session_id} has no generation {generation} (it has {numbers})",
                            f"see 'coi info {found.session_id}'")
    return picked


def update_metadata(saved: SavedSession, **changes: Any) -> None:
    _write_json_atomic(saved.path / "metadata.json", dict(saved.metadata, **changes))


def delete_saved(saved: SavedSession) -> None:
    if not saved.path.is_dir():
        raise CoiError(f"{saved.path} is not a saved session")
    shutil.rmtree(saved.path)
