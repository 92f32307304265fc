"""Session commands: shell, run, attach, list, info, shutdown, kill, persist, clean."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from coi import naming
from coi.cli.context import Context
from coi.errors import CoiError, NotFoundError, UsageError


def _prefix() -> str:
    return naming.container_prefix()


def _request(ctx: Context, *, slot: int, env: list[str], mount: list[str], storage: str | None,
             session_id: str | None = None, persistent: bool | None = None):
    from coi import sessions
    from coi.tools import get_tool

    cfg = ctx.config
    extra_env = {k: os.environ[k] for k in cfg.tool.env_passthrough if k in os.environ}
    extra_env.update(ctx.loaded_config.environment)  # the profile's
    extra_env.update(sessions.parse_env(env))
    limits = sessions.limits_config(cpu=cfg.limits.cpu, memory=cfg.limits.memory, processes=cfg.limits.processes)
    mounts = list(cfg.mounts.default) + [sessions.parse_mount(m, cwd=Path.cwd()) for m in mount]
    if storage == "":  # --storage alone
        storage_path: Path | None = cfg.paths.storage_dir / naming.workspace_hash(str(ctx.workspace))
    else:
        storage_path = Path(os.path.abspath(os.path.expanduser(storage))) if storage else None
    sessions.check_mounts(mounts, storage=storage_path is not None)
    if not ctx.workspace.is_dir():
        raise NotFoundError(f"workspace {ctx.workspace} is not a directory")
    _check_state_exposure(ctx, [*(m.host for m in mounts), *([storage_path] if storage_path else [])])
    shift = _use_shift(ctx)
    ctx.ui.detail("Workspace mount: " + ("idmapped (shift=true)" if shift else
                                         f"raw.idmap {os.getuid()} -> {cfg.incus.code_uid}"))
    return sessions.SessionRequest(
        workspace=ctx.workspace, slot=slot,
        persistent=cfg.defaults.persistent if persistent is None else persistent,
        image=cfg.defaults.image, env=extra_env, mounts=mounts, storage=storage_path,
        tool=get_tool(cfg.tool.name), binary=cfg.tool.binary, max_slots=cfg.defaults.max_slots,
        prefix=_prefix(), code_uid=cfg.incus.code_uid, host_uid=os.getuid(), host_gid=os.getgid(),
        shift=shift, lock_dir=ctx.sessions_dir / "locks",
        base_config={**sessions.CONTAINER_CONFIG, **limits}, session_id=session_id,
        profile=ctx.loaded_config.profile)


def _check_state_exposure(ctx: Context, mounted: Iterable[Path] = ()) -> None:
    """Refuse before anything is made when coi's state directory lies inside (or around) the
    workspace or a mount: a container could then write the records coi acts on."""
    from coi.statedir import check_state_dir

    check_state_dir(ctx.config.paths.sessions_dir, exposed=[ctx.workspace, *mounted])


def _use_shift(ctx: Context) -> bool:
    """idmapped mounts keep ids one to one, so they fit only when the host uid is code's."""
    cfg = ctx.config
    if cfg.incus.disable_shift or os.getuid() != cfg.incus.code_uid:
        return False
    features = ctx.incus.server().get("environment", {}).get("kernel_features", {})
    return features.get("idmapped_mounts") == "true"


# ---- shell -------------------------------------------------------------------

