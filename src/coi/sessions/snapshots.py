"""Snapshots of a session's container: create, list, restore, delete.

A snapshot is Incus's: the container's own disk (its root file system: installed
packages, code's home with the agent's state, everything outside the mounts), its
config and its devices, at one moment. The workspace and every other mount are host
directories: they are *not* in a snapshot, and a restore does not change them. A
branch session's ``/workspace`` is its copy under coi's state directory, a host
directory too: not in the snapshot either (``coi.branches.copies``).

A restore of a running container stops it, restores it and starts it again through the
start every session takes (``lifecycle.start_isolated``: its network rules go on before
it runs, fail closed), then starts the agent again in tmux as it was before (when a
tmux session was running). While that runs, a lock in the state directory tells a
``coi shell`` or ``coi attach`` attached to the container that the stop is not the
session's end (``being_restored``), so it neither saves nor deletes the container.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from coi import naming
from coi.errors import CoiError, ConflictError, NotFoundError, UsageError
from coi.sessions import containers, lifecycle, signals, spec, tmux
from coi.sessions.lifecycle import Place

if TYPE_CHECKING:
    from coi.config import Config
    from coi.tools import Tool

# Incus refuses '/', '\\', '*', spaces and ".."; coi takes less: a name that is also a plain
# file name, and never an option (a leading '-') or a hidden or relative one (a leading '.').
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(name: str) -> str:
    """A snapshot NAME, checked before Incus is asked anything."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"snapshot name {name!r} is not allowed",
                         "use letters, digits, '.', '_' and '-', at most 63, starting with a letter or digit")
    return name


def generated_name(now: float | None = None) -> str:
    """``snap-YYYYMMDD-HHMMSS`` in UTC, as code-on-incus names them."""
    return time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime(now))


@dataclass(frozen=True)
class Snapshot:
    name: str
    created_at: str  # ISO 8601, as Incus gives it
    stateful: bool  # with the running processes' memory (coi makes none; ``incus snapshot create --stateful`` does)

    @classmethod
    def from_incus(cls, record: Mapping[str, Any]) -> Snapshot:
        return cls(name=str(record.get("name", "")).rsplit("/", 1)[-1], created_at=str(record.get("created_at", "")),
                   stateful=bool(record.get("stateful")))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": self.created_at, "stateful": self.stateful}


@dataclass(frozen=True)
class Listing:
    """``coi snapshot list``: the container and its snapshots, oldest first."""

    container: str
    snapshots: list[Snapshot]

    def to_json(self) -> dict[str, Any]:
        return {"container": self.container, "snapshots": [s.to_json() for s in self.snapshots]}


@dataclass(frozen=True)
class Mounted:
    """A host directory the container mounts: not in a snapshot."""

    path: str  # in the container
    source: str  # on the host
    branch: str | None = None  # a branch session's copy: coi/NAME


@dataclass(frozen=True)
class Created:
    container: str
    snapshot: str
    mounted: list[Mounted]  # what the snapshot does not hold
    ephemeral: bool  # the container (and so the snapshot) goes when its session ends


# ---- which container ---------------------------------------------------------------

def session_container(place: Place, container: str | None) -> dict[str, Any]:
    """The container a snapshot command acts on: ``container`` (refused unless it is one of
    coi's), else the workspace's only session container."""
    client, prefix = place.client, naming.container_prefix()
    if container:
        return containers.coi_container(client, container, prefix)
    mine = sorted((i for i in client.instances(recursion=1) if spec.is_coi(i, prefix)
                   and (i.get("config") or {}).get(f"{spec.KEY}workspace") == str(place.workspace)),
                  key=lambda i: i["name"])
    if not mine:
        raise NotFoundError(f"no session container for {place.workspace}",
                            "start one with 'coi shell', or name a container with --container NAME (see 'coi list')")
    if len(mine) > 1:
        raise UsageError(f"{place.workspace} has {len(mine)} session containers: "
                         + ", ".join(i["name"] for i in mine), "name one with --container NAME")
    return mine[0]


def _snapshots(place: Place, name: str) -> list[Snapshot]:
    """In Incus's order: as they were made (its times may carry any offset: not sorted as text)."""
    return [Snapshot.from_incus(r) for r in place.client.snapshots(name)]


def _find(place: Place, name: str, snapshot: str) -> Snapshot:
    for found in _snapshots(place, name):
        if found.name == snapshot:
            return found
    raise NotFoundError(f"snapshot {snapshot!r} of {name} not found", f"see 'coi snapshot list --container {name}'")


def mounted(inst: Mapping[str, Any]) -> list[Mounted]:
    """The host directories ``inst`` mounts (workspace, --mount, --storage, a branch copy),
    /workspace first: what none of its snapshots holds."""
    branch = (inst.get("config") or {}).get(f"{spec.KEY}branch") or None
    found = []
    for device in (inst.get("devices") or {}).values():
        source = device.get("source", "")
        if device.get("type") == "disk" and not device.get("pool") and source.startswith("/") and device.get("path"):
            path = device["path"]
            found.append(Mounted(path, source, f"coi/{branch}" if branch and path == spec.WORKSPACE else None))
    return sorted(found, key=lambda m: (m.path != spec.WORKSPACE, m.path))


