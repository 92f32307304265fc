"""Sessions: containers for one workspace and slot, the agent in tmux inside,
and what happens when a session ends.

The pure parts (names, mounts, environment, the container's config) are
plain functions; the rest takes the Incus client and reports progress
through a ``log`` callback so the CLI decides how to print.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from coi import naming
from coi.config import Mount
from coi.errors import CoiError, ConflictError, NotFoundError, OperationFailedError, UsageError
from coi.incus import Incus
from coi.wait import wait_for

if TYPE_CHECKING:
    from coi.tools import Tool

Log = Callable[[str], None]
KEY = naming.CONFIG_PREFIX  # "user.coi."
CODE_HOME = "/home/code"
WORKSPACE = "/workspace"
STORAGE = "/storage"
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


# ---- pure helpers ----------------------------------------------------------

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


def container_spec(*, image: str, workspace: Path, slot: int, session_id: str, persistent: bool,
                   tool: str, mounts: list[Mount], storage: Path | None, host_uid: int, host_gid: int,
                   code_uid: int, shift: bool, base_config: Mapping[str, str],
                   profile: str | None = None) -> tuple[dict, dict]:
    """(config, devices) of a session container.

    Workspace ownership: with ``shift`` (idmapped mounts, host uid == code uid)
    the mount is shifted; otherwise ``raw.idmap`` maps the host user's ids to
    ``code``, so files keep the host user as owner either way.
    """
    config = dict(base_config)
    config.update({
        f"{KEY}workspace": str(workspace), f"{KEY}slot": str(slot), f"{KEY}session_id": session_id,
        f"{KEY}persistent": "true" if persistent else "false", f"{KEY}tool": tool, f"{KEY}image": image,
        f"{KEY}created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    if profile:
        config[f"{KEY}profile"] = profile
    if not shift:
        config["raw.idmap"] = f"uid {host_uid} {code_uid}\ngid {host_gid} {code_uid}"
    disk = {"type": "disk", **({"shift": "true"} if shift else {})}
    # Sources without links (``check_mount_sources`` holds them to that on every start).
    devices = {"workspace": {**disk, "source": os.path.realpath(workspace), "path": WORKSPACE}}
    for i, mount in enumerate(mounts, 1):
        devices[f"mount{i}"] = {**disk, "source": os.path.realpath(mount.host), "path": mount.container}
    if storage is not None:
        devices["storage"] = {**disk, "source": os.path.realpath(storage), "path": STORAGE}
    return config, devices


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
        if linked or not os.path.isdir(source):
            now = "a link" if linked else "missing or not a directory"
            raise CoiError(f"mount source {source} of {instance.get('name')} ({device}) is {now} now; "
                           "coi will not start the container with it",
                           f"put the directory back, or remove the container: coi kill {instance.get('name')}")


# Loads the environment file written next to a command (see ``env_via_file``), removes
# it, and runs the command. A second start after Incus lost track of the first finds
# the file gone and goes on to the command's own guard.
_ENV_LOADER = 'if [ -f "$0" ]; then . "$0"; fi; rm -f "$0"; exec "$@"'


def env_file_text(env: Mapping[str, str]) -> bytes:
    """``export KEY='value'`` lines a POSIX shell reads back byte for byte."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items()).encode()


def env_via_file(client: Incus, name: str, command: list[str], env: Mapping[str, str], *, uid: int) -> list[str]:
    """``command`` with ``env`` set from a file written through the REST API, so that no
    value (an API key given with ``--env``) appears in a process list on the host, as the
    arguments of ``incus exec`` would."""
    path = f"/tmp/.coi-env-{os.urandom(8).hex()}"
    client.push_file(name, path, env_file_text(env), uid=uid, gid=uid, mode=0o600)
    return ["sh", "-c", _ENV_LOADER, path, *command]