def shell(ctx: Context, *, slot: int = 0, resume: str | None = None,
          env: list[str], mount: list[str], storage: str | None = None, background: bool = False,
          debug: bool = False, tmux: bool = True, generation: int = 1, extra: list[str]) -> int:
    from coi import sessions, state

    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r}", f"did you mean --resume={extra[0]}?")
    if generation < 1 or (generation != 1 and not resume):
        raise UsageError("--generation N picks a save to resume: N >= 1, with --resume",
                         "coi shell --resume --generation 2; see 'coi info' for the generations")
    _check_state_exposure(ctx)
    client = ctx.incus
    cfg = ctx.config
    state.save_limits(cfg.sessions)  # a bad [sessions] value fails now, not when the session is saved
    saved = None
    persistent = ctx.flag_values.get("defaults.persistent", (None, None))[1]
    if resume:
        saved = state.find_session(ctx.sessions_dir, cfg.tool.name,
                                   session_id=None if resume == "latest" else resume, workspace=ctx.workspace,
                                   generation=generation)
        if persistent is None:
            persistent = bool(saved.metadata.get("persistent"))
        if saved.metadata.get("profile") and "defaults.profile" not in ctx.flag_values:
            ctx.set_flag("defaults.profile", "the resumed session", saved.metadata["profile"])
    req = _request(ctx, slot=slot, env=env, mount=mount, storage=storage,
                   session_id=saved.session_id if saved else None, persistent=persistent)
    with sessions.interruptible():
        session = sessions.open_session(client, req, ctx.ui.info)
        ctx.ui.info(f"Setting up session {session.session_id}...")
        with sessions.cleanup_on_interrupt(client, session):
            try:
                _start_agent(ctx, session, req, saved, debug=debug, tmux=tmux)
            except BaseException:
                if session.created:
                    _unisolate(ctx, session.name)
                raise
    ctx.ui.info(f"Session ID: {session.session_id}")
    ctx.ui.info(f"Container: {session.name}")
    ctx.ui.info(f"Workspace: {session.workspace}")
    if background or not sys.stdin.isatty():
        if not background:
            ctx.ui.info("No terminal here: the session keeps running in the background.")
        ctx.ui.info(f"Attach with: coi attach {session.name}")
        return 0
    if tmux:
        argv = sessions.attach_argv(client, session.name, code_uid=req.code_uid, term=os.environ.get("TERM"))
    else:
        agent = None if debug else _agent_command(req, session, saved)
        command = sessions.env_via_file(client, session.name, agent or ["bash", "-l"], _agent_env(req),
                                        uid=req.code_uid)
        argv = client.exec_argv(session.name, sessions.as_user(command, uid=req.code_uid),
                                cwd=sessions.WORKSPACE, terminal=True)
    code = sessions.run_attached(argv, again_if_lost=tmux)
    return _after_attach(ctx, session.name, code, req.code_uid)


def _agent_env(req) -> dict[str, str]:
    from coi import sessions

    return sessions.agent_environment(term=os.environ.get("TERM"), extra=req.env)


def _start_agent(ctx: Context, session, req, saved, *, debug: bool, tmux: bool) -> None:
    """Start the container and the agent in its tmux session (unless it already runs)."""
    from coi import sessions

    client = ctx.incus
    # Files go in first: a new container is still stopped, so they are there
    # before anything in it runs (and the boot does not slow the copy).
    if saved is not None and session.created:
        _restore_state(ctx, session.name, saved, req)
    _inject_credentials(ctx, session.name, req)
    _start_isolated(ctx, session.name, ctx.ui.info)
    ctx.ui.info("Starting session...")
    # A container created just now cannot have a tmux session yet.
    if tmux and (session.created or not sessions.has_tmux_session(client, session.name, req.code_uid)):
        agent = None if debug else _agent_command(req, session, saved)
        sessions.start_tmux(client, session.name, code_uid=req.code_uid, env=_agent_env(req),
                            command=sessions.agent_shell_command(agent))


def _start_isolated(ctx: Context, name: str, log) -> None:
    """Start the container with its network rules in place (fail closed).

    A pinned NIC (every container coi creates) is filtered before the container
    starts; an older container's rules wait for its DHCP address after the start.
    """
    from coi import network, sessions

    policy = network.plan(ctx.config.network)
    early = network.applies_before_start(ctx.incus.instance(name), policy, ctx.sessions_dir)
    if early:
        _isolate(ctx, name, policy, log)
    sessions.ensure_running(ctx.incus, name)
    if not early:
        _isolate(ctx, name, policy, log)


def _isolate(ctx: Context, name: str, policy, log) -> None:
    from coi import network

    backend = network.apply(ctx.incus, name, policy, sessions_dir=ctx.sessions_dir, log=log)
    log(f"Network: {policy.mode} ({backend})")


def _unisolate(ctx: Context, name: str) -> None:
    from coi import network

    network.remove(name, sessions_dir=ctx.sessions_dir, client=ctx.incus,
                   privileged_command=ctx.config.network.privileged_command)


def _need_terminal(what: str, name: str) -> None:
    if not sys.stdin.isatty():
        raise UsageError(f"{what} needs a terminal", f"run it from a terminal, or use 'coi tmux capture {name}'")


def _agent_command(req, session, saved) -> list[str]:
    if saved is None:
        return req.tool.command(binary=req.binary, session_id=session.session_id)
    return req.tool.resume_command(saved.path / "state", binary=req.binary, session_id=session.session_id)