# ---- create, list, delete ------------------------------------------------------------------

def create(place: Place, *, container: str | None, name: str | None) -> Created:
    """A snapshot of the container's disk, config and devices (not its mounts). No NAME: a
    generated one (``-2``, ``-3``... when one of that second exists)."""
    if name is not None:
        check_name(name)
    inst = session_container(place, container)
    cname = inst["name"]
    taken = {s.name for s in _snapshots(place, cname)}
    if name is None:
        base = generated_name()
        name = next(n for n in (base, *(f"{base}-{i}" for i in range(2, 1000))) if n not in taken)
    elif name in taken:
        raise ConflictError(f"snapshot {name!r} of {cname} already exists",
                            f"pick another name, or delete it first: coi snapshot delete {name} --container {cname}")
    with signals.deferred_signals():
        place.client.create_snapshot(cname, name, stateful=False)
    ephemeral = (inst.get("config") or {}).get(f"{spec.KEY}persistent") != "true"
    return Created(cname, name, mounted(inst), ephemeral)


def listing(place: Place, *, container: str | None) -> Listing:
    inst = session_container(place, container)
    return Listing(inst["name"], _snapshots(place, inst["name"]))


def delete(place: Place, *, container: str | None, name: str) -> str:
    """Delete snapshot NAME; returns the container's name."""
    check_name(name)
    cname = session_container(place, container)["name"]
    _find(place, cname, name)
    with signals.deferred_signals():
        place.client.delete_snapshot(cname, name)
    return cname


# ---- restore ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestorePlan:
    """What a restore will do, known before anything changes (the question is asked on it)."""

    inst: dict[str, Any]
    snapshot: Snapshot
    running: bool  # stopped for the restore, started again afterwards
    agent: bool  # a coi tmux session ran in it: the agent is started again
    network: tuple[str, str] | None  # (mode, allowlist_by) of the rules in force now, kept for the start

    @property
    def container(self) -> str:
        return self.inst["name"]


@dataclass(frozen=True)
class Restored:
    container: str
    snapshot: str
    started: bool  # it was running, and runs again (with its network rules)
    network: str  # the network mode it runs with ("" when it was not started)
    agent: bool  # the agent runs again in tmux
    mounted: list[Mounted]


def plan_restore(place: Place, *, container: str | None, name: str) -> RestorePlan:
    check_name(name)
    inst = session_container(place, container)
    cname = inst["name"]
    snapshot = _find(place, cname, name)
    # Incus's status, not is_stopped: after a forced stop volatile.last_state.power can stay
    # RUNNING, and nothing can be run in a container Incus calls Stopped.
    running = inst.get("status") != "Stopped"
    if running and inst.get("ephemeral"):
        raise ConflictError(f"{cname} cannot be restored while it runs: Incus deletes it when it stops "
                            "(it was launched --ephemeral)", f"delete it instead: coi kill {cname}")
    agent = running and f"{spec.KEY}session_id" in (inst.get("config") or {}) and \
        tmux.has_tmux_session(place.client, cname, place.config.incus.code_uid)
    return RestorePlan(inst, snapshot, running, agent, _network_in_force(place, cname) if running else None)


def restore(place: Place, plan: RestorePlan, *, profile_env: Mapping[str, str]) -> Restored:
    """Restore the snapshot of ``plan``: a running container is stopped, restored and started
    again with its network rules (the mode it had), and its agent started again in tmux.
    coi's own records on the container (``user.coi.*``: persistent...) stay as they are now."""
    client, name, snap = place.client, plan.container, plan.snapshot.name
    say = place.messages.info
    with restoring(place.sessions_dir, name):
        if plan.running and not spec.is_stopped(client.instance(name)):  # (it may have stopped since the plan)
            say(f"Stopping {name} to restore it...")
            with signals.deferred_signals():
                client.stop(name, force=True)  # what ran since the snapshot is thrown away anyway
        try:
            with signals.deferred_signals():
                client.restore_snapshot(name, snap)
        except CoiError as exc:
            if plan.running:
                raise CoiError(f"{exc.message} ({name} was stopped for it and is stopped now)",
                               f"start it again as it was: coi container start {name}") from None
            raise
        _keep_records(place, name, plan)
        if not plan.running:
            return Restored(name, snap, False, "", False, mounted(client.instance(name)))
        started = _as_it_ran(place, plan.network)
        say(f"Starting {name} again...")
        _start_again(started, name, snap)
        agent = False
        if plan.agent:
            try:
                _start_agent(started, plan.inst, profile_env)
                agent = True
            except CoiError as exc:
                place.messages.warn(f"the agent did not start again in {name}: {exc.message}")
    return Restored(name, snap, True, started.config.network.mode, agent, mounted(client.instance(name)))


