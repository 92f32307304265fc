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


def doctor(ctx: Context, *, format: str = "text") -> int:
    from coi.cli.render import render_checks
    from coi.host import run_checks

    checks = run_checks(ctx.incus, ctx.config)
    render_checks(ctx.ui, checks, format=format)
    return 1 if any(c.status == "fail" and c.blocking for c in checks) else 0


def completion(ctx: Context, *, shell: str) -> int:
    from coi.cli.completion import SHELLS
    from coi.cli.parser import build_parser

    ctx.ui.out(SHELLS[shell](build_parser()).rstrip("\n"))
    return 0


def complete(ctx: Context, *, what: str) -> int:
    """Live words for completion: coi container names, saved session ids, branch sessions or prompt names."""
    if what == "containers":
        from coi import naming, sessions

        for c in sessions.list_containers(ctx.incus, naming.container_prefix(), with_state=False):
            ctx.ui.out(c.name)
    elif what == "branches":
        from coi.branches import copies

        for b in copies.all_branches(ctx.sessions_dir, ctx.workspace):
            ctx.ui.out(b.name)
    elif what == "prompts":  # [prompts] of the config (names are checked words: safe for the shell)
        for name in sorted(ctx.config.prompts):
            ctx.ui.out(name)
    else:
        from coi.sessions import state

        for s in state.saved_sessions(ctx.sessions_dir):
            ctx.ui.out(s.session_id)
    return 0
