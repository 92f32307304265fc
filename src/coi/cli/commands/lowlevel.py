"""Low-level commands: container, file and tmux operations on named containers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from coi import naming
from coi.cli.context import Context
from coi.errors import CoiError, UsageError


def container_help(ctx: Context) -> int:
    raise UsageError("missing container action", "coi container launch|start|stop|delete|exists|running|exec|mount")


def file_help(ctx: Context) -> int:
    raise UsageError("missing file action", "coi file push|pull")


# ---- container -------------------------------------------------------------

def container_launch(ctx: Context, *, launch_image: str, name: str, ephemeral: bool = False) -> int:
    """Create and start, filtered like a session: the network rules go on before it runs
    (the coi bridge gives a container without rules no network at all)."""
    from coi import network, sessions
    from coi.cli.commands.sessions import _start_isolated

    client = ctx.incus
    sessions.launch_container(client, name, image=launch_image, ephemeral=ephemeral,
                              lock_dir=ctx.sessions_dir / "locks")
    try:
        with sessions.interruptible():
            _start_isolated(ctx, name, ctx.ui.detail)
    except BaseException:
        with sessions.signals_ignored():
            sessions.remove_container(client, name)
            network.remove(name, sessions_dir=ctx.sessions_dir, client=client,
                           privileged_command=ctx.config.network.privileged_command)
        raise
    ctx.ui.info(f"Launched {name}")
    return 0


def container_start(ctx: Context, *, name: str) -> int:
    """Start a container; one of coi's gets its network rules first, as a session would."""
    from coi import sessions
    from coi.cli.commands.sessions import _start_isolated

    inst = ctx.incus.instance(name)
    if sessions.is_coi(inst, naming.container_prefix()):
        _start_isolated(ctx, name, ctx.ui.detail)
    else:
        ctx.incus.start(name)
    return 0


def container_stop(ctx: Context, *, name: str, force: bool = False) -> int:
    ctx.incus.stop(name, force=force)
    return 0


def container_delete(ctx: Context, *, name: str, force: bool = False) -> int:
    client = ctx.incus
    if client.instance(name)["status"] != "Stopped":
        if not force:
            raise CoiError(f"container {name} is running", f"stop it first or use 'coi container delete --force {name}'")
        client.stop(name, force=True)
    client.delete(name)
    return 0


def container_exists(ctx: Context, *, name: str) -> int:
    return 0 if ctx.incus.exists(name) else 1


def container_running(ctx: Context, *, name: str) -> int:
    from coi.errors import NotFoundError

    try:
        return 0 if ctx.incus.instance(name)["status"] == "Running" else 1
    except NotFoundError:
        return 1


def container_exec(ctx: Context, *, name: str, user: int | None = None, group: int | None = None,
                   env: list[str], cwd: str = "/workspace", capture: bool = False, format: str | None = None,
                   command: list[str]) -> int:
    from coi.sessions import parse_env

    if not command:
        raise UsageError("no command given", "coi container exec NAME -- COMMAND [ARG...]")
    if format is not None and not capture:
        raise UsageError("--format needs --capture")
    if format not in (None, "json", "raw"):
        raise UsageError(f"unknown format {format!r}", "use --format json or --format raw")
    variables = parse_env(env)
    if user is not None and group is None:
        group = user
    from coi import sessions

    client = ctx.incus
    as_code = user is not None and user == ctx.config.incus.code_uid

    def started(argv: list[str]) -> list[str]:
        """code gets its full group list, as a login would (Incus's user/group give none)."""
        return sessions.as_user(argv, uid=user, gid=group) if as_code else argv  # type: ignore[arg-type]

    incus_user, incus_group = (None, None) if as_code else (user, group)
    if as_code:  # what a login as code would have; --env values win
        variables = {**sessions.tmux_env(), "LOGNAME": "code", "SHELL": "/bin/bash", **variables}
    if capture:  # the user's command, guarded like coi run's: never started twice
        result = client.exec(name, started(sessions.once_argv(command)), env=variables, user=incus_user or 0,
                             group=incus_group or 0, cwd=cwd)
        stderr = sessions.checked_stderr(result, ctx.ui.warn)
        if format == "raw":
            sys.stdout.write(result.stdout)
            sys.stdout.flush()
        else:
            ctx.ui.out(json.dumps({"stdout": result.stdout, "stderr": stderr, "exit_code": result.exit_code}))
        return result.exit_code
    client.instance(name)  # a clear error for an unknown container
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    guarded = sessions.env_via_file(client, name, sessions.once_argv(command, terminal=terminal), variables,
                                    uid=user or 0)
    argv = client.exec_argv(name, started(guarded), user=incus_user, group=incus_group, cwd=cwd, terminal=terminal)
    return sessions.run_streamed(argv, timeout=None, warn=ctx.ui.warn, stdin=True)


