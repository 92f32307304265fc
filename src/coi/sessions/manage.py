"""Acting on sessions that exist: pick the one to attach to, shut down, kill, make
persistent, clean up; and the low-level container, file and tmux operations of
``coi container``, ``coi file`` and ``coi tmux``. Only coi's own containers are
acted on by name."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coi import naming
from coi.errors import CoiError, ExecLostError, NotFoundError
from coi.sessions import commands, containers, lifecycle, signals, spec, state, tmux
from coi.sessions.lifecycle import Place


def _prefix() -> str:
    return naming.container_prefix()


# ---- choosing containers ---------------------------------------------------------

def running(place: Place, *, slot: int = 0) -> list[spec.ContainerInfo]:
    """coi's running containers; with ``slot``, that slot of this workspace (refused when
    it has no container, or one that is not running)."""
    every = containers.list_containers(place.client, _prefix(), with_state=False)
    if not slot:
        return [c for c in every if c.status == "Running"]
    mine = [c for c in every if c.workspace == str(place.workspace) and c.slot == slot]
    if not mine:
        raise NotFoundError(f"slot {slot} of {place.workspace} not found: no container in it", "see 'coi list'")
    if mine[0].status != "Running":
        raise CoiError(f"slot {slot} of {place.workspace} ({mine[0].name}) is not running",
                       f"start it again with 'coi shell --persistent --slot {slot}'")
    return mine


def coi_container(place: Place, name: str) -> dict[str, Any]:
    """The named container, refused when it is not one of coi's."""
    return containers.coi_container(place.client, name, _prefix())


def check_attachable(place: Place, inst: dict[str, Any], *, bash: bool) -> None:
    """Refuse a container that cannot be attached to (stopped, or no tmux session)."""
    name = inst["name"]
    if inst["status"] != "Running":
        raise CoiError(f"container {name} is not running ({inst['status'].lower()})",
                       f"start it again with 'coi shell --persistent --slot {inst['config'].get('user.coi.slot', 'N')}'")
    if not bash and not tmux.has_tmux_session(place.client, name, place.config.incus.code_uid):
        raise _no_tmux(name)


def _no_tmux(name: str) -> CoiError:
    return CoiError(f"No tmux session in {name}", f"open a shell with 'coi attach {name} --bash'")


def all_coi(place: Place) -> list[dict[str, Any]]:
    return [i for i in place.client.instances(recursion=1) if spec.is_coi(i, _prefix())]