def as_user(command: list[str], *, uid: int, gid: int | None = None) -> list[str]:
    """``command`` run as ``uid`` with that user's full group list, as a login gives it
    (``docker``, ``sudo``): Incus's own ``user``/``group`` start a process with no
    supplementary groups. Run the result as root; ``setpriv`` drops to the user."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}", "--init-groups", "--",
            *command]


def tmux_argv(*args: str) -> list[str]:
    return ["tmux", "-S", TMUX_SOCKET, *args]


def tmux_env() -> dict[str, str]:
    return {"HOME": CODE_HOME, "USER": "code", "PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}


def agent_shell_command(agent: list[str] | None) -> list[str]:
    """bash runs the agent, then stays as the user's shell when the agent exits."""
    if agent is None:
        return ["bash", "-l"]
    return ["bash", "-l", "-c", f"{shlex.join(agent)}; exec bash -l"]


# ---- session records ---------------------------------------------------------

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

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "created_at": self.created_at,
                "image": self.image, "persistent": self.persistent, "workspace": self.workspace,
                "slot": self.slot, "ipv4": self.ipv4[0] if self.ipv4 else None,
                "session_id": self.session_id, "tool": self.tool}


def is_coi(instance: Mapping[str, Any], prefix: str) -> bool:
    cfg = instance.get("config") or {}
    return instance["name"].startswith(prefix) and f"{KEY}workspace" in cfg


def to_info(instance: Mapping[str, Any]) -> ContainerInfo:
    cfg = instance.get("config") or {}
    state = instance.get("state") or {}
    ipv4 = [a["address"] for nic, data in (state.get("network") or {}).items() if nic != "lo"
            for a in data.get("addresses") or [] if a.get("family") == "inet"]
    slot = cfg.get(f"{KEY}slot", "")
    return ContainerInfo(
        name=instance["name"], status=instance.get("status", "Unknown"),
        created_at=instance.get("created_at", ""), image=cfg.get(f"{KEY}image", ""),
        persistent=cfg.get(f"{KEY}persistent") == "true", workspace=cfg.get(f"{KEY}workspace", ""),
        slot=int(slot) if slot.isdigit() else None, ipv4=ipv4 if instance.get("status") == "Running" else [],
        session_id=cfg.get(f"{KEY}session_id", ""), tool=cfg.get(f"{KEY}tool", ""),
        limits={k[len("limits."):]: v for k, v in cfg.items() if k.startswith("limits.")},
    )


def list_containers(client: Incus, prefix: str, *, with_state: bool = True) -> list[ContainerInfo]:
    instances = client.instances(recursion=2 if with_state else 1)
    return sorted((to_info(i) for i in instances if is_coi(i, prefix)), key=lambda c: c.name)


def coi_container(client: Incus, name: str, prefix: str) -> dict[str, Any]:
    """The named instance, refused when it is not one of coi's."""
    try:
        inst = client.instance(name)
    except NotFoundError:
        raise NotFoundError(f"container {name} not found", "see 'coi list'") from None
    if not is_coi(inst, prefix):
        raise CoiError(f"{name} is not a coi container", "coi only acts on containers it created")
    return inst


# ---- slots and creation ---------------------------------------------------------