def _restore_state(ctx: Context, name: str, saved, req) -> None:
    from coi import sessions

    state_dir = saved.path / "state"
    if state_dir.is_dir():
        ctx.incus.push_tree(name, state_dir, f"{sessions.CODE_HOME}/{req.tool.state_dir}",
                            uid=req.code_uid, gid=req.code_uid)


def _inject_credentials(ctx: Context, name: str, req) -> None:
    """Fresh credentials on every start and resume: only the tool's essential files."""
    from coi import sessions
    from coi.tools import host_home

    files = req.tool.credentials(host_home(), full_host_config=ctx.config.tool.full_host_config)
    dirs = sorted({str(Path(rel).parent) for rel in files} - {"."})
    for rel in dirs:
        ctx.incus.make_dir(name, f"{sessions.CODE_HOME}/{rel}", uid=req.code_uid, gid=req.code_uid, mode=0o700)
    for rel, content in files.items():
        ctx.incus.push_file(name, f"{sessions.CODE_HOME}/{rel}", content, uid=req.code_uid, gid=req.code_uid,
                            mode=0o600)
    ctx.ui.detail(f"Copied {len(files)} credential/settings file(s) for {req.tool.name}")


def _after_attach(ctx: Context, name: str, code: int, code_uid: int) -> int:
    """Detached, left bash, or the container stopped from inside: act accordingly."""
    from coi import sessions

    client = ctx.incus
    try:
        inst = client.instance(name)
    except NotFoundError:
        return 0
    if code == 0 and not sessions.is_stopped(inst):
        ctx.ui.info(f"Detached; container {name} keeps running. Re-attach with: coi attach {name}")
        return 0
    if sessions.wait_stopped(client, name, timeout=60):
        with sessions.signals_ignored():  # the save and the delete run to their end
            end_session(ctx, name)
        return 0
    ctx.ui.info(f"Container {name} keeps running. Re-attach with: coi attach {name}")
    return 0


def end_session(ctx: Context, name: str, *, inst: dict[str, Any] | None = None) -> None:
    """Save the session of a (stopped or running) container, then delete it unless persistent."""
    from coi import sessions, state
    from coi.tools import get_tool

    client = ctx.incus
    inst = inst or client.instance(name)
    cfg = inst.get("config") or {}
    key = naming.CONFIG_PREFIX
    tool = cfg.get(f"{key}tool") or ctx.config.tool.name
    persistent = cfg.get(f"{key}persistent") == "true"
    session_id = cfg.get(f"{key}session_id")
    if session_id:
        ctx.ui.info("Saving session data...")
        slot = cfg.get(f"{key}slot", "")
        state.save_session(client, name, tool=get_tool(tool), limits=state.save_limits(ctx.config.sessions),
                           warn=ctx.ui.warn, sessions_dir=ctx.sessions_dir, metadata={
                               "session_id": session_id, "container_name": name, "persistent": persistent,
                               "workspace": cfg.get(f"{key}workspace", ""), "tool": tool,
                               "slot": int(slot) if slot.isdigit() else None,
                               "image": cfg.get(f"{key}image", ""), "profile": cfg.get(f"{key}profile")})
        ctx.ui.info("Session data saved")
    if not persistent:
        sessions.remove_container(client, name)
    _unisolate(ctx, name)


# ---- run ---------------------------------------------------------------------

def run(ctx: Context, *, slot: int = 0, env: list[str], mount: list[str],
        storage: str | None = None, capture: bool = False, timeout: float = 0, command: list[str]) -> int:
    from coi import sessions

    if not command:
        raise UsageError("no command given", "coi run [flags] -- COMMAND [ARG...]")
    if len(command) == 1 and any(c in command[0] for c in " \n|;&<>()$`*?'\""):
        command = ["bash", "-c", command[0]]  # one argument with shell syntax: the user wants a shell
    client = ctx.incus
    req = _request(ctx, slot=slot, env=env, mount=mount, storage=storage)
    # SIGTERM and SIGHUP end coi run the way Ctrl+C does, in every phase: whatever it
    # made (container, rules, watcher) is removed again.
    with sessions.interruptible():
        session = sessions.open_session(client, req, ctx.ui.detail)
        try:
            return _run_command(ctx, session, req, command, capture=capture, timeout=timeout)
        finally:
            if not session.persistent:
                with sessions.signals_ignored():  # a second signal must not cut the clean-up short
                    sessions.remove_container(client, session.name)
                    _unisolate(ctx, session.name)