def named(place: Place, names: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The coi containers of ``names``, and a message for each name that is not one."""
    found, problems = [], []
    for name in names:
        try:
            found.append(containers.coi_container(place.client, name, _prefix()))
        except CoiError as exc:
            problems.append(exc.message)
    return found, problems


# ---- kill, shutdown, persist ---------------------------------------------------------

def kill(place: Place, inst: dict[str, Any]) -> None:
    lifecycle.remove(place, inst["name"])


def shutdown(place: Place, inst: dict[str, Any], *, timeout: int,
             note: dict[str, Any] | None = None) -> None:
    """Stop (cleanly, forced after ``timeout``), save, and delete unless persistent.
    ``note``: more for the saved metadata (the session timer says why it ended)."""
    name = inst["name"]
    if not spec.is_stopped(inst):
        try:
            place.client.stop(name, timeout=timeout)
        except CoiError:
            place.client.stop(name, force=True)
    lifecycle.end(place, name, note=note)


def persist(place: Place, inst: dict[str, Any]) -> None:
    """Keep the container after its session ends; its saved session says so too."""
    key = spec.KEY
    place.client.update_instance(inst["name"], config={f"{key}persistent": "true"})
    sid = (inst.get("config") or {}).get(f"{key}session_id")
    tool = (inst.get("config") or {}).get(f"{key}tool") or place.config.tool.name
    if sid:
        try:
            saved = state.find_session(place.sessions_dir, tool, session_id=sid, workspace=place.workspace)
            state.update_metadata(saved, persistent=True)
        except NotFoundError:
            pass


# ---- clean ---------------------------------------------------------------------------

@dataclass
class CleanPlan:
    """What ``coi clean`` would remove, with the orphaned network rules already removed."""

    stopped: list[dict[str, Any]]
    saved: list[state.SavedSession]
    rules_removed: list[str] = field(default_factory=list)
    spares_removed: int = 0  # spare branch copies (coi.branches), made again when needed
    timers_removed: list[str] = field(default_factory=list)  # session timers of containers that went


def plan_clean(place: Place, *, saved_sessions: bool) -> CleanPlan:
    """Stopped, non-persistent coi containers and (with ``saved_sessions``) every saved
    session. Network rules of containers that no longer exist, and the spare branch
    copies, are removed at once."""
    from coi import network

    client = place.client
    stopped = [i for i in all_coi(place) if spec.is_stopped(i) and i["config"].get(f"{spec.KEY}persistent") != "true"]
    saved = state.saved_sessions(place.sessions_dir) if saved_sessions else []
    # Every project: a container that still exists anywhere keeps its rules.
    existing = {i["name"] for i in client.instances(recursion=1, all_projects=True)}
    removed = network.clean_orphans(existing, sessions_dir=place.sessions_dir, client=client,
                                    privileged_command=place.config.network.privileged_command)
    spares = 0
    if (place.sessions_dir / "branches").is_dir():
        from coi.branches import copies

        spares = copies.remove_spares(place.sessions_dir)
    from coi.sessions import timer

    timers = timer.clean_orphans(place.sessions_dir, existing)
    return CleanPlan(stopped, saved, list(removed), spares, timers)


# ---- info ------------------------------------------------------------------------------

def info(place: Place, *, session_id: str | None) -> tuple[state.SavedSession, bool]:
    """The saved session (this workspace's latest, or by id) and whether its container exists."""
    saved = state.find_session(place.sessions_dir, place.config.tool.name, session_id=session_id,
                               workspace=place.workspace)
    name = saved.metadata.get("container_name")
    return saved, bool(name) and place.client.exists(name)


# ---- coi container ---------------------------------------------------------------------

def launch(place: Place, name: str, *, image: str, ephemeral: bool) -> None:
    """Create and start, filtered like a session: the network rules go on before it runs
    (the coi bridge gives a container without rules no network at all)."""
    containers.launch_container(place.client, name, image=image, ephemeral=ephemeral,
                                lock_dir=place.sessions_dir / "locks")
    try:
        with signals.interruptible():
            lifecycle.start_isolated(place, name, place.messages.detail)
    except BaseException:
        with signals.signals_ignored():
            lifecycle.remove(place, name)
        raise


def start_container(place: Place, name: str) -> None:
    """Start a container; one of coi's gets its network rules first, as a session would."""
    inst = place.client.instance(name)
    if spec.is_coi(inst, _prefix()):
        lifecycle.start_isolated(place, name, place.messages.detail)
    else:
        place.client.start(name)


def stop_container(place: Place, name: str, *, force: bool) -> None:
    place.client.stop(name, force=force)


def exists(place: Place, name: str) -> bool:
    return place.client.exists(name)


def delete_container(place: Place, name: str, *, force: bool) -> None:
    client = place.client
    if client.instance(name)["status"] != "Stopped":
        if not force:
            raise CoiError(f"container {name} is running", f"stop it first or use 'coi container delete --force {name}'")
        client.stop(name, force=True)
    client.delete(name)


def is_running(place: Place, name: str) -> bool:
    try:
        return place.client.instance(name)["status"] == "Running"
    except NotFoundError:
        return False


def exec_in(place: Place, name: str, command: list[str], *, user: int | None, group: int | None,
            env: dict[str, str], cwd: str, capture: bool) -> int | lifecycle.Captured:
    """``coi container exec``: the command guarded like ``coi run``'s (never started twice);
    as code (``--user`` = code's uid) it gets code's groups and a login's environment."""
    client = place.client
    if user is not None and group is None:
        group = user
    as_code = user is not None and user == place.config.incus.code_uid

    def started(argv: list[str]) -> list[str]:
        """code gets its full group list, as a login would (Incus's user/group give none)."""
        return commands.as_user(argv, uid=user, gid=group) if as_code else argv  # type: ignore[arg-type]

    incus_user, incus_group = (None, None) if as_code else (user, group)
    if as_code:  # what a login as code would have; --env values win
        env = {**spec.tmux_env(), "LOGNAME": "code", "SHELL": "/bin/bash", **env}
    if capture:
        result = commands.captured(client, name, started(commands.once_argv(command)), env=env,
                                   user=incus_user or 0, group=incus_group or 0, cwd=cwd)
        stderr = commands.checked_stderr(result, place.messages.warn)
        return lifecycle.Captured(result.stdout, stderr, result.exit_code)
    client.instance(name)  # a clear error for an unknown container
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    guarded = commands.env_via_file(client, name, commands.once_argv(command, terminal=terminal), env,
                                    uid=user or 0)
    argv = client.exec_argv(name, started(guarded), user=incus_user, group=incus_group, cwd=cwd, terminal=terminal)
    return commands.run_streamed(argv, timeout=None, warn=place.messages.warn, stdin=True)


def add_mount(place: Place, name: str, *, device: str, source: str, path: str, shift: bool) -> None:
    src = Path(source).expanduser().absolute()
    if not src.exists():
        raise CoiError(f"{src} does not exist")
    disk = {"type": "disk", "source": str(src), "path": path}
    if shift:
        disk["shift"] = "true"
    place.client.add_device(name, device, disk)


# ---- coi file ---------------------------------------------------------------------------

def push(place: Place, local: Path, name: str, path: str) -> None:
    client = place.client
    client.instance(name)
    if local.is_dir():
        client.push_tree(name, local, path)
    else:
        client.push_file(name, path, local.read_bytes(), mode=local.stat().st_mode & 0o7777)


def pull(place: Place, name: str, path: str, local: Path, *, recursive: bool) -> Path:
    """Copy ``name:path`` to ``local`` (into it, when it is a directory); where it went."""
    from coi.errors import UsageError

    client = place.client
    content, meta = client.pull_file(name, path)
    if meta["type"] == "directory":
        if not recursive:
            raise UsageError(f"{name}:{path} is a directory", "use -r to copy a directory")
        client.pull_tree(name, path, local)
        return local
    if local.is_dir():
        local = local / Path(path).name
    local.write_bytes(content)
    local.chmod(meta["mode"])
    return local


# ---- coi tmux ------------------------------------------------------------------------------

def _running_session(place: Place, name: str) -> None:
    inst = containers.coi_container(place.client, name, _prefix())
    if inst["status"] != "Running":
        raise CoiError(f"container {name} is not running")
    if not tmux.has_tmux_session(place.client, name, place.config.incus.code_uid):
        raise _no_tmux(name)


def tmux_sessions(place: Place) -> list[str]:
    """Running coi containers with a coi tmux session."""
    code_uid = place.config.incus.code_uid
    return [c.name for c in running(place) if tmux.has_tmux_session(place.client, c.name, code_uid)]


def tmux_send(place: Place, name: str, text: str) -> None:
    """Type ``text`` and Enter into the session's pane, each at most once."""
    _running_session(place, name)
    target = naming.tmux_session(name)
    for keys in (["-l", text], ["Enter"]):
        try:
            result = commands.exec_code(place.client, name, tmux.tmux_argv("send-keys", "-t", target, *keys),
                                        code_uid=place.config.incus.code_uid, cwd=spec.CODE_HOME,
                                        retry=False)  # keys once
        except ExecLostError:
            raise ExecLostError("Incus lost track of the command (tmux send-keys): the keys may or may "
                                       "not have been typed", f"look at the pane first: coi tmux capture {name}") from None
        if result.exit_code != 0:
            raise CoiError(f"tmux send-keys failed: {result.stderr.strip()}")


def tmux_capture(place: Place, name: str) -> tuple[str, int]:
    """The pane's text and the exit code of ``tmux capture-pane``."""
    _running_session(place, name)
    result = commands.exec_code(place.client, name, tmux.tmux_argv("capture-pane", "-p", "-t",
                                                                   naming.tmux_session(name)),
                                code_uid=place.config.incus.code_uid, cwd=spec.CODE_HOME)
    return result.stdout, result.exit_code