@contextmanager
def workspace_lock(lock_dir: Path, workspace: Path) -> Iterator[None]:
    """Host-side lock per workspace: slot choice and creation happen under it."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{naming.workspace_hash(str(workspace))}.lock"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


@dataclass
class Session:
    name: str
    slot: int
    session_id: str
    persistent: bool
    created: bool  # False when an existing persistent container is reused
    workspace: Path


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


def _workspace_containers(instances: list[dict[str, Any]], req: SessionRequest) -> dict[int, dict[str, Any]]:
    base = naming.container_name(str(req.workspace), 0, prefix=req.prefix)[:-1]
    out = {}
    for inst in instances:
        slot = naming.slot_of(inst["name"])
        if inst["name"].startswith(base) and slot is not None and inst["name"] == base + str(slot):
            out[slot] = inst
    return out


def _reusable(inst: Mapping[str, Any] | None) -> bool:
    return bool(inst) and (inst.get("config") or {}).get(f"{KEY}persistent") == "true"


def open_session(client: Incus, req: SessionRequest, log: Log) -> Session:
    """Pick the slot and create (or reuse) the container, under the workspace lock.

    The container is created stopped, with its NIC pinned to a free address
    (``coi.network.pin_nic``); anything created here is removed again if
    set-up is interrupted.
    """
    from coi import network

    with workspace_lock(req.lock_dir, req.workspace), network.address_lock(req.lock_dir):
        instances = client.instances(recursion=1)
        existing = _workspace_containers(instances, req)
        if req.persistent:
            if req.slot > 0:
                candidates = [req.slot] if _reusable(existing.get(req.slot)) else []
            else:
                candidates = sorted(s for s, inst in existing.items() if _reusable(inst))
            if candidates:
                slot = candidates[0]
                inst = existing[slot]
                return Session(inst["name"], slot, inst["config"].get(f"{KEY}session_id") or
                               new_session_id(), True, False, req.workspace)
        slot = choose_slot(set(existing), wanted=req.slot, max_slots=req.max_slots)
        if req.slot > 0 and slot != req.slot:
            log(f"Slot {req.slot} is busy; using slot {slot}")
        elif req.slot <= 0:
            log(f"Auto-allocated slot {slot}")
        name = naming.container_name(str(req.workspace), slot, prefix=req.prefix)
        session_id = req.session_id or new_session_id()
        config, devices = container_spec(
            image=req.image, workspace=req.workspace, slot=slot, session_id=session_id,
            persistent=req.persistent, tool=req.tool.name, mounts=req.mounts, storage=req.storage,
            host_uid=req.host_uid, host_gid=req.host_gid, code_uid=req.code_uid, shift=req.shift,
            base_config=req.base_config, profile=req.profile)
        for mount in [*req.mounts, *([Mount(req.storage, STORAGE)] if req.storage else [])]:
            mount.host.mkdir(parents=True, exist_ok=True)
        try:
            create_pinned(client, name, image=req.image, config=config, devices=devices, instances=instances)
        except NotFoundError:
            raise
        except CoiError as exc:
            if "image not provided" in exc.message.lower() and not client.image_exists(req.image):
                raise NotFoundError(f"image {req.image} not found",
                                    "build it with 'coi build'" if req.image == "coi"
                                    else f"build it with 'coi build custom {req.image} --script FILE'") from None
            raise
        return Session(name, slot, session_id, req.persistent, True, req.workspace)


def create_pinned(client: Incus, name: str, *, image: str, config: Mapping[str, str],
                  devices: Mapping[str, Mapping[str, str]], instances: list[dict[str, Any]],
                  ephemeral: bool = False) -> None:
    """``create_container`` with the NIC pinned to a free address (``coi.network.pin_nic``),
    so its rules can go on before it starts. Call under ``network.address_lock`` with a
    fresh list of ``instances``."""
    from coi import network

    config, devices = dict(config), dict(devices)
    pin = network.pin_nic(client, instances)
    if pin:
        config.update(pin.config)
        devices.update(pin.devices)
    create_container(client, name, image=image, config=config, devices=devices, files=pin.files if pin else None,
                     ephemeral=ephemeral)


def launch_container(client: Incus, name: str, *, image: str, ephemeral: bool, lock_dir: Path) -> None:
    """A stopped container of ``coi container launch``: coi's settings and a pinned NIC."""
    from coi import network

    network.check_name(name)
    with network.address_lock(lock_dir):
        create_pinned(client, name, image=image, config=CONTAINER_CONFIG, devices={},
                      instances=client.instances(recursion=1), ephemeral=ephemeral)