def _keep_records(place: Place, name: str, plan: RestorePlan) -> None:
    """coi's keys as they were before the restore (a ``coi persist`` since the snapshot stays)."""
    then = place.client.instance(name).get("config") or {}
    now = {k: v for k, v in (plan.inst.get("config") or {}).items() if k.startswith(spec.KEY)}
    changed = {k: v for k, v in now.items() if then.get(k) != v}
    if changed:
        place.client.update_instance(name, config=changed)


def _network_in_force(place: Place, name: str) -> tuple[str, str] | None:
    """(mode, allowlist_by) of the rules coi keeps for the running container; None when it
    has no record (rules coi did not put on)."""
    from coi.config import NETWORK_MODES
    from coi.network import Store

    record = Store(place.sessions_dir).record(name) or {}
    mode = record.get("mode")
    if mode not in NETWORK_MODES:
        return None
    return mode, "name" if (record.get("policy") or {}).get("proxy") else "address"


def _as_it_ran(place: Place, network: tuple[str, str] | None) -> Place:
    """``place`` with the network the container had, so its rules go on again as they were
    (a session started with --network keeps it); without a record, the config's, as any start."""
    if network is None:
        return place
    cfg: Config = place.config
    mode, by = network
    changed = dataclasses.replace(cfg.network, mode=mode, **({"allowlist_by": by} if mode == "allowlist" else {}))
    return dataclasses.replace(place, config=dataclasses.replace(cfg, network=changed))


def _start_again(place: Place, name: str, snapshot: str) -> None:
    """The container started through a session's start (rules first, fail closed). A start that
    fails leaves it stopped and without rules: never running unfiltered."""
    try:
        lifecycle.start_isolated(place, name, place.messages.info)
    except BaseException as exc:
        with signals.signals_ignored():
            try:
                if not spec.is_stopped(place.client.instance(name)):
                    place.client.stop(name, force=True)
            finally:
                lifecycle.unisolate(place, name)
        if isinstance(exc, CoiError):
            raise CoiError(f"{name} was restored to {snapshot} but did not start again: {exc.message}",
                           exc.hint or f"it is stopped; start it with: coi container start {name}") from None
        raise


def _start_agent(place: Place, inst: Mapping[str, Any], profile_env: Mapping[str, str]) -> None:
    """The agent in a new tmux session, with fresh credentials (the snapshot's may be stale)."""
    from coi.tools import get_tool

    cfg = inst.get("config") or {}
    name, code_uid = inst["name"], place.config.incus.code_uid
    tool = get_tool(cfg.get(f"{spec.KEY}tool") or place.config.tool.name)
    binary = place.config.tool.binary if tool.name == place.config.tool.name else ""
    lifecycle.push_credentials(place, name, tool, code_uid=code_uid)
    env = spec.agent_environment(term=os.environ.get("TERM"),
                                 extra=lifecycle.session_env(place, profile_env=profile_env))
    tmux.start_tmux(place.client, name, code_uid=code_uid, env=env,
                    command=agent_again(tool, binary=binary, session_id=cfg.get(f"{spec.KEY}session_id")))


def agent_again(tool: Tool, *, binary: str, session_id: str | None) -> list[str]:
    """The tmux command that starts the agent after a restore: Claude Code continues the
    conversation the restored home holds (the one of the snapshot's moment), or starts fresh
    when it holds none; other tools start fresh. bash stays when the agent exits, as always."""
    fresh = tool.command(binary=binary, session_id=session_id)
    if tool.name != "claude":
        return tmux.agent_shell_command(fresh)
    again = tool.command(binary=binary, resume_latest=True)
    transcripts = shlex.quote(f"{spec.CODE_HOME}/{tool.state_dir}/projects/-workspace")  # Claude's /workspace
    return ["bash", "-l", "-c", f'set -- {transcripts}/*.jsonl; if [ -e "$1" ]; then {shlex.join(again)}; '
                                f"else {shlex.join(fresh)}; fi; exec bash -l"]


# ---- the restore's lock ------------------------------------------------------------------

_CONTAINER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")  # Incus instance names


def _lock_path(sessions_dir: Path, name: str) -> Path:
    if not _CONTAINER.fullmatch(name):
        raise UsageError(f"{name!r} is not a container name")
    return Path(sessions_dir) / "locks" / f"restore-{name}.lock"


@contextmanager
def restoring(sessions_dir: Path, name: str) -> Iterator[None]:
    """Held while ``name`` is restored (one restore at a time); released however coi ends."""
    path = _lock_path(sessions_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"{name} is being restored already (another coi snapshot restore)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def being_restored(sessions_dir: Path, name: str) -> bool:
    """Whether a ``coi snapshot restore`` of ``name`` runs now."""
    try:
        path = _lock_path(sessions_dir, name)
        fh = open(path)
    except (OSError, CoiError):
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False
