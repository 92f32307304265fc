"""Snapshot commands: create, list, restore, delete (``coi.sessions.snapshots``).

Each finds the session's container (``--container``, or the workspace's only one), calls
the snapshot service and prints its result. What a snapshot holds, and what it does not
(the workspace and every other mount: host directories), is said where it matters."""

from __future__ import annotations

from typing import Any

from coi.cli.context import Context
from coi.cli.render import print_json, shown
from coi.errors import UsageError


def snapshot_help(ctx: Context) -> int:
    raise UsageError("missing snapshot action", "coi snapshot create|list|restore|delete")


def create(ctx: Context, *, snapshot_name: str | None = None, container: str | None = None) -> int:
    from coi.sessions import snapshots

    made = snapshots.create(ctx.place, container=container, name=snapshot_name)
    ctx.ui.out(f"Created snapshot '{made.snapshot}' for container '{made.container}'")
    if made.mounted:
        ctx.ui.info("Not in the snapshot (host directories, mounted into the container): " + _mounts(made.mounted))
    if made.ephemeral:
        ctx.ui.info(f"{made.container} is ephemeral: its snapshots are deleted with it when its session ends "
                    f"(keep it with: coi persist {made.container})")
    return 0


def list_snapshots(ctx: Context, *, container: str | None = None, format: str = "text") -> int:
    from coi.sessions import snapshots

    found = snapshots.listing(ctx.place, container=container)
    if format == "json":
        print_json(ctx.ui, found.to_json())
        return 0
    ctx.ui.out(f"Snapshots for {found.container}:")
    if not found.snapshots:
        ctx.ui.out("  (none)")
    else:
        rows = [("NAME", "CREATED", "STATEFUL")] + [(shown(s.name), _when(s.created_at), "yes" if s.stateful else "no")
                                                    for s in found.snapshots]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        for name, created, stateful in rows:
            ctx.ui.out(f"  {name:<{width[0]}}  {created:<{width[1]}}  {stateful}")
    count = len(found.snapshots)
    ctx.ui.out(f"Total: {count} snapshot{'' if count == 1 else 's'}")
    return 0


def restore(ctx: Context, *, snapshot: str, container: str | None = None, force: bool = False) -> int:
    from coi.cli.commands.sessions import confirm
    from coi.sessions import signals, snapshots

    plan = snapshots.plan_restore(ctx.place, container=container, name=snapshot)
    name = plan.container
    profile = (plan.inst.get("config") or {}).get("user.coi.profile")
    if plan.running and profile and "defaults.profile" not in ctx.flag_values:
        _apply_profile(ctx, profile)  # the restarted agent gets the session's profile environment
    if not force:
        running = (" It is running: coi stops it, restores it and starts it again"
                   + (", with the agent." if plan.agent else ".")) if plan.running else ""
        confirm(f"Restore {name} to snapshot {plan.snapshot.name} ({_when(plan.snapshot.created_at)})? "
                f"What changed in the container since then is lost; /workspace and the other mounts are "
                f"host directories and stay as they are.{running}")
    with signals.interruptible():
        done = snapshots.restore(ctx.place, plan, profile_env=ctx.loaded_config.environment)
    ctx.ui.out(f"Restored container '{name}' from snapshot '{done.snapshot}'")
    if done.mounted:
        ctx.ui.info("Not changed (host directories, not in the snapshot): " + _mounts(done.mounted))
    if not plan.running:
        ctx.ui.info(f"{name} was stopped and stays stopped")
        return 0
    ctx.ui.info(f"{name} was stopped for the restore and started again, with its network rules "
                f"({done.network})")
    if done.agent:
        ctx.ui.info("The agent was started again in tmux (its conversation as it was at the snapshot, "
                    "where the tool keeps one). Attach with: coi attach " + name)
    elif plan.agent:  # it ran, and did not start again (the warning said why)
        ctx.ui.info(f"Open a shell with: coi attach {name} --bash")
    else:
        ctx.ui.info(f"No agent was started (none ran in tmux before). Open a shell with: coi attach {name} --bash")
    return 0


def delete(ctx: Context, *, snapshot: str, container: str | None = None) -> int:
    from coi.sessions import snapshots

    name = snapshots.delete(ctx.place, container=container, name=snapshot)
    ctx.ui.out(f"Deleted snapshot '{snapshot}' of container '{name}'")
    return 0


def _apply_profile(ctx: Context, profile: str) -> None:
    """The session's profile as if given with --profile (as a resume does); one no longer in
    the config only warns."""
    if profile not in ctx.config.profiles:
        ctx.ui.warn(f"the session's profile {profile!r} is no longer in your config: the restarted agent "
                    "gets the environment without it")
        return
    ctx.set_flag("defaults.profile", "the restored session", profile)


def _mounts(mounted: list[Any]) -> str:
    return ", ".join(f"{m.path} ({shown(m.source)}" + (f", {m.branch}'s copy" if m.branch else "") + ")"
                     for m in mounted)


def _when(created_at: str) -> str:
    """Incus's timestamp (RFC 3339, nanoseconds, any offset) as ``YYYY-MM-DD HH:MM:SS UTC``."""
    import datetime
    import re

    text = re.sub(r"(\.\d{6})\d+", r"\1", created_at).replace("Z", "+00:00")
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return shown(created_at)
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")
