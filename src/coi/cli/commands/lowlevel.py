"""Low-level commands: container, file and tmux operations on named containers."""

from __future__ import annotations

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
    """Create and start, filtered like a session (see ``coi.sessions.manage.launch``)."""
    from coi.sessions import manage

    manage.launch(ctx.place, name, image=launch_image, ephemeral=ephemeral)
    ctx.ui.info(f"Launched {name}")
    return 0


def container_start(ctx: Context, *, name: str) -> int:
    from coi.sessions import manage

    manage.start_container(ctx.place, name)
    return 0


def container_stop(ctx: Context, *, name: str, force: bool = False) -> int:
    from coi.sessions import manage

    manage.stop_container(ctx.place, name, force=force)
    return 0


def container_delete(ctx: Context, *, name: str, force: bool = False) -> int:
    from coi.sessions import manage

    manage.delete_container(ctx.place, name, force=force)
    return 0


def container_exists(ctx: Context, *, name: str) -> int:
    from coi.sessions import manage

    return 0 if manage.exists(ctx.place, name) else 1


def container_running(ctx: Context, *, name: str) -> int:
    from coi.sessions import manage

    return 0 if manage.is_running(ctx.place, name) else 1


def container_exec(ctx: Context, *, name: str, user: int | None = None, group: int | None = None,
                   env: list[str], cwd: str = "/workspace", capture: bool = False, format: str | None = None,
                   command: list[str]) -> int:
    from coi.sessions import lifecycle, manage, parse_env

    if not command:
        raise UsageError("no command given", "coi container exec NAME -- COMMAND [ARG...]")
    if format is not None and not capture:
        raise UsageError("--format flag requires --capture", "coi container exec NAME --capture --format raw -- CMD")
    result = manage.exec_in(ctx.place, name, command, user=user, group=group, env=parse_env(env), cwd=cwd,
                            capture=capture)
    if not isinstance(result, lifecycle.Captured):
        return result
    if format == "raw":  # stdout alone, and the command's own exit code
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        return result.exit_code
    ctx.ui.out(result.to_json())  # the command's exit code is in the JSON; coi itself succeeded
    return 0


def container_mount(ctx: Context, *, name: str, device: str, source: str, path: str, shift: bool = True) -> int:
    from coi.sessions import manage

    manage.add_mount(ctx.place, name, device=device, source=source, path=path, shift=shift)
    return 0


# ---- file --------------------------------------------------------------------

def parse_remote(spec: str) -> tuple[str, str]:
    """``NAME:/PATH`` -> (name, path)."""
    name, sep, path = spec.partition(":")
    if not sep or not name or not path.startswith("/"):
        raise UsageError(f"{spec!r} is not NAME:/PATH: the expected format is container:path",
                         "for example my-box:/tmp/file")
    return name, path


def file_push(ctx: Context, *, source: str, target: str, recursive: bool = False) -> int:
    from coi.sessions import manage

    name, path = parse_remote(target)
    local = Path(source)
    if not local.exists():
        raise CoiError(f"{local} does not exist")
    if local.is_dir() and not recursive:
        raise UsageError(f"{local} is a directory", "use -r to copy a directory")
    manage.push(ctx.place, local, name, path)
    ctx.ui.info(f"Pushed {'directory' if local.is_dir() else 'file'} {local} to {name}:{path}")
    return 0


def file_pull(ctx: Context, *, source: str, target: str, recursive: bool = False) -> int:
    from coi.sessions import manage

    name, path = parse_remote(source)
    written = manage.pull(ctx.place, name, path, Path(target), recursive=recursive)
    ctx.ui.info(f"Pulled {name}:{path} to {written}")
    return 0


# ---- tmux ----------------------------------------------------------------------

def tmux_list(ctx: Context) -> int:
    from coi.sessions import manage

    found = manage.tmux_sessions(ctx.place)
    if not found:
        ctx.ui.out("No active sessions")
        return 0
    ctx.ui.out("Active sessions:")
    for name in found:
        ctx.ui.out(f"  {name}  {naming.tmux_session(name)}")
    return 0


def tmux_send(ctx: Context, *, name: str, text: str) -> int:
    from coi.sessions import manage

    manage.tmux_send(ctx.place, name, text)
    return 0


def tmux_capture(ctx: Context, *, name: str) -> int:
    from coi.sessions import manage

    text, code = manage.tmux_capture(ctx.place, name)
    sys.stdout.write(text)
    return code
