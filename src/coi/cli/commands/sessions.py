"""Session commands: shell, run, attach, list, info, shutdown, kill, persist, clean.

Each parses what the person gave, calls the session service (``coi.sessions``) and
prints its result."""

from __future__ import annotations

import os
import sys
from typing import Any

from coi.cli.context import Context
from coi.errors import CoiError, UsageError


def _request(ctx: Context, **kw: Any):
    from coi.sessions import lifecycle

    loaded = ctx.loaded_config
    return lifecycle.request(ctx.place, profile_env=loaded.environment, profile=loaded.profile, **kw)


# ---- shell -------------------------------------------------------------------

def shell(ctx: Context, *, slot: int = 0, resume: str | None = None,
          env: list[str], mount: list[str], storage: str | None = None, background: bool = False,
          debug: bool = False, tmux: bool = True, generation: int = 1, format: str = "text",
          branch: str | None = None, carry: bool = False, port: list[str] | None = None,
          extra: list[str]) -> int:
    from coi.sessions import commands, lifecycle, signals, state

    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r}", f"did you mean --resume={extra[0]}?")
    if generation < 1 or (generation != 1 and not resume):
        raise UsageError("--generation N picks a save to resume: N >= 1, with --resume",
                         "coi shell --resume --generation 2; see 'coi info' for the generations")
    if format == "json" and not background:
        raise UsageError("--format json needs --background", "coi shell --background --format json")
    lifecycle.check_state_exposure(ctx.place)
    cfg = ctx.config
    state.save_limits(cfg.sessions)  # a bad [sessions] value fails now, not when the session is saved
    saved = None
    persistent = ctx.flag_values.get("defaults.persistent", (None, None))[1]
    if resume:
        saved = lifecycle.resumed(ctx.place, resume, generation=generation, branch=branch)
        if persistent is None:
            persistent = bool(saved.metadata.get("persistent"))
        if saved.metadata.get("profile") and "defaults.profile" not in ctx.flag_values:
            ctx.set_flag("defaults.profile", "the resumed session", saved.metadata["profile"])
    req = _request(ctx, slot=slot, env=env, mount=mount, storage=storage,
                   session_id=saved.session_id if saved else None, persistent=persistent,
                   branch=branch, carry=carry, saved=saved, port=port or [])
    place = ctx.place
    with signals.interruptible():
        session = lifecycle.open_session(place, req)
        ctx.ui.info(f"Setting up session {session.session_id}...")
        lifecycle.start(place, session, req, saved, debug=debug, tmux_session=tmux)
    ctx.ui.info(f"Session ID: {session.session_id}")
    ctx.ui.info(f"Container: {session.name}")
    ctx.ui.info(f"Workspace: {session.workspace}")
    for published in session.ports:
        ctx.ui.info(f"Port: {published.host_endpoint} -> {published.container} in the container")
    if session.ssh_agent:
        ctx.ui.info("SSH agent: forwarded (SSH_AUTH_SOCK in the container)")
    if background or not sys.stdin.isatty():
        if not background:
            ctx.ui.info("No terminal here: the session keeps running in the background.")
        ctx.ui.info(f"Attach with: coi attach {session.name}")
        if format == "json":
            from coi.cli.render import print_json

            print_json(ctx.ui, {"container": session.name, "session_id": session.session_id,
                                "slot": session.slot, "workspace": str(session.workspace),
                                "network": cfg.network.mode,
                                "branch": req.branch.branch if req.branch else None,
                                "ports": [p.to_json() for p in session.ports], "ssh_agent": session.ssh_agent})
        return 0
    argv = lifecycle.attached_argv(place, session, req, saved, debug=debug, tmux_session=tmux)
    code = commands.run_attached(argv, again_if_lost=tmux)
    lifecycle.after_attach(place, session.name, code)
    return 0


# ---- run ---------------------------------------------------------------------

def run(ctx: Context, *, slot: int = 0, env: list[str], mount: list[str],
        storage: str | None = None, capture: bool = False, timeout: float = 0, branch: str | None = None,
        carry: bool = False, port: list[str] | None = None, prompt: str | None = None,
        prompt_file: str | None = None, prompt_name: str | None = None, command: list[str]) -> int:
    from coi.sessions import lifecycle, prompts

    chosen = prompts.choose(text=prompt, file=prompt_file, name=prompt_name, command=command,
                            loaded=ctx.loaded_config, workspace=ctx.workspace)
    if chosen is None and not command:
        raise UsageError("no command given", "Usage: coi run [flags] [--] COMMAND [ARG...], or coi run --prompt TEXT")
    if len(command) == 1 and any(c in command[0] for c in " \n|;&<>()$`*?'\""):
        command = ["bash", "-c", command[0]]  # one argument with shell syntax: the user wants a shell
    req = _request(ctx, slot=slot, env=env, mount=mount, storage=storage, branch=branch, carry=carry,
                   port=port or [])
    if chosen is not None:
        if chosen.source:  # a file or a named prompt: say which, before it runs
            ctx.ui.info(f"Prompt: {chosen.source}")
        result = lifecycle.run_agent(ctx.place, req, chosen.text, capture=capture, timeout=timeout)
    else:
        result = lifecycle.run(ctx.place, req, command, capture=capture, timeout=timeout)
    if isinstance(result, lifecycle.Captured):
        ctx.ui.out(result.to_json())
        return result.exit_code
    return result