def create_container(client: Incus, name: str, *, image: str, config: Mapping[str, str],
                     devices: Mapping[str, Mapping[str, str]], files: Mapping[str, bytes] | None = None,
                     ephemeral: bool = False) -> None:
    """Create a stopped container and write ``files`` (root's, replacing links) into it;
    an interruption meanwhile acts once it exists, and then removes it again."""
    created = False
    try:
        with deferred_signals():
            client.create_instance(name, image=image, profiles=["coi"], config=config, devices=devices,
                                   ephemeral=ephemeral)
            created = True
        for path, content in (files or {}).items():
            try:
                client.delete_file(name, path)
            except NotFoundError:
                pass
            client.push_file(name, path, content, mode=0o644)
    except BaseException:
        if created:
            with signals_ignored():
                remove_container(client, name)
        raise


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl+C, SIGTERM and SIGHUP while the daemon does one thing; they act right after.

    An operation interrupted half-way (request sent, answer unread) would leave
    its result unknown; held, the interruption finds a known state to undo.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def _signal_handlers(handler, signals=_SIGNALS) -> Iterator[None]:
    """Install ``handler`` for ``signals`` for the block, then put the old ones back."""
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def signals_ignored():
    """Ignore Ctrl+C, SIGTERM and SIGHUP for the block: a clean-up that must not be cut short."""
    return _signal_handlers(signal.SIG_IGN)


def interruptible():
    """SIGTERM and SIGHUP (terminal closed) interrupt set-up the way Ctrl+C does."""
    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt
    return _signal_handlers(interrupt, (signal.SIGTERM, signal.SIGHUP))


@contextmanager
def cleanup_on_interrupt(client: Incus, session: Session) -> Iterator[None]:
    """An interruption or failure during set-up removes the container set-up created."""
    try:
        yield
    except BaseException:
        if session.created:
            with signals_ignored():
                remove_container(client, session.name)
        raise


def remove_container(client: Incus, name: str) -> None:
    """Force-stop and delete; a container that is already gone is fine."""
    try:
        if not is_stopped(client.instance(name)):
            client.stop(name, force=True)
        client.delete(name)
    except NotFoundError:
        pass


def ensure_running(client: Incus, name: str) -> None:
    """Start the container if needed (its mount sources checked first) and wait until it
    accepts commands.

    Readiness is proven with ``true``: harmless to run again when Incus loses
    track of it (see ``once_argv``).
    """
    inst = client.instance(name)
    if inst["status"] == "Running":
        return
    check_mount_sources(inst)
    with deferred_signals():
        client.start(name)

    def accepts_exec() -> bool:
        try:
            return client.exec(name, ["true"], capture=False).exit_code == 0
        except OperationFailedError:
            return False  # init not ready yet ("Failed to retrieve PID ...")
    wait_for(accepts_exec, timeout=30, what=f"{name} to accept commands", first_interval=0.02)


def exec_code(client: Incus, name: str, argv: list[str], *, code_uid: int, cwd: str = WORKSPACE,
              capture: bool = True, retry: bool = True):
    return client.exec(name, as_user(argv, uid=code_uid), env=tmux_env(), cwd=cwd, capture=capture,
                       retry=retry)


# A user command wrapped so that it runs at most once: Incus sometimes reports
# that it lost the PID of a command it did run (to its end), and coi then asks
# again. The first start makes the marker directory; a second start only
# reports. Without a terminal the wrapper stays the command's parent, records
# its exit status for that second start, and passes INT, TERM and HUP on as
# TERM (a background child ignores INT). With a terminal the command replaces
# the wrapper (the terminal's signals reach it as usual) and a lost exit status
# stays lost.
_LOST = "coi: the command had already started once; its exit status is unknown"
_RECOVERED = "coi: Incus lost track of the command; its exit status was recovered, its output may be incomplete"
# A second start waits while the first one still runs (its pid is in the marker).
_SECOND_START = ('m=$0; if ! mkdir "$m" 2>/dev/null; then i=0; '
                 'while [ ! -e "$m/rc" ]; do p=$(cat "$m/pid" 2>/dev/null); '
                 'if [ -n "$p" ]; then kill -0 "$p" 2>/dev/null || break; elif [ $i -ge 40 ]; then break; fi; '
                 'i=$((i+1)); sleep 0.05; done; '
                 f'if [ -e "$m/rc" ]; then echo "{_RECOVERED}" >&2; exit "$(cat "$m/rc")"; fi; '
                 f'echo "{_LOST}" >&2; exit 254; fi; echo $$ > "$m/pid"; ')
