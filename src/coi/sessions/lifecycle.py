"""A session as a whole: the request built from the config, the start (files in, rules on,
container up, agent in tmux), the end (saved, deleted unless persistent, rules off), and
``coi run``'s one command in a session of its own.

The security rule of a start lives here: a container's network rules go on before it
runs where its address is known, and a start whose rules cannot be applied fails
(fail closed).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from coi import naming
from coi.errors import CoiError, ConflictError, NotFoundError, UsageError
from coi.messages import Log, Messages
from coi.sessions import commands, containers, signals, spec, state, tmux

if TYPE_CHECKING:
    from coi.config import Config
    from coi.incus import IncusClient
    from coi.tools import Tool


@dataclass(frozen=True)
class Place:
    """Where sessions of one command run: the client, the config, the workspace, where
    progress goes, and coi's state directory, checked on first use (``state_dir``) so that
    a request can refuse an exposed one before anything is made there."""

    client: IncusClient
    config: Config
    workspace: Path
    messages: Messages
    state_dir: Callable[[], Path]

    @property
    def sessions_dir(self) -> Path:
        return self.state_dir()


# ---- the request ---------------------------------------------------------------

def check_state_exposure(place: Place, mounted: Iterable[Path] = ()) -> None:
    """Refuse before anything is made when coi's state directory lies inside (or around) the
    workspace or a mount: a container could then write the records coi acts on."""
    from coi.statedir import check_state_dir

    check_state_dir(place.config.paths.sessions_dir, exposed=[place.workspace, *mounted])


def use_shift(place: Place) -> bool:
    """idmapped mounts keep ids one to one, so they fit only when the host uid is code's."""
    cfg = place.config
    if cfg.incus.disable_shift or os.getuid() != cfg.incus.code_uid:
        return False
    features = place.client.server().get("environment", {}).get("kernel_features", {})
    return features.get("idmapped_mounts") == "true"


def request(place: Place, *, slot: int, env: list[str], mount: list[str], storage: str | None,
            profile_env: Mapping[str, str], profile: str | None, session_id: str | None = None,
            persistent: bool | None = None, branch: str | None = None, carry: bool = False,
            saved: state.SavedSession | None = None, port: Iterable[str] = ()) -> spec.SessionRequest:
    """What a session of this workspace is to be, every value checked before anything exists
    but a branch session's new copy, which is reserved last (``branch_copy``).

    ``storage``: None (no storage), "" (the workspace's default directory) or a path.
    ``branch``: None (the workspace itself, unless ``[git] isolation`` says branch), ""
    (a new copy with a generated name) or NAME. ``port``: the ``--port`` values.
    """
    from coi.sessions import forwards
    from coi.tools import get_tool

    cfg = place.config
    ports = forwards.session_ports(cfg.ports, port)
    extra_env = session_env(place, profile_env=profile_env, env=env)
    limits = spec.limits_config(cpu=cfg.limits.cpu, memory=cfg.limits.memory, processes=cfg.limits.processes)
    max_seconds, disk = session_limits(cfg)
    mounts = list(cfg.mounts.default) + [spec.parse_mount(m, cwd=Path.cwd()) for m in mount]
    if storage == "":  # --storage alone
        storage_path: Path | None = cfg.paths.storage_dir / naming.workspace_hash(str(place.workspace))
    else:
        storage_path = Path(os.path.abspath(os.path.expanduser(storage))) if storage else None
    spec.check_mounts(mounts, storage=storage_path is not None)
    if not place.workspace.is_dir():
        raise NotFoundError(f"workspace {place.workspace} is not a directory")
    exposed = [*(m.host for m in mounts), *([storage_path] if storage_path else [])]
    check_state_exposure(place, exposed)
    ssh_agent = None
    if cfg.ssh.forward_agent:
        ssh_agent = forwards.agent_socket(os.environ, exposed=[place.workspace, *exposed,
                                                               cfg.paths.sessions_dir / "branches"])
        extra_env[forwards.AGENT_ENV] = forwards.AGENT_SOCKET
    shift = use_shift(place)
    place.messages.detail("Workspace mount: " + ("idmapped (shift=true)" if shift else
                                                 f"raw.idmap {os.getuid()} -> {cfg.incus.code_uid}"))
    persistent = cfg.defaults.persistent if persistent is None else persistent
    copy, new = branch_copy(place, wanted=branch, carry=carry, saved=saved, persistent=persistent)
    masked, mask_devices = _masks(place, copy)
    return spec.SessionRequest(
        workspace=place.workspace, slot=slot, persistent=persistent, image=cfg.defaults.image, env=extra_env, mounts=mounts, storage=storage_path,
        tool=get_tool(cfg.tool.name), binary=cfg.tool.binary, max_slots=cfg.defaults.max_slots,
        prefix=naming.container_prefix(), code_uid=cfg.incus.code_uid, host_uid=os.getuid(), host_gid=os.getgid(),
        shift=shift, lock_dir=place.sessions_dir / "locks",
        base_config={**spec.CONTAINER_CONFIG, **limits}, session_id=session_id, profile=profile,
        branch=copy, branch_new=new, carry=carry, keep_spare=cfg.git.keep_spare, ports=ports,
        ssh_agent=ssh_agent, max_duration=cfg.limits.max_duration.strip() if max_seconds else "",
        max_seconds=max_seconds, disk=disk, masks=mask_devices, masked=masked,
        carry_excludes=_carry_excludes(cfg) if carry else ())