def container_mount(ctx: Context, *, name: str, device: str, source: str, path: str, shift: bool = True) -> int:
    src = Path(source).expanduser().absolute()
    if not src.exists():
        raise CoiError(f"{src} does not exist")
    spec = {"type": "disk", "source": str(src), "path": path}
    if shift:
        spec["shift"] = "true"
    ctx.incus.add_device(name, device, spec)
    return 0


# ---- file --------------------------------------------------------------------

def parse_remote(spec: str) -> tuple[str, str]:
    """``NAME:/PATH`` -> (name, path)."""
    name, sep, path = spec.partition(":")
    if not sep or not name or not path.startswith("/"):
        raise UsageError(f"{spec!r} is not NAME:/PATH", "for example my-box:/tmp/file")
    return name, path


def file_push(ctx: Context, *, source: str, target: str, recursive: bool = False) -> int:
    name, path = parse_remote(target)
    local = Path(source)
    if not local.exists():
        raise CoiError(f"{local} does not exist")
    if local.is_dir() and not recursive:
        raise UsageError(f"{local} is a directory", "use -r to copy a directory")
    client = ctx.incus
    client.instance(name)
    if local.is_dir():
        client.push_tree(name, local, path)
    else:
        client.push_file(name, path, local.read_bytes(), mode=local.stat().st_mode & 0o7777)
    return 0


def file_pull(ctx: Context, *, source: str, target: str, recursive: bool = False) -> int:
    name, path = parse_remote(source)
    client = ctx.incus
    content, info = client.pull_file(name, path)
    local = Path(target)
    if info["type"] == "directory":
        if not recursive:
            raise UsageError(f"{name}:{path} is a directory", "use -r to copy a directory")
        client.pull_tree(name, path, local)
        return 0
    if local.is_dir():
        local = local / Path(path).name
    local.write_bytes(content)
    local.chmod(info["mode"])
    return 0


# ---- tmux ----------------------------------------------------------------------

def _running_session(ctx: Context, name: str) -> None:
    from coi import sessions

    inst = sessions.coi_container(ctx.incus, name, naming.container_prefix())
    if inst["status"] != "Running":
        raise CoiError(f"container {name} is not running")
    if not sessions.has_tmux_session(ctx.incus, name, ctx.config.incus.code_uid):
        raise CoiError(f"container {name} has no coi tmux session", f"open a shell with 'coi attach {name} --bash'")


def tmux_list(ctx: Context) -> int:
    from coi import sessions

    code_uid = ctx.config.incus.code_uid
    running = [c for c in sessions.list_containers(ctx.incus, naming.container_prefix(), with_state=False)
               if c.status == "Running"]
    found = [c.name for c in running if sessions.has_tmux_session(ctx.incus, c.name, code_uid)]
    if not found:
        ctx.ui.out("No active sessions")
        return 0
    ctx.ui.out("Active sessions:")
    for name in found:
        ctx.ui.out(f"  {name}  {naming.tmux_session(name)}")
    return 0


def tmux_send(ctx: Context, *, name: str, text: str) -> int:
    from coi import sessions

    _running_session(ctx, name)
    target = naming.tmux_session(name)
    code_uid = ctx.config.incus.code_uid
    from coi.errors import OperationFailedError
    from coi.incus import EXEC_NOT_STARTED

    for keys in (["-l", text], ["Enter"]):
        try:
            result = sessions.exec_code(ctx.incus, name, sessions.tmux_argv("send-keys", "-t", target, *keys),
                                        code_uid=code_uid, cwd=sessions.CODE_HOME, retry=False)  # keys once
        except OperationFailedError as exc:
            if EXEC_NOT_STARTED not in exc.message:
                raise
            raise OperationFailedError("Incus lost track of the command (tmux send-keys): the keys may or may "
                                       "not have been typed", f"look at the pane first: coi tmux capture {name}") from None
        if result.exit_code != 0:
            raise CoiError(f"tmux send-keys failed: {result.stderr.strip()}")
    return 0


def tmux_capture(ctx: Context, *, name: str) -> int:
    from coi import sessions

    _running_session(ctx, name)
    result = sessions.exec_code(ctx.incus, name, sessions.tmux_argv("capture-pane", "-p", "-t",
                                                                    naming.tmux_session(name)),
                                code_uid=ctx.config.incus.code_uid, cwd=sessions.CODE_HOME)
    sys.stdout.write(result.stdout)
    return result.exit_code