_ONCE_TERMINAL = _SECOND_START + 'exec "$@"'
_ONCE_RECORDED = _SECOND_START + (
    'exec 3<&0; "$@" <&3 3<&- & p=$!; exec 3<&-; '
    'trap \'kill -TERM $p 2>/dev/null\' INT TERM HUP; '
    'while :; do wait $p; rc=$?; kill -0 $p 2>/dev/null || break; done; '
    'echo $rc > "$m/rc"; exit $rc')


def once_argv(command: list[str], *, terminal: bool = False) -> list[str]:
    """``command`` behind a guard that never starts it twice (see ``lost_track``)."""
    return ["sh", "-c", _ONCE_TERMINAL if terminal else _ONCE_RECORDED,
            f"/tmp/.coi-run-{os.urandom(8).hex()}", *command]


def lost_track(exit_code: int, stderr: str) -> CoiError | None:
    """The error to report when a second start found the first one's exit status unknown."""
    if exit_code == 254 and _LOST in stderr:
        return OperationFailedError("Incus lost track of the command after starting it; its result is unknown",
                                    "look at its effects in the workspace, then run it again if needed")
    return None


def guard_lines(stderr: str) -> list[str]:
    """The guard's own lines in ``stderr`` (shown as coi's, not the command's)."""
    return [line for line in stderr.splitlines() if line in (_LOST, _RECOVERED)]


def _warning(guard_line: str) -> str:
    return guard_line.removeprefix("coi: ")


def checked_stderr(result: Any, warn: Log) -> str:
    """A captured guarded run: raise when its result was lost, warn when it was
    recovered; the command's own stderr."""
    error = lost_track(result.exit_code, result.stderr)
    if error:
        raise error
    guard = guard_lines(result.stderr)
    for line in guard:
        warn(_warning(line))
    return "".join(l for l in result.stderr.splitlines(keepends=True) if l.rstrip("\n") not in guard)


def has_tmux_session(client: Incus, name: str, code_uid: int) -> bool:
    result = exec_code(client, name, tmux_argv("has-session", "-t", naming.tmux_session(name)),
                       code_uid=code_uid, cwd=CODE_HOME, capture=False)
    return result.exit_code == 0


def start_tmux(client: Incus, name: str, *, code_uid: int, env: Mapping[str, str],
               command: list[str]) -> None:
    """Create the detached tmux session ``coi-<container>`` running ``command``."""
    argv = tmux_argv("new-session", "-d", "-s", naming.tmux_session(name), "-c", WORKSPACE,
                     "-x", "200", "-y", "50")
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    hint = "the image needs tmux and a user 'code' (coi build)"
    try:
        result = exec_code(client, name, [*argv, *command], code_uid=code_uid, capture=False)
        # A failure may still have made the session (an exec Incus lost track of and
        # ran again): then it is there. Otherwise run it again to read why; this
        # keeps the usual case at 2 requests instead of 6.
        if result.exit_code != 0 and not has_tmux_session(client, name, code_uid):
            result = exec_code(client, name, [*argv, *command], code_uid=code_uid)
    except NotFoundError as exc:  # Incus: "Command not found"
        if "command not found" in exc.message.lower():  # setpriv (util-linux) itself is missing
            raise CoiError(f"could not start tmux in {name}: the image has no setpriv (util-linux)", hint) from None
        raise
    if result.exit_code != 0 and not has_tmux_session(client, name, code_uid):
        why = result.stderr.strip() or result.stdout.strip()
        if why.startswith("setpriv: uid") and "not found" in why:
            why = f"the image has no user with uid {code_uid} (code)"
        elif "failed to execute tmux" in why:
            why = "the image has no tmux"
        raise CoiError(f"could not start tmux in {name}: {why}", hint)


