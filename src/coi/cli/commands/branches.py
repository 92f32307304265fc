"""Branch-session commands: diff, log, merge, discard (``coi.branches``).

Each finds the workspace's branch session, calls the review service and prints its
result; everything the agent wrote is printed through ``render.shown``."""

from __future__ import annotations

import os
import sys

from coi.cli.context import Context
from coi.cli.render import print_json, render_patch, shown


def _branch(ctx: Context, name: str | None):
    from coi.branches import copies

    return copies.find(ctx.sessions_dir, ctx.workspace, name)


def diff(ctx: Context, *, branch_name: str | None = None, committed: bool = False, stat: bool = False,
         format: str = "text") -> int:
    from coi.branches import review

    result = review.diff(_branch(ctx, branch_name), committed_only=committed, stat=stat)
    if format == "json":
        print_json(ctx.ui, result.to_json())
        return 0
    b = result.branch
    ctx.ui.info(f"{b.branch}: {len(result.committed)} file(s) changed in commits, "
                f"{len(result.uncommitted)} uncommitted (base {b.base[:12]}, head {result.head[:12]})")
    render_patch(ctx.ui, result.patch, color=sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    return 0


def log(ctx: Context, *, branch_name: str | None = None, format: str = "text") -> int:
    from coi.branches import review

    branch = _branch(ctx, branch_name)
    head, commits = review.log(branch)
    if format == "json":
        print_json(ctx.ui, {"name": branch.name, "branch": branch.branch, "base": branch.base, "head": head,
                            "commits": [c.to_json() for c in commits]})
        return 0
    if not commits:
        ctx.ui.info(f"{branch.branch} has no commits since its base {branch.base[:12]}")
    for c in commits:
        ctx.ui.out(f"{c.sha[:12]} {shown(c.subject)} ({shown(c.author)}, {c.date})")
    return 0


def merge(ctx: Context, *, branch_name: str, squash: bool = False, rebase: bool = False, format: str = "text") -> int:
    from coi.branches import review
    from coi.errors import UsageError

    if squash and rebase:
        raise UsageError("--squash and --rebase exclude each other", "pick one")
    result = review.merge(_branch(ctx, branch_name), mode="squash" if squash else "rebase" if rebase else "merge")
    if format == "json":
        print_json(ctx.ui, result.to_json())
        return 0
    b = result.branch
    if result.outcome == "up to date":
        ctx.ui.out(f"{b.branch} has nothing that {result.into} does not have")
    else:
        ctx.ui.out(f"Merged {b.branch} into {result.into}: {result.commits} commit(s), {result.outcome} "
                   f"(now {result.head[:12]})")
    if result.left_uncommitted:
        ctx.ui.warn(f"{b.branch} has {result.left_uncommitted} uncommitted file(s) that were not merged; "
                    f"see coi diff {b.name}")
    ctx.ui.info(f"When you are done with it: coi discard {b.name}")
    return 0


def discard(ctx: Context, *, branch_name: str, force: bool = False, format: str = "text") -> int:
    from coi.branches import review
    from coi.cli.commands.sessions import confirm

    branch = _branch(ctx, branch_name)
    _check_unused(ctx, branch)
    if not force:
        lost = review.what_is_lost(branch)
        confirm(f"Delete {branch.branch} and its copy ({lost.unmerged} unmerged commit(s), "
                f"{lost.uncommitted} uncommitted file(s))?")
    result = review.discard(branch)
    for note in result.notes:
        ctx.ui.warn(note)
    if format == "json":
        print_json(ctx.ui, result.to_json())
        return 0
    ctx.ui.out(f"Discarded {branch.branch}")
    return 0


def _check_unused(ctx: Context, branch) -> None:
    """A copy a container still mounts is not deleted under it."""
    from coi.sessions import lifecycle

    lifecycle.check_copy_free(ctx.place, branch.name, persistent=False, workspace=branch.workspace)