# ---- attach, list, info ------------------------------------------------------------

def attach(ctx: Context, *, name: str | None = None, slot: int = 0, bash: bool = False) -> int:
    from coi.sessions import commands, lifecycle, manage, tmux

    place = ctx.place
    if name is None:
        running = manage.running(place, slot=slot)
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
    inst = manage.coi_container(place, name)
    need_terminal("coi attach", name)
    manage.check_attachable(place, inst, bash=bash)
    revive_proxy(ctx, [name])
    revive_timers(ctx, [name])
    ctx.ui.info(f"Attaching to {name}...")
    argv = tmux.attach_argv(ctx.incus, name, code_uid=ctx.config.incus.code_uid, term=os.environ.get("TERM"),
                            bash=bash)
    code = commands.run_attached(argv, again_if_lost=not bash)
    lifecycle.after_attach(place, name, code)
    return 0


def need_terminal(what: str, name: str) -> None:
    if not sys.stdin.isatty():
        raise UsageError(f"{what} needs a terminal", f"run it from a terminal, or use 'coi tmux capture {name}'")


def list_sessions(ctx: Context, *, all: bool = False, format: str = "text") -> int:
    from coi import naming
    from coi.cli.render import render_sessions
    from coi.sessions import containers

    found = containers.list_containers(ctx.incus, naming.container_prefix())
    saved = []
    if all:
        from coi.sessions import state

        saved = state.saved_sessions(ctx.sessions_dir)
    if ctx.workspace_given:  # -w: that workspace's containers and sessions only
        found = [c for c in found if c.workspace == str(ctx.workspace)]
        saved = [s for s in saved if s.metadata.get("workspace") == str(ctx.workspace)]
    revive_proxy(ctx, [c.name for c in found if c.status == "Running"])
    revive_timers(ctx, [c.name for c in found if c.status == "Running"])
    found = _with_refused_counts(ctx, found)
    branches = _branch_statuses(ctx, found)
    render_sessions(ctx.ui, found, saved, format=format, include_saved=all, branches=branches)
    return 0


def revive_proxy(ctx: Context, running: list[str]) -> None:
    """coi's proxy started again (and said so) when it died under running sessions by name."""
    if not (ctx.sessions_dir / "network" / "proxy").is_dir():
        return  # no session by name ever ran: nothing to import
    from coi.network import revive_proxy as revive

    if revive(ctx.sessions_dir, running):
        ctx.ui.warn("coi's egress proxy had ended, so sessions by name had no egress; started it again")


def revive_timers(ctx: Context, running: list[str]) -> None:
    """A session timer that ended while its session runs (killed, crashed) started again, on
    its own record, so that [limits] max_duration still holds; a warning says so."""
    if not (ctx.sessions_dir / "timers").is_dir():
        return  # no limited session ever ran: nothing to import
    from coi.sessions import timer

    for name in timer.revive(ctx.sessions_dir, ctx.incus, running):
        ctx.ui.warn(f"the session timer of {name} had ended; started it again (the session still ends at "
                    f"its deadline)")


def _with_refused_counts(ctx: Context, found: list[Any]) -> list[Any]:
    """Each container with the count of connections its proxy refused (allowlist by name)."""
    network_dir = ctx.sessions_dir / "network"
    if not (network_dir / "connections").is_dir():
        return found
    import dataclasses

    from coi.network import connlog

    return [dataclasses.replace(c, refused_connections=connlog.refused_count(network_dir, c.name)) for c in found]


def _branch_statuses(ctx: Context, found: list[Any]) -> list[Any] | None:
    """The branch sessions ``coi list`` shows (None when there are none: no section then)."""
    if not (ctx.sessions_dir / "branches").is_dir():
        return None
    from coi.branches import copies

    recorded = copies.all_branches(ctx.sessions_dir, ctx.workspace if ctx.workspace_given else None)
    if not recorded:
        return None
    import dataclasses

    from coi.branches import review

    using = {(c.workspace, c.branch): c for c in found if c.branch}
    out = []
    for status in review.statuses(recorded):
        c = using.get((str(status.branch.workspace), status.branch.name))
        out.append(dataclasses.replace(status, container=c.name, state=c.status) if c else status)
    return out


def logs(ctx: Context, *, name: str, network_log: bool = False, follow: bool = False, format: str = "text") -> int:
    """A session's network log (the proxy's connections), printed or followed."""
    import json

    from coi.cli.render import shown
    from coi.errors import NotFoundError
    from coi.network import connlog
    from coi.network.attach import check_name

    path = connlog.log_path(ctx.sessions_dir / "network", check_name(name))
    if not path.exists():
        raise NotFoundError(f"no network log for {name}",
                            'coi logs connections in allowlist mode by name ([network] allowlist_by = "name")')

    def say(entry: dict[str, Any]) -> None:
        ctx.ui.out(json.dumps(entry) if format == "json" else shown(connlog.text(entry)))

    if not follow:
        for entry in connlog.entries(path):
            say(entry)
        return 0
    import subprocess

    # tail -F waits on the file's changes (inotify) and follows it when it is replaced.
    with subprocess.Popen(["tail", "-n", "+1", "-F", str(path)], stdout=subprocess.PIPE, text=True,
                          stderr=subprocess.DEVNULL) as tail:
        try:
            for line in tail.stdout or ():
                entry = connlog.parse_line(line)
                if entry is not None:
                    say(entry)
        except KeyboardInterrupt:
            tail.terminate()
    return 0


