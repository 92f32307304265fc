"""What a session is, in plain data and pure functions: its container's name, config
and mounts, the agent's environment, the choice of a slot, and the record of a
container that ``coi list`` shows. Nothing here talks to Incus."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping

from coi import naming
from coi.config import Mount, PublishedPort
from coi.errors import CoiError, ConflictError, UsageError
from coi.incus.records import ipv4_addresses

if TYPE_CHECKING:
    from coi.branches.copies import Branch
    from coi.tools import Tool

KEY = naming.CONFIG_PREFIX  # "user.coi."


CODE_HOME = "/home/code"


# A session's time limit, written by coi when its timer starts (``coi.sessions.timer``):
# the limit as configured ("2h") and when it runs out (ISO 8601, UTC). The container can
# read them (Incus's guest API shows user.* keys) but never write them; the timer itself
# trusts only its own record on the host.
MAX_DURATION_KEY = f"{KEY}max_duration"
DEADLINE_KEY = f"{KEY}deadline"
ENDED_KEY = f"{KEY}ended_by"  # "max_duration" while the timer ends the session


WORKSPACE = "/workspace"


STORAGE = "/storage"


MASK_DEVICE = "coi-mask-"  # disk devices that mask a workspace path (coi.sessions.masks)


# tmux keeps its socket in the agent's home: systemd empties /tmp at boot,
# which may happen after coi has already started the session.
TMUX_SOCKET = f"{CODE_HOME}/.tmux-coi.sock"


KNOWN_TERMS = {"xterm", "xterm-256color", "xterm-color", "screen", "screen-256color", "tmux",
               "tmux-256color", "vt100", "vt220", "linux", "dumb", "rxvt", "rxvt-unicode",
               "rxvt-unicode-256color", "ansi"}


# Every container coi starts from a coi image: Docker inside needs nesting and
# these syscall interceptions.
# boot.autostart=false: after a host reboot Incus does not start them again on its own.
CONTAINER_CONFIG = {
    "boot.autostart": "false",
    "security.nesting": "true",
    "security.syscalls.intercept.mknod": "true",
    "security.syscalls.intercept.setxattr": "true",
}


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items (values kept byte for byte); ``KEY`` alone is an error."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r} is not KEY=VALUE", "write it as --env KEY=VALUE")
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UsageError(f"--env {key!r} is not a valid variable name")
        env[key] = value
    return env


def parse_mount(spec: str, *, cwd: Path) -> Mount:
    host, sep, container = spec.rpartition(":")
    if not sep or not host or not container:
        raise UsageError(f"--mount {spec!r} is not HOST:CONTAINER", "for example --mount ~/notes:/notes")
    path = Path(os.path.expanduser(host))
    return Mount(host=path if path.is_absolute() else cwd / path, container=container)


def check_mounts(mounts: list[Mount], *, storage: bool) -> None:
    """Refuse relative, duplicate, nested and /workspace-covering container paths."""
    taken = [PurePosixPath(WORKSPACE)] + ([PurePosixPath(STORAGE)] if storage else [])
    for mount in mounts:
        path = PurePosixPath(mount.container)
        if not path.is_absolute():
            raise UsageError(f"mount target {mount.container!r} is not an absolute container path")
        if ".." in path.parts:
            raise UsageError(f"mount target {mount.container!r} must not contain '..'")
        for other in taken:
            if path == other or other in path.parents or path in other.parents:
                what = "is" if path == other else "overlaps"
                raise UsageError(f"mount target {mount.container} {what} {other}",
                                 "mount targets must not be nested in or over each other or /workspace")
        taken.append(path)


_MEMORY = re.compile(r"\d+(\.\d+)?(B|kB|MB|GB|TB|KiB|MiB|GiB|TiB)?|\d{1,3}%")


_CPUS = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def limits_config(*, cpu: str, memory: str, processes: int, host_cpus: int | None = None) -> dict[str, str]:
    """Incus limits from ``[limits]``; a bad value is refused before anything exists."""
    out: dict[str, str] = {}
    if cpu:
        if not _CPUS.fullmatch(cpu) or (cpu.isdigit() and int(cpu) < 1):
            raise UsageError(f"limits.cpu = {cpu!r} is not a CPU count or set",
                             'use a count such as "2", or CPU numbers such as "0-1" or "0,2"')
        cores = host_cpus or os.cpu_count() or 1
        if cpu.isdigit() and int(cpu) > cores:
            raise UsageError(f"limits.cpu = {cpu} is more than this host's {cores} CPUs")
        out["limits.cpu"] = cpu
    if memory:
        if not _MEMORY.fullmatch(memory) or memory.startswith("0"):
            raise UsageError(f"limits.memory = {memory!r} is not a memory size",
                             'use a size such as "4GiB" or "512MiB", or a share such as "50%"')
        out["limits.memory"] = memory
    if processes < 0:
        raise UsageError(f"limits.processes = {processes} must be 0 (unlimited) or more")
    if processes:
        out["limits.processes"] = str(processes)
    return out


def terminal_type(term: str | None) -> str:
    """A TERM the container knows: unusual host values fall back to xterm-256color."""
    return term if term in KNOWN_TERMS else "xterm-256color"


def agent_environment(*, term: str | None, extra: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment: nothing from the host but what is named."""
    env = {"HOME": CODE_HOME, "USER": "code", "LOGNAME": "code", "SHELL": "/bin/bash",
           "PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "TERM": terminal_type(term), "IS_SANDBOX": "1"}
    env.update(extra)
    return env


def tmux_env() -> dict[str, str]:
    return {"HOME": CODE_HOME, "USER": "code", "PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}


def container_spec(*, image: str, workspace: Path, slot: int, session_id: str, persistent: bool,
                   tool: str, mounts: list[Mount], storage: Path | None, host_uid: int, host_gid: int,
                   code_uid: int, shift: bool, base_config: Mapping[str, str],
                   profile: str | None = None, branch: Branch | None = None,
                   root: Mapping[str, str] | None = None,
                   masks: Mapping[str, Mapping[str, str]] | None = None) -> tuple[dict, dict]:
    """(config, devices) of a session container.

    Workspace ownership: with ``shift`` (idmapped mounts, host uid == code uid)
    the mount is shifted; otherwise ``raw.idmap`` maps the host user's ids to
    ``code``, so files keep the host user as owner either way.

    A branch session (``branch``) gets its copy at /workspace instead of the workspace,
    and the host repository's objects read-only where the copy's alternate finds them.
    ``root``: a root disk of the container's own (``[limits] disk``: the profile's, sized),
    which Incus uses instead of the profile's.
    ``masks``: the devices that mask workspace paths (``coi.sessions.masks.devices``).
    """
    config = dict(base_config)
    config.update({
        f"{KEY}workspace": str(workspace), f"{KEY}slot": str(slot), f"{KEY}session_id": session_id,
        f"{KEY}persistent": "true" if persistent else "false", f"{KEY}tool": tool, f"{KEY}image": image,
        f"{KEY}created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    if profile:
        config[f"{KEY}profile"] = profile
    if branch is not None:
        config[f"{KEY}branch"] = branch.name
    if not shift:
        config["raw.idmap"] = f"uid {host_uid} {code_uid}\ngid {host_gid} {code_uid}"
    disk = {"type": "disk", **({"shift": "true"} if shift else {})}
    # Sources without links (``check_mount_sources`` holds them to that on every start).
    source = branch.copy if branch is not None else workspace
    devices = {"workspace": {**disk, "source": os.path.realpath(source), "path": WORKSPACE}}
    if branch is not None:
        from coi.branches.copies import CONTAINER_OBJECTS

        devices["repo-objects"] = {**disk, "source": os.path.realpath(branch.objects), "path": CONTAINER_OBJECTS,
                                   "readonly": "true"}
    for i, mount in enumerate(mounts, 1):
        devices[f"mount{i}"] = {**disk, "source": os.path.realpath(mount.host), "path": mount.container}
    if storage is not None:
        devices["storage"] = {**disk, "source": os.path.realpath(storage), "path": STORAGE}
    if root is not None:
        devices["root"] = dict(root)
    devices.update({name: dict(spec) for name, spec in (masks or {}).items()})
    return config, devices


def sized_root(profile_root: Mapping[str, str] | None, size: str) -> dict[str, str]:
    """The root disk a container of ``[limits] disk`` gets: the profile's (same pool and
    path), with its own ``size``. Refused when the profile has no root disk to size."""
    if not profile_root or profile_root.get("type") != "disk" or not profile_root.get("pool"):
        raise CoiError("the coi profile has no root disk on a storage pool, so [limits] disk cannot size one",
                       "run 'sudo coi setup' (it gives the profile its root disk)")
    return {**profile_root, "size": size}


def check_mount_sources(instance: Mapping[str, Any]) -> None:
    """Refuse to start a container whose host directories changed since it was created.

    Mount sources are recorded without symbolic links; an agent that swaps a
    mounted directory inside the workspace for a link (to ``~/.ssh``, say)
    would otherwise have the link's target mounted at the next start.
    """
    for device, spec in (instance.get("devices") or {}).items():
        source = spec.get("source", "")
        if spec.get("type") != "disk" or spec.get("pool") or not source.startswith("/"):
            continue
        linked = os.path.realpath(source) != os.path.normpath(source)
        mask = device.startswith(MASK_DEVICE) and os.path.isfile(source)  # coi's empty file
        if linked or not (os.path.isdir(source) or mask):
            now = "a link" if linked else "missing or not a directory"
            raise CoiError(f"mount source {source} of {instance.get('name')} ({device}) is {now} now; "
                           "coi will not start the container with it",
                           f"put the directory back, or remove the container: coi kill {instance.get('name')}")


@dataclass(frozen=True)
class SessionRequest:
    workspace: Path
    slot: int
    persistent: bool
    image: str
    env: dict[str, str]
    mounts: list[Mount]
    storage: Path | None
    tool: Tool
    binary: str
    max_slots: int
    prefix: str
    code_uid: int
    host_uid: int
    host_gid: int
    shift: bool
    lock_dir: Path
    base_config: Mapping[str, str]  # Incus config every session container gets (limits included)
    session_id: str | None = None  # keep this id (resume)
    profile: str | None = None
    branch: Branch | None = None  # a branch session's copy (coi.branches)
    branch_new: bool = False  # the copy was reserved for this session and still has to be filled
    carry: bool = False  # the new copy takes the host's uncommitted changes along
    keep_spare: bool = False  # the new copy may take the workspace's spare ([git] keep_spare)
    ports: tuple[PublishedPort, ...] = ()  # published on the host (coi.sessions.forwards)
    ssh_agent: str | None = None  # the user's agent socket, checked, when it is forwarded
    max_duration: str = ""  # [limits] max_duration as configured ("" = none), checked
    max_seconds: int = 0  # the same in seconds (0 = no limit)
    disk: str = ""  # [limits] disk as configured ("" = the pool's default), checked
    masks: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # devices masking workspace paths
    masked: tuple[str, ...] = ()  # the masked paths, as the start line names them
    carry_excludes: tuple[str, ...] = ()  # git pathspecs: what --carry leaves out of a new copy


@dataclass
class Session:
    name: str
    slot: int
    session_id: str
    persistent: bool
    created: bool  # False when an existing persistent container is reused
    workspace: Path
    ports: tuple[PublishedPort, ...] = ()  # all the container publishes (a reused one may have more)
    ssh_agent: bool = False


def new_session_id() -> str:
    import uuid  # here: it pulls in platform, which coi list does not need

    return str(uuid.uuid4())


def choose_slot(used: set[int], *, wanted: int, max_slots: int) -> int:
    """First free slot, or ``wanted`` / the next free one above it."""
    start = wanted if wanted > 0 else 1
    for slot in range(start, max_slots + 1):
        if slot not in used:
            return slot
    where = f" from {wanted}" if wanted > 0 else ""
    raise ConflictError(f"no free slot{where} (all {max_slots} slots of this workspace are in use)",
                        "end a session (coi list, coi kill NAME) or raise [defaults] max_slots")


@dataclass(frozen=True)
class ContainerInfo:
    """A coi container as ``coi list`` shows it."""

    name: str
    status: str
    created_at: str
    image: str
    persistent: bool
    workspace: str
    slot: int | None
    ipv4: list[str]
    session_id: str
    tool: str
    limits: dict[str, str] = field(default_factory=dict)
    branch: str | None = None  # a branch session's NAME (its branch is coi/NAME)
    refused_connections: int = 0  # refused by coi's egress proxy (allowlist by name)
    ports: tuple[PublishedPort, ...] = ()
    ssh_agent: bool = False  # the user's SSH agent is forwarded
    ends_at: str | None = None  # when its max_duration runs out (ISO 8601, UTC)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "created_at": self.created_at,
                "image": self.image, "persistent": self.persistent, "workspace": self.workspace,
                "slot": self.slot, "ipv4": self.ipv4[0] if self.ipv4 else None,
                "session_id": self.session_id, "tool": self.tool,
                "branch": f"coi/{self.branch}" if self.branch else None,
                "refused_connections": self.refused_connections,
                "ports": [port.to_json() for port in self.ports], "ssh_agent": self.ssh_agent,
                "limits": dict(sorted(self.limits.items())), "ends_at": self.ends_at}


LAUNCHED = f"{KEY}launched"  # set on the containers of ``coi container launch``


def is_launched(instance: Mapping[str, Any]) -> bool:
    """A container ``coi container launch`` made (any name)."""
    return (instance.get("config") or {}).get(LAUNCHED) == "true"


def is_coi(instance: Mapping[str, Any], prefix: str) -> bool:
    """One of coi's containers under ``prefix``: a session's, or one coi launched. Containers
    coi did not create (no ``user.coi.*`` mark) are never coi's, whatever their name."""
    cfg = instance.get("config") or {}
    return instance["name"].startswith(prefix) and (f"{KEY}workspace" in cfg or is_launched(instance))


def launched_config(name: str, *, image: str, ephemeral: bool, prefix: str) -> dict[str, str]:
    """Config of a ``coi container launch`` container: coi's container settings and its mark;
    the slot when the name has coi's form (``<prefix><hash>-<slot>``); kept until deleted
    unless ephemeral."""
    config = {**CONTAINER_CONFIG, LAUNCHED: "true", f"{KEY}image": image,
              f"{KEY}persistent": "false" if ephemeral else "true",
              f"{KEY}created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    slot = naming.slot_of(name)
    if slot is not None and re.fullmatch(rf"{re.escape(prefix)}[0-9a-f]{{8}}-{slot}", name):
        config[f"{KEY}slot"] = str(slot)
    return config


def to_info(instance: Mapping[str, Any]) -> ContainerInfo:
    from coi.sessions import forwards

    cfg = instance.get("config") or {}
    state = instance.get("state") or {}
    ipv4 = ipv4_addresses(state, global_only=False)
    slot = cfg.get(f"{KEY}slot", "")
    return ContainerInfo(
        name=instance["name"], status=instance.get("status", "Unknown"),
        created_at=instance.get("created_at", ""), image=cfg.get(f"{KEY}image", ""),
        persistent=cfg.get(f"{KEY}persistent") == "true", workspace=cfg.get(f"{KEY}workspace", ""),
        slot=int(slot) if slot.isdigit() else None, ipv4=ipv4 if instance.get("status") == "Running" else [],
        session_id=cfg.get(f"{KEY}session_id", ""), tool=cfg.get(f"{KEY}tool", ""),
        limits=limits_of(instance),
        branch=cfg.get(f"{KEY}branch") or None,
        ports=forwards.published(instance), ssh_agent=forwards.agent_forwarded(instance),
        ends_at=(cfg.get(DEADLINE_KEY) or None) if instance.get("status") == "Running" else None,
    )


def limits_of(instance: Mapping[str, Any]) -> dict[str, str]:
    """The limits a container runs with: Incus's ``limits.*`` (cpu, memory, processes), its
    root disk's ``size`` as ``disk``, and the session's ``max_duration``."""
    cfg = instance.get("config") or {}
    limits = {k[len("limits."):]: v for k, v in cfg.items() if k.startswith("limits.")}
    root = (instance.get("expanded_devices") or instance.get("devices") or {}).get("root") or {}
    if root.get("size"):
        limits["disk"] = root["size"]
    if cfg.get(MAX_DURATION_KEY):
        limits["max_duration"] = cfg[MAX_DURATION_KEY]
    return limits


def is_stopped(instance: Mapping[str, Any]) -> bool:
    """Really stopped: while a container powers off, Incus briefly reports
    ``Stopped`` before its stop is done; ``volatile.last_state.power`` says when."""
    power = (instance.get("config") or {}).get("volatile.last_state.power", "STOPPED")
    return instance.get("status") == "Stopped" and power == "STOPPED"