def _run_command(ctx: Context, session, req, command: list[str], *, capture: bool, timeout: float) -> int:
    import subprocess

    from coi import sessions

    client = ctx.incus
    _start_isolated(ctx, session.name, ctx.ui.detail)
    env_vars = _agent_env(req)
    if capture:
        if timeout:  # coreutils' timeout inside: exits 124 like coi run does
            command = ["timeout", f"{timeout:g}", *command]
        result = client.exec(session.name, sessions.as_user(sessions.once_argv(command), uid=req.code_uid),
                             env=env_vars, cwd=sessions.WORKSPACE)
        stderr = sessions.checked_stderr(result, ctx.ui.warn)
        ctx.ui.out(json.dumps({"stdout": result.stdout, "stderr": stderr, "exit_code": result.exit_code}))
        return result.exit_code
    terminal = sys.stdin.isatty()
    guarded = sessions.env_via_file(client, session.name, sessions.once_argv(command, terminal=terminal),
                                    env_vars, uid=req.code_uid)
    argv = client.exec_argv(session.name, sessions.as_user(guarded, uid=req.code_uid), cwd=sessions.WORKSPACE,
                            terminal=terminal)
    try:
        return sessions.run_streamed(argv, timeout=timeout or None, warn=ctx.ui.warn)
    except subprocess.TimeoutExpired:
        ctx.ui.error(f"command timed out after {timeout:g}s")
        return 124


# ---- attach, list, info ------------------------------------------------------------

def attach(ctx: Context, *, name: str | None = None, slot: int = 0, bash: bool = False) -> int:
    from coi import sessions

    client = ctx.incus
    code_uid = ctx.config.incus.code_uid
    if name is None:
        running = [c for c in sessions.list_containers(client, _prefix(), with_state=False)
                   if c.status == "Running"]
        if slot:
            running = [c for c in running if c.workspace == str(ctx.workspace) and c.slot == slot]
            if not running:
                raise NotFoundError(f"no running session in slot {slot} of {ctx.workspace}", "see 'coi list'")
        if not running:
            ctx.ui.out("No active sessions")
            return 0
        if len(running) > 1:
            ctx.ui.out("Active sessions:")
            for c in running:
                ctx.ui.out(f"  {c.name}  (slot {c.slot}, {c.workspace})")
            ctx.ui.out("Attach with: coi attach <name>")
            return 0
        name = running[0].name
    inst = sessions.coi_container(client, name, _prefix())
    _need_terminal("coi attach", name)
    if inst["status"] != "Running":
        raise CoiError(f"container {name} is not running ({inst['status'].lower()})",
                       f"start it again with 'coi shell --persistent --slot {inst['config'].get('user.coi.slot', 'N')}'")
    if not bash and not sessions.has_tmux_session(client, name, code_uid):
        raise CoiError(f"container {name} has no coi tmux session", f"open a shell with 'coi attach {name} --bash'")
    argv = sessions.attach_argv(client, name, code_uid=code_uid, term=os.environ.get("TERM"), bash=bash)
    code = sessions.run_attached(argv, again_if_lost=not bash)
    return _after_attach(ctx, name, code, code_uid)


def list_sessions(ctx: Context, *, all: bool = False, format: str = "text") -> int:
    from coi import sessions

    if format not in ("text", "json"):
        raise UsageError(f"unknown format {format!r}", "use --format text or --format json")
    containers = sessions.list_containers(ctx.incus, _prefix())
    saved = []
    if all:
        from coi import state

        saved = state.saved_sessions(ctx.sessions_dir)
    from coi.cli.render import render_sessions

    render_sessions(ctx.ui, containers, saved, format=format, include_saved=all)
    return 0


def info(ctx: Context, *, session_id: str | None = None) -> int:
    from coi import state

    cfg = ctx.config
    saved = state.find_session(ctx.sessions_dir, cfg.tool.name, session_id=session_id,
                               workspace=ctx.workspace)
    md = saved.metadata
    exists = ctx.incus.exists(md.get("container_name", "")) if md.get("container_name") else False
    for label, value in (("Session ID", md.get("session_id")), ("Container", md.get("container_name")),
                         ("Container exists", "yes" if exists else "no"),
                         ("Workspace", md.get("workspace")), ("Tool", md.get("tool")),
                         ("Persistent", "yes" if md.get("persistent") else "no"),
                         ("Saved at", md.get("saved_at")), ("Size", f"{saved.size()} bytes"),
                         ("Path", str(saved.path))):
        ctx.ui.out(f"{label}: {value}")
    for gen in state.generations(saved):
        ctx.ui.out(f"Generation {gen.generation}: saved at {gen.metadata.get('saved_at')}, "
                   f"{gen.generation_size()} bytes")
    return 0