def attach_argv(client: Incus, name: str, *, code_uid: int, term: str | None, bash: bool = False) -> list[str]:
    env = {**tmux_env(), "TERM": terminal_type(term)}
    command = ["bash", "-l"] if bash else tmux_argv("attach-session", "-t", naming.tmux_session(name))
    return client.exec_argv(name, as_user(command, uid=code_uid), cwd=WORKSPACE, env=env,
                            terminal=True)


def run_streamed(argv: list[str], *, timeout: float | None, warn: Log, stdin: bool = False) -> int:
    """Run ``incus exec`` of a ``once_argv`` command with output streamed; its exit code.

    The command reads coi's stdin when that is a terminal or ``stdin`` is set.

    stderr is relayed line by line so that Incus's "lost the PID" failure can be
    recognised and the run tried again; the guard of ``once_argv`` makes sure the
    command itself never starts twice (raises ``lost_track``'s error if it had).
    """
    import subprocess
    import threading

    from coi.incus import EXEC_NOT_STARTED

    deadline = time.monotonic() + 20
    while True:
        proc = subprocess.Popen(argv, stdin=None if stdin or sys.stdin.isatty() else subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        seen: list[bytes] = []

        def relay() -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                if EXEC_NOT_STARTED.encode() in line or guard_lines(line.decode(errors="replace")):
                    seen.append(line)
                else:
                    sys.stderr.buffer.write(line)
                    sys.stderr.buffer.flush()
        relayer = threading.Thread(target=relay, daemon=True)
        relayer.start()
        try:
            code = proc.wait(timeout=timeout)
        except BaseException:
            proc.terminate()  # incus passes TERM on: the command ends, not only its client
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        relayer.join()
        told = b"".join(seen).decode(errors="replace")
        error = lost_track(code, told)
        if error:
            raise error
        if _RECOVERED in told:
            warn(_warning(_RECOVERED))
            return code
        if not (code == 255 and seen and time.monotonic() < deadline):
            return code


ATTACH_RETRY_WINDOW = 2.0  # seconds: a failure this quick is Incus's, not the session's end


def run_attached(argv: list[str], *, again_if_lost: bool = False) -> int:
    """Hand the terminal to ``argv`` (``incus exec -t``) until it returns.

    ``again_if_lost``: for ``tmux attach``, which is harmless to run twice: a failure
    within ``ATTACH_RETRY_WINDOW`` (Incus's "Failed to retrieve PID" under load, say)
    tries once more instead of leaving the person outside a running session.
    """
    import subprocess

    started = time.monotonic()
    code = subprocess.run(argv).returncode
    if again_if_lost and code != 0 and time.monotonic() - started < ATTACH_RETRY_WINDOW:
        code = subprocess.run(argv).returncode
    return code


def is_stopped(instance: Mapping[str, Any]) -> bool:
    """Really stopped: while a container powers off, Incus briefly reports
    ``Stopped`` before its stop is done; ``volatile.last_state.power`` says when."""
    power = (instance.get("config") or {}).get("volatile.last_state.power", "STOPPED")
    return instance.get("status") == "Stopped" and power == "STOPPED"


def wait_stopped(client: Incus, name: str, timeout: float) -> bool:
    """Whether the container is really stopped (or gone) within ``timeout``."""
    def stopped() -> bool:
        try:
            return is_stopped(client.instance(name))
        except NotFoundError:
            return True
    try:
        wait_for(stopped, timeout=timeout, what=f"{name} to stop")
    except CoiError:
        return False
    return True