def session_env(place: Place, *, profile_env: Mapping[str, str], env: Iterable[str] = ()) -> dict[str, str]:
    """The agent's own variables: the host's ``[tool] env_passthrough``, the profile's, ``--env``
    values, and for the allowlist by name the proxy's and the credentials' placeholders."""
    cfg = place.config
    extra_env = {k: os.environ[k] for k in cfg.tool.env_passthrough if k in os.environ}
    extra_env.update(profile_env)
    extra_env.update(spec.parse_env(list(env)))
    if _by_name(cfg):
        from coi.network import proxy_environment
        from coi.network.credentials import container_env

        extra_env.update(proxy_environment(place.client))
        extra_env.update(container_env(cfg.credentials))  # placeholders win: no secret goes in
    return extra_env


def session_limits(cfg: Config) -> tuple[int, str]:
    """(seconds of ``[limits] max_duration``, 0 for none; ``[limits] disk``, "" for none),
    checked before anything exists (``coi.config.limits``)."""
    from coi.config.limits import parse_disk, parse_duration

    seconds = parse_duration(cfg.limits.max_duration)
    disk = cfg.limits.disk.strip()
    return seconds, disk if parse_disk(disk) else ""


def _masks(place: Place, branch: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(the paths shown as masked, their devices): ``[security] masked_paths`` of the
    workspace. A branch session has none: its copy is made by git, and --carry leaves the
    masked paths out (``_carry_excludes``)."""
    patterns = place.config.security.masked_paths
    if branch is not None or not patterns:
        return (), {}
    from coi.sessions import masks

    found, devices = masks.plan(place.sessions_dir, place.workspace, patterns,
                                naming.workspace_hash(str(place.workspace)))
    for level, line in masks.notes(found):
        getattr(place.messages, level)(line)
    return tuple(m.shown for m in found.masks), devices


def _carry_excludes(cfg: Config) -> tuple[str, ...]:
    from coi.sessions import masks

    return tuple(masks.git_excludes(cfg.security.masked_paths))


def _show_masks(place: Place, session: spec.Session, req: spec.SessionRequest) -> None:
    """A reused container's masks refreshed (files that appeared since are masked now, and
    gone ones unmasked), and the start line that names them."""
    from coi.sessions import masks

    if not session.created:
        masks.refresh(place.client, session.name, req.masks)
    line = masks.summary(req.masked)
    if line:
        place.messages.info(line)


def _by_name(cfg: Config) -> bool:
    """Whether the session's egress goes through coi's proxy (the allowlist by name)."""
    return cfg.network.mode == "allowlist" and cfg.network.allowlist_by == "name"


def branch_copy(place: Place, *, wanted: str | None, carry: bool, saved: state.SavedSession | None,
                persistent: bool) -> tuple[Any, bool]:
    """(the session's branch copy or None, whether it was reserved just now).

    A resumed branch session continues on its copy; ``[git] isolation = "branch"`` makes
    every new session a branch session. A copy another container has is refused, unless
    that is the persistent container this session will reuse.
    """
    from coi.branches import copies

    saved_name = (saved.metadata.get("branch") or None) if saved else None
    if wanted is None:
        wanted = saved_name or ("" if place.config.git.isolation == "branch" else None)
    if wanted is None:
        if carry:
            raise UsageError("--carry needs a branch session", "coi shell --branch --carry")
        return None, False
    name = wanted or saved_name
    if name:
        try:
            found = copies.find(place.sessions_dir, place.workspace, copies.check_name(name))
        except NotFoundError:
            if saved_name == name:
                raise NotFoundError(f"the copy of coi/{name} is gone (discarded?)",
                                    "start a new branch session: coi shell --branch") from None
        else:
            if carry:
                raise UsageError(f"--carry brings changes into a new copy, and coi/{name} exists",
                                 "commit your changes and merge them there, or pick a new name")
            check_copy_free(place, found.name, persistent)
            place.messages.info(f"Continuing on branch {found.branch}")
            return found, False
    made, _ = copies.reserve(place.sessions_dir, place.workspace, name or None)
    place.messages.info(f"Branch: {made.branch} (from {made.base[:12]})")
    return made, True


def check_copy_free(place: Place, name: str, persistent: bool, workspace: Path | None = None) -> None:
    """Refuse a copy that a container of the workspace has (but the persistent one a
    ``persistent`` session reuses)."""
    workspace = workspace or place.workspace
    for inst in place.client.instances(recursion=1):
        cfg = inst.get("config") or {}
        if cfg.get(f"{spec.KEY}branch") == name and cfg.get(f"{spec.KEY}workspace") == str(workspace):
            if persistent and cfg.get(f"{spec.KEY}persistent") == "true":
                continue  # the container this session reuses
            raise ConflictError(f"branch coi/{name} is in use by container {inst['name']}",
                                f"attach to it (coi attach {inst['name']}) or end it first (coi kill {inst['name']})")


def resumed(place: Place, resume: str, *, generation: int, branch: str | None = None) -> state.SavedSession:
    """The save ``coi shell --resume[=ID]`` resumes: the given session, or this workspace's
    latest (on copy ``branch``, when named)."""
    latest = resume == "latest"
    try:
        return state.find_session(place.sessions_dir, place.config.tool.name, session_id=None if latest else resume,
                                  workspace=place.workspace, generation=generation, branch=branch or None)
    except state.NoSavedSession as exc:
        if latest:
            raise NotFoundError(f"no previous session to resume in {place.workspace}", exc.hint) from None
        raise


def agent_env(req: spec.SessionRequest) -> dict[str, str]:
    return spec.agent_environment(term=os.environ.get("TERM"), extra=req.env)


def agent_command(req: spec.SessionRequest, session: spec.Session,
                  saved: state.SavedSession | None) -> list[str]:
    """The agent's argv: fresh, or resuming the conversation of ``saved``."""
    if saved is None:
        return req.tool.command(binary=req.binary, session_id=session.session_id)
    return req.tool.resume_command(saved.path / "state", binary=req.binary, session_id=session.session_id)


# ---- network rules around a start ------------------------------------------------

def start_isolated(place: Place, name: str, log: Log) -> None:
    """Start the container with its network rules in place (fail closed).

    A pinned NIC (every container coi creates) is filtered before the container
    starts; an older container's rules wait for its DHCP address after the start.
    """
    from coi import network

    policy = network.plan(place.config.network)
    early = network.applies_before_start(place.client.instance(name), policy, place.sessions_dir)
    if early:
        _isolate(place, name, policy, log)
    containers.ensure_running(place.client, name)
    if not early:
        _isolate(place, name, policy, log)
    if policy.proxy:  # its start-up overlapped the container's; the agent needs it from now on
        network.proxy_ready(place.client, name, sessions_dir=place.sessions_dir,
                            credentials=place.config.credentials)


def _isolate(place: Place, name: str, policy: Any, log: Log) -> None:
    from coi import network

    backend = network.apply(place.client, name, policy, sessions_dir=place.sessions_dir, log=log,
                            credentials=place.config.credentials if policy.proxy else (), proxy_later=True)
    log(f"Network: {policy.mode} ({backend})")


def unisolate(place: Place, name: str) -> None:
    """The container's network rules and watcher removed (none is fine)."""
    from coi import network

    network.remove(name, sessions_dir=place.sessions_dir, client=place.client,
                   privileged_command=place.config.network.privileged_command)


def remove(place: Place, name: str) -> None:
    """The container, its rules and its timer gone, whatever state they were in."""
    containers.remove_container(place.client, name)
    unisolate(place, name)
    disarm(place, name)


def disarm(place: Place, name: str) -> None:
    """The container's session timer stopped (none is fine)."""
    from coi.sessions import timer

    timer.disarm(place, name)


# ---- start ----------------------------------------------------------------------------

def open_session(place: Place, req: spec.SessionRequest, *, log: Log | None = None) -> spec.Session:
    """The session's container: a new one, or the slot's persistent one again (and a line saying so).

    A new branch copy is filled while the container is created; when either fails, the
    copy goes again (nothing ran in it yet).
    """
    by_name = _by_name(place.config)
    if by_name:  # the proxy's start-up overlaps the container's
        from coi import network

        network.launch_proxy(place.client, place.sessions_dir)
    filling = _fill_copy(req)
    try:
        session = containers.open_session(place.client, req, log or place.messages.info)
        if filling is not None:
            filling.result()
    except BaseException:
        if filling is not None:
            _forget_new_copy(req, filling)
        if by_name:
            network.proxy_unneeded(place.sessions_dir)
        raise
    if not session.created:
        place.messages.info(f"Reusing persistent container {session.name} (slot {session.slot})")
    return session


def _fill_copy(req: spec.SessionRequest):
    """The new copy's checkout, started in a thread of its own (a Future), or None."""
    if req.branch is None or not req.branch_new:
        return None
    from concurrent.futures import ThreadPoolExecutor

    from coi.branches import copies

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(copies.fill, req.branch, carry=req.carry, spare=req.keep_spare,
                         exclude=req.carry_excludes)
    pool.shutdown(wait=False)
    return future


def _forget_new_copy(req: spec.SessionRequest, filling: Any = None) -> None:
    from coi.branches import copies

    if filling is not None:
        try:
            filling.result()
        except BaseException:
            pass
    try:
        copies.forget(req.branch, copies.repository(req.workspace))
    except CoiError:
        pass


def start(place: Place, session: spec.Session, req: spec.SessionRequest, saved: state.SavedSession | None, *,
          debug: bool, tmux_session: bool) -> None:
    """Start the container and the agent in its tmux session (unless it already runs);
    whatever this start made is removed again when it fails or is interrupted."""
    with containers.cleanup_on_interrupt(place.client, session):
        try:
            _start(place, session, req, saved, debug=debug, tmux_session=tmux_session)
        except BaseException:
            if session.created:
                unisolate(place, session.name)
                disarm(place, session.name)
            if req.branch_new:
                _forget_new_copy(req)
            raise
    _refill_spare(place, req)


def _refill_spare(place: Place, req: spec.SessionRequest) -> None:
    """After a new copy's session is up (not while it starts: the checkout would slow it
    down), the workspace's next spare copy is made in the background."""
    if req.branch_new and req.keep_spare:
        from coi.branches import copies

        copies.refill_spare(place.sessions_dir, req.workspace)


def _start(place: Place, session: spec.Session, req: spec.SessionRequest, saved: state.SavedSession | None, *,
           debug: bool, tmux_session: bool) -> None:
    client = place.client
    # Files go in first: a new container is still stopped, so they are there
    # before anything in it runs (and the boot does not slow the copy).
    if saved is not None and session.created:
        restore_state(place, session.name, saved, req)
    inject_credentials(place, session.name, req)
    time_limit(place, session, req)
    _show_masks(place, session, req)
    start_isolated(place, session.name, place.messages.info)
    place.messages.info("Starting session...")
    # A container created just now cannot have a tmux session yet.
    if tmux_session and (session.created or not tmux.has_tmux_session(client, session.name, req.code_uid)):
        agent = None if debug else agent_command(req, session, saved)
        tmux.start_tmux(client, session.name, code_uid=req.code_uid, env=agent_env(req),
                        command=tmux.agent_shell_command(agent))


def time_limit(place: Place, session: spec.Session, req: spec.SessionRequest) -> None:
    """``[limits] max_duration``: the session's timer on the host, before the container starts
    (fail closed). A container coi starts now gets a new clock; one that runs already keeps
    the clock it has (``coi.sessions.timer``)."""
    from coi.sessions import timer

    inst = None if session.created else place.client.instance(session.name)
    fresh = inst is None or inst.get("status") != "Running"
    if req.max_seconds:
        deadline = timer.arm(place, session.name, max_duration=req.max_duration, seconds=req.max_seconds,
                             session_id=session.session_id, fresh=fresh)
        place.messages.info(f"Time limit: {req.max_duration} (the session ends at {timer.iso(deadline)})")
    elif fresh and inst is not None:  # a limit of the container's earlier run does not carry over
        disarm(place, session.name)
        timer.clear_marks(place.client, session.name, inst)


def restore_state(place: Place, name: str, saved: state.SavedSession, req: spec.SessionRequest) -> None:
    state_dir = saved.path / "state"
    if state_dir.is_dir():
        place.client.push_tree(name, state_dir, f"{spec.CODE_HOME}/{req.tool.state_dir}",
                               uid=req.code_uid, gid=req.code_uid)


def inject_credentials(place: Place, name: str, req: spec.SessionRequest) -> None:
    """Fresh credentials on every start and resume: only the tool's essential files."""
    push_credentials(place, name, req.tool, code_uid=req.code_uid)


def push_credentials(place: Place, name: str, tool: Tool, *, code_uid: int) -> None:
    """``tool``'s credential and settings files from the host into code's home in ``name``."""
    from coi.tools import host_home

    files = tool.credentials(host_home(), full_host_config=place.config.tool.full_host_config)
    dirs = sorted({str(Path(rel).parent) for rel in files} - {"."})
    for rel in dirs:
        place.client.make_dir(name, f"{spec.CODE_HOME}/{rel}", uid=code_uid, gid=code_uid, mode=0o700)
    for rel, content in files.items():
        place.client.push_file(name, f"{spec.CODE_HOME}/{rel}", content, uid=code_uid, gid=code_uid, mode=0o600)
    place.messages.detail(f"Copied {len(files)} credential/settings file(s) for {tool.name}")


def attached_argv(place: Place, session: spec.Session, req: spec.SessionRequest,
                  saved: state.SavedSession | None, *, debug: bool, tmux_session: bool) -> list[str]:
    """The ``incus exec -t`` argv that puts the person in the session: tmux, or the agent
    (a shell with ``debug``) straight in the terminal."""
    client = place.client
    if tmux_session:
        return tmux.attach_argv(client, session.name, code_uid=req.code_uid, term=os.environ.get("TERM"))
    agent = None if debug else agent_command(req, session, saved)
    command = commands.env_via_file(client, session.name, agent or ["bash", "-l"], agent_env(req),
                                    uid=req.code_uid)
    return client.exec_argv(session.name, commands.as_user(command, uid=req.code_uid),
                            cwd=spec.WORKSPACE, terminal=True)


# ---- end -------------------------------------------------------------------------------

def after_attach(place: Place, name: str, code: int) -> None:
    """Detached, left bash, or the container stopped from inside: act accordingly."""
    from coi.sessions.timer import ended_by_limit

    client = place.client
    try:
        inst = client.instance(name)
    except NotFoundError:
        return
    limit = ended_by_limit(inst)
    if limit:  # its timer stops and saves it (no second save from here)
        place.messages.info(f"Session {name} reached its max_duration of {limit}: coi stops and saves it "
                            "('coi info' shows the saved session)")
        return
    if code == 0 and not spec.is_stopped(inst):
        place.messages.info(f"Detached; container {name} keeps running. Re-attach with: coi attach {name}")
        return
    if _being_restored(place, name):  # stopped by ``coi snapshot restore``: not the session's end
        place.messages.info(f"Container {name} is being restored from a snapshot. Re-attach with: coi attach {name}")
        return
    if containers.wait_stopped(client, name, timeout=60):
        with signals.signals_ignored():  # the save and the delete run to their end
            end(place, name)
        return
    place.messages.info(f"Container {name} keeps running. Re-attach with: coi attach {name}")


def _being_restored(place: Place, name: str) -> bool:
    from coi.sessions.snapshots import being_restored

    return being_restored(place.sessions_dir, name)


def end(place: Place, name: str, *, inst: dict[str, Any] | None = None,
        note: Mapping[str, Any] | None = None) -> None:
    """Save the session of a (stopped or running) container, then delete it unless persistent.
    ``note``: more for the saved metadata (why it ended: ``coi.sessions.timer``)."""
    client = place.client
    inst = inst or client.instance(name)
    cfg = inst.get("config") or {}
    key = spec.KEY
    save(place, name, inst=inst, note=note)
    if cfg.get(f"{key}persistent") != "true":
        containers.remove_container(client, name)
    unisolate(place, name)
    disarm(place, name)
    if cfg.get(f"{key}branch"):
        bring_back(place, Path(cfg.get(f"{key}workspace", "")), cfg[f"{key}branch"])


def save(place: Place, name: str, *, inst: dict[str, Any] | None = None,
         note: Mapping[str, Any] | None = None) -> None:
    """Save the agent's state of a (stopped or running) session container, under its session id
    (``note``: more for the saved metadata)."""
    from coi.tools import get_tool

    client = place.client
    inst = inst or client.instance(name)
    cfg = inst.get("config") or {}
    key = spec.KEY
    tool = cfg.get(f"{key}tool") or place.config.tool.name
    persistent = cfg.get(f"{key}persistent") == "true"
    session_id = cfg.get(f"{key}session_id")
    if session_id:
        place.messages.info("Saving session data...")
        slot = cfg.get(f"{key}slot", "")
        state.save_session(client, name, tool=get_tool(tool), limits=state.save_limits(place.config.sessions),
                           warn=place.messages.warn, sessions_dir=place.sessions_dir, metadata={
                               "session_id": session_id, "container_name": name, "persistent": persistent,
                               "workspace": cfg.get(f"{key}workspace", ""), "tool": tool,
                               "slot": int(slot) if slot.isdigit() else None,
                               "image": cfg.get(f"{key}image", ""), "profile": cfg.get(f"{key}profile"),
                               "branch": cfg.get(f"{key}branch"), "limits": spec.limits_of(inst),
                               **(note or {})})
        place.messages.info("Session data saved")


def bring_back(place: Place, workspace: Path, name: str) -> None:
    """The session's branch into the host repository (``coi/NAME``); a failure only warns:
    the work stays in the copy, where diff and merge find it."""
    from coi.branches import copies, review

    try:
        branch = copies.find(place.sessions_dir, workspace, name)
        head = review.bring_back(branch)
        place.messages.info(f"Branch {branch.branch} is at {head[:12]} in {workspace}")
    except CoiError as exc:
        place.messages.warn(f"branch coi/{name} was not brought back: {exc.message}")


# ---- coi run --------------------------------------------------------------------------

@dataclass(frozen=True)
class Captured:
    """``coi run --capture``'s result."""

    stdout: str
    stderr: str
    exit_code: int

    def to_json(self) -> str:
        return json.dumps({"stdout": self.stdout, "stderr": self.stderr, "exit_code": self.exit_code})


def run(place: Place, req: spec.SessionRequest, command: list[str], *, capture: bool,
        timeout: float) -> int | Captured:
    """``command`` in a session container of its own, removed afterwards unless persistent.

    SIGTERM and SIGHUP end it the way Ctrl+C does, in every phase: whatever it made
    (container, rules, watcher) is removed again. A run past ``timeout`` exits 124.
    """
    with signals.interruptible():
        session = open_session(place, req, log=place.messages.detail)
        started = False
        try:
            _show_masks(place, session, req)
            start_isolated(place, session.name, place.messages.detail)
            started = True
            return _run_command(place, session, req, command, capture=capture, timeout=timeout)
        finally:
            with signals.signals_ignored():  # a second signal must not cut the clean-up short
                _after_run(place, req, session, started)


def _after_run(place: Place, req: spec.SessionRequest, session: spec.Session, started: bool) -> None:
    """A run's container removed unless persistent, and its branch brought back (or a new
    copy that never saw the command forgotten)."""
    if not session.persistent:
        remove(place, session.name)
    if req.branch is not None and started:
        bring_back(place, req.workspace, req.branch.name)
        _refill_spare(place, req)
    elif req.branch_new:  # the command never ran: the new copy holds nothing
        _forget_new_copy(req)


def _run_command(place: Place, session: spec.Session, req: spec.SessionRequest, command: list[str], *,
                 capture: bool, timeout: float) -> int | Captured:
    """``command`` in the started container, streamed or captured."""
    import subprocess

    client = place.client
    env_vars = agent_env(req)
    if capture:
        if timeout:  # coreutils' timeout inside: exits 124 like coi run does
            command = ["timeout", f"{timeout:g}", *command]
        guarded = commands.as_user(commands.once_argv(command), uid=req.code_uid)
        result = commands.captured(client, session.name, guarded, env=env_vars, cwd=spec.WORKSPACE)
        stderr = commands.checked_stderr(result, place.messages.warn)
        return Captured(result.stdout, stderr, result.exit_code)
    terminal = sys.stdin.isatty()
    guarded = commands.env_via_file(client, session.name, commands.once_argv(command, terminal=terminal),
                                    env_vars, uid=req.code_uid)
    argv = client.exec_argv(session.name, commands.as_user(guarded, uid=req.code_uid), cwd=spec.WORKSPACE,
                            terminal=terminal)
    try:
        return commands.run_streamed(argv, timeout=timeout or None, warn=place.messages.warn)
    except subprocess.TimeoutExpired:
        raise RunTimeout(timeout) from None


# ---- coi run --prompt: the agent headless ----------------------------------------------

def run_agent(place: Place, req: spec.SessionRequest, prompt: str, *, capture: bool,
              timeout: float) -> int | Captured:
    """The agent answers ``prompt`` in its own headless mode, in a session container of its
    own: the output streamed (or captured), the agent's exit code returned, and the session
    saved the way ``coi shell`` saves one, so that ``coi shell --resume`` continues it.

    The agent gets its credentials as in ``coi shell``; the prompt is one argument of its
    command line (``Tool.headless_command``). The save is made whatever the agent's exit
    code, also after a timeout or an interruption once the agent had started.
    """
    with signals.interruptible():
        session = open_session(place, req, log=place.messages.detail)
        place.messages.info(f"Session ID: {session.session_id}")
        started = False
        try:
            inject_credentials(place, session.name, req)
            start_isolated(place, session.name, place.messages.detail)
            started = True
            command = headless_command(req, session, prompt)
            return _run_command(place, session, req, command, capture=capture, timeout=timeout)
        finally:
            with signals.signals_ignored():  # a second signal must not cut the save or clean-up short
                try:
                    if started:
                        _save_run(place, session)
                finally:
                    _after_run(place, req, session, started)


def headless_command(req: spec.SessionRequest, session: spec.Session, prompt: str) -> list[str]:
    """The agent's argv for ``prompt``. A new container's agent keeps its conversation under the
    session's id; a reused persistent one may hold that id's conversation already, so its
    agent gets an id of its own (``coi shell --resume`` takes the latest conversation)."""
    agent_id = session.session_id if session.created else spec.new_session_id()
    return req.tool.headless_command(prompt, binary=req.binary, session_id=agent_id)


def _save_run(place: Place, session: spec.Session) -> None:
    """The run's session saved; a failed save is said, and the agent's exit code still stands."""
    try:
        save(place, session.name)
    except CoiError as exc:
        place.messages.warn(f"the session was not saved: {exc.message}")
        return
    place.messages.info(f"Continue the conversation with: coi shell --resume={session.session_id}")


class RunTimeout(CoiError):
    """``coi run --timeout`` ran out (exit code 124, as coreutils' timeout)."""

    exit_code = 124

    def __init__(self, timeout: float) -> None:
        super().__init__(f"command timed out after {timeout:g}s")