def info(ctx: Context, *, session_id: str | None = None) -> int:
    from coi.sessions import manage, state

    saved, exists = manage.info(ctx.place, session_id=session_id)
    md = saved.metadata
    for label, value in (("Session ID", md.get("session_id")), ("Container", md.get("container_name")),
                         ("Container exists", "yes" if exists else "no"),
                         ("Workspace", md.get("workspace")), ("Tool", md.get("tool")),
                         ("Persistent", "yes" if md.get("persistent") else "no"),
                         ("Saved at", md.get("saved_at")), ("Size", f"{saved.size()} bytes"),
                         ("Path", str(saved.path))):
        ctx.ui.out(f"{label}: {value}")
    from coi.cli.render import limits_line

    limits = md.get("limits") if isinstance(md.get("limits"), dict) else {}
    if limits:
        ctx.ui.out(f"Limits: {limits_line(limits)}")
    if md.get("ended_by") == "max_duration":
        ctx.ui.out(f"Ended: max_duration of {md.get('max_duration')} reached at {md.get('ended_at')}")
    for gen in state.generations(saved):
        ctx.ui.out(f"Generation {gen.generation}: saved at {gen.metadata.get('saved_at')}, "
                   f"{gen.generation_size()} bytes")
    return 0


# ---- shutdown, kill, persist, clean ----------------------------------------------

def _targets(ctx: Context, names: list[str], all: bool, force: bool, verb: str) -> list[dict[str, Any]]:
    """The coi containers named (unknown names warn), or all of them after a yes."""
    from coi.sessions import manage

    if not names and not all:
        hint = "see 'coi list' for the names, or use --all" if verb == "persist" else f"coi {verb} NAME... | --all"
        raise UsageError("no container names provided", hint)
    if all:
        found = manage.all_coi(ctx.place)
        if not found:
            ctx.ui.info(f"No containers to {verb}")
        if found and not force:
            confirm(f"{verb.capitalize()} {len(found)} container(s): {', '.join(i['name'] for i in found)}?")
        return found
    found, problems = manage.named(ctx.place, names)
    for problem in problems:
        ctx.ui.warn(problem)
    return found


def confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise UsageError("refusing to ask without a terminal", "add --force to confirm")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CoiError("cancelled")


def kill(ctx: Context, *, names: list[str], all: bool = False, force: bool = False) -> int:
    from coi.sessions import manage

    return _each(ctx, names, all, force, "kill", lambda inst: manage.kill(ctx.place, inst), "Killed {}")


def shutdown(ctx: Context, *, names: list[str], all: bool = False, timeout: int = 60, force: bool = False) -> int:
    from coi.sessions import manage

    return _each(ctx, names, all, force, "shutdown", lambda inst: manage.shutdown(ctx.place, inst, timeout=timeout),
                 "Shut down {}")


def persist(ctx: Context, *, names: list[str], all: bool = False, force: bool = False) -> int:
    from coi.sessions import manage

    return _each(ctx, names, all, force, "persist", lambda inst: manage.persist(ctx.place, inst),
                 "{} is now persistent")


def _each(ctx: Context, names: list[str], all: bool, force: bool, verb: str, act, said: str) -> int:
    """``act`` on each target and say so; 1 when names were given and none was one of coi's."""
    targets = _targets(ctx, names, all, force, verb)
    for inst in targets:
        act(inst)
        ctx.ui.info(said.format(inst["name"]))
    return 1 if names and not targets else 0


def clean(ctx: Context, *, force: bool = False, sessions: bool = False, all: bool = False) -> int:
    from coi.sessions import lifecycle, manage, state

    plan = manage.plan_clean(ctx.place, saved_sessions=sessions or all)
    for name in plan.rules_removed:
        ctx.ui.info(f"Removed network rules of {name}")
    for name in plan.timers_removed:
        ctx.ui.info(f"Removed the session timer of {name}")
    if plan.spares_removed:
        ctx.ui.info(f"Removed {plan.spares_removed} spare branch copy(ies)")
    if not plan.stopped and not plan.saved:
        ctx.ui.info("Nothing to clean")
        return 0
    if not force:
        confirm(f"Delete {len(plan.stopped)} stopped container(s) and {len(plan.saved)} saved session(s)?")
    for inst in plan.stopped:
        lifecycle.end(ctx.place, inst["name"], inst=inst)
        ctx.ui.info(f"Removed {inst['name']}")
    for s in plan.saved:
        state.delete_saved(s)
        ctx.ui.info(f"Deleted saved session {s.session_id}")
    return 0