# ---- shutdown, kill, persist, clean ----------------------------------------------

def _targets(ctx: Context, names: list[str], all: bool, force: bool, verb: str) -> list[dict[str, Any]]:
    """The coi containers named (unknown names warn), or all of them after a yes."""
    from coi import sessions

    if not names and not all:
        raise UsageError("name a container or use --all", f"coi {verb} NAME... | --all")
    client = ctx.incus
    if all:
        found = [i for i in client.instances(recursion=1) if sessions.is_coi(i, _prefix())]
        if found and not force:
            _confirm(f"{verb.capitalize()} {len(found)} container(s): {', '.join(i['name'] for i in found)}?")
        return found
    found = []
    for name in names:
        try:
            found.append(sessions.coi_container(client, name, _prefix()))
        except CoiError as exc:
            ctx.ui.warn(exc.message)
    return found


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise UsageError("refusing to ask without a terminal", "add --force to confirm")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CoiError("cancelled")


def kill(ctx: Context, *, names: list[str], all: bool = False, force: bool = False) -> int:
    from coi import sessions

    targets = _targets(ctx, names, all, force, "kill")
    for inst in targets:
        sessions.remove_container(ctx.incus, inst["name"])
        _unisolate(ctx, inst["name"])
        ctx.ui.info(f"Killed {inst['name']}")
    if names and not targets:
        return 1
    return 0


def shutdown(ctx: Context, *, names: list[str], all: bool = False, timeout: int = 60, force: bool = False) -> int:
    from coi import sessions

    targets = _targets(ctx, names, all, force, "shutdown")
    client = ctx.incus
    for inst in targets:
        name = inst["name"]
        if not sessions.is_stopped(inst):
            try:
                client.stop(name, timeout=timeout)
            except CoiError:
                client.stop(name, force=True)
        end_session(ctx, name)
        ctx.ui.info(f"Shut down {name}")
    return 1 if names and not targets else 0


def persist(ctx: Context, *, names: list[str], all: bool = False, force: bool = False) -> int:
    from coi import state

    targets = _targets(ctx, names, all, force, "persist")
    key = naming.CONFIG_PREFIX
    for inst in targets:
        ctx.incus.update_instance(inst["name"], config={f"{key}persistent": "true"})
        sid = (inst.get("config") or {}).get(f"{key}session_id")
        tool = (inst.get("config") or {}).get(f"{key}tool") or ctx.config.tool.name
        if sid:
            try:
                saved = state.find_session(ctx.sessions_dir, tool, session_id=sid,
                                           workspace=ctx.workspace)
                state.update_metadata(saved, persistent=True)
            except NotFoundError:
                pass
        ctx.ui.info(f"{inst['name']} is now persistent")
    return 1 if names and not targets else 0


def clean(ctx: Context, *, force: bool = False, sessions: bool = False, all: bool = False) -> int:
    from coi import sessions as svc
    from coi import state

    client = ctx.incus
    stopped = [i for i in client.instances(recursion=1) if svc.is_coi(i, _prefix())
               and svc.is_stopped(i) and i["config"].get(f"{naming.CONFIG_PREFIX}persistent") != "true"]
    saved = state.saved_sessions(ctx.sessions_dir) if (sessions or all) else []
    from coi import network

    # Every project: a container that still exists anywhere keeps its rules.
    existing = {i["name"] for i in client.instances(recursion=1, all_projects=True)}
    for name in network.clean_orphans(existing, sessions_dir=ctx.sessions_dir, client=client,
                                      privileged_command=ctx.config.network.privileged_command):
        ctx.ui.info(f"Removed network rules of {name}")
    if not stopped and not saved:
        ctx.ui.info("Nothing to clean")
        return 0
    if not force:
        _confirm(f"Delete {len(stopped)} stopped container(s) and {len(saved)} saved session(s)?")
    for inst in stopped:
        end_session(ctx, inst["name"], inst=inst)
        ctx.ui.info(f"Removed {inst['name']}")
    for s in saved:
        state.delete_saved(s)
        ctx.ui.info(f"Deleted saved session {s.session_id}")
    return 0
