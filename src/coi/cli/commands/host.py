"""Host commands: version, setup, doctor."""

from __future__ import annotations

import os

from coi import version_text
from coi.cli.context import Context


def version(ctx: Context) -> int:
    ctx.ui.out(version_text())
    return 0


def setup(ctx: Context, *, ipv6: bool = False, user: str | None = None) -> int:
    from coi import host
    from coi.incus import Incus

    # Refused before the config is read or anything printed, as the service would.
    host.require_root()
    ctx.ui.info("Setting up this host for coi...")
    who = user or os.environ.get("SUDO_USER")
    changed = host.setup(
        # Set-up configures the default project, whatever [incus] project says (ctx.incus).
        client=Incus.from_environment(project="default"),
        report=lambda step: ctx.ui.info(f"  {'+' if step.changed else '='} {step.name}: {step.detail}"),
        group=ctx.config.incus.group,
        user=who,
        ipv6=ipv6,
    )
    if changed:
        ctx.ui.info("Done. Next: 'coi doctor' to check, then 'coi shell' in a project directory.")
        if who and who != "root":
            ctx.ui.info(f"If {who} was just added to {ctx.config.incus.group}, log out and in again first.")
    else:
        ctx.ui.info("Nothing to change: this host is already set up for coi.")
    return 0


# coi doctor's exit code: its report's status.
DOCTOR_EXIT = {"ok": 0, "warning": 1, "error": 2}


def doctor(ctx: Context, *, format: str = "text", fix: bool = False) -> int:
    """The host's health: 0 all good, 1 warnings, 2 errors (after ``--fix``'s repairs)."""
    from coi.cli.render import render_health
    from coi.config import default_config, load_config
    from coi.errors import CoiError
    from coi.host import Check, Health, diagnose
    from coi.incus import Incus

    _absolute_path_only()
    # The host's and the user's own config only: a project's .coi.toml (the current
    # directory's) has no say in what doctor checks, nor in what --fix repairs.
    try:
        loaded = load_config(workspace=None, env=os.environ)
    except CoiError as exc:
        # A broken config is one failed check; the others run on the built-in defaults,
        # and nothing is repaired with values the user did not write.
        broken = Check("config", "error", exc.message, exc.hint or "correct the file, then run coi doctor again")
        config, fix = default_config(env=os.environ), False
    else:
        broken = None
        for warning in loaded.warnings:
            ctx.ui.warn(warning)
        config = loaded.config
    health = diagnose(Incus.from_environment(project=config.incus.project), config, fix=fix)
    if broken is not None:
        health = Health([broken, *health.checks], health.fixes)
    render_health(ctx.ui, health, format=format)
    return DOCTOR_EXIT[health.status]


def _absolute_path_only() -> None:
    """Doctor runs host commands by name (nft, ip, sudo, systemctl): never one found
    through a relative PATH entry, which would be the current directory's (a project's)."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(p for p in entries if os.path.isabs(p))


def completion(ctx: Context, *, shell: str) -> int:
    from coi.cli.completion import SHELLS
    from coi.cli.parser import build_parser

    ctx.ui.out(SHELLS[shell](build_parser()).rstrip("\n"))
    return 0


def complete(ctx: Context, *, what: str) -> int:
    """Live words for completion: coi container names, saved session ids, branch sessions, the
    snapshots of the workspace's only session container, or prompt names."""
    if what == "containers":
        from coi import naming, sessions

        for c in sessions.list_containers(ctx.incus, naming.container_prefix(), with_state=False):
            ctx.ui.out(c.name)
    elif what == "branches":
        from coi.branches import copies

        for b in copies.all_branches(ctx.sessions_dir, ctx.workspace):
            ctx.ui.out(b.name)
    elif what == "snapshots":
        _complete_snapshots(ctx)
    elif what == "prompts":  # [prompts] of the config (names are checked words: safe for the shell)
        for name in sorted(ctx.config.prompts):
            ctx.ui.out(name)
    else:
        from coi.sessions import state

        for s in state.saved_sessions(ctx.sessions_dir):
            ctx.ui.out(s.session_id)
    return 0


def _complete_snapshots(ctx: Context) -> None:
    """Snapshot names of the workspace's only session container; none when it has none or several."""
    from coi.errors import CoiError
    from coi.sessions import snapshots

    try:
        found = snapshots.listing(ctx.place, container=None)
    except CoiError:
        return
    for s in found.snapshots:
        ctx.ui.out(s.name)
