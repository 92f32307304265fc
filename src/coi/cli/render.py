"""Rendering of results (plain data) as text or JSON: the one place that formats."""

from __future__ import annotations

import json
from typing import Any

from coi.cli.ui import UI, printable

_MARK = {"ok": "[ ok ]", "warning": "[warn]", "error": "[FAIL]", "skip": "[skip]"}
_FIX_MARK = {"fixed": "fixed", "failed": "could not fix", "needs_root": "not fixed"}


def print_json(ui: UI, data: Any) -> None:
    ui.out(json.dumps(data, indent=2, sort_keys=False))


def render_health(ui: UI, health: Any, *, format: str) -> None:
    """``coi doctor``: what ``--fix`` did (when it ran), then every check, then one line."""
    if format == "json":
        print_json(ui, health.to_json())
        return
    for f in health.fixes:
        ui.out(f"{_FIX_MARK.get(f.status, f.status)}: {', '.join(f.checks)} ({f.action}): {f.message}")
    if health.fixes:
        ui.out("")
    for c in health.checks:
        ui.out(f"{_MARK.get(c.status, c.status)} {c.name}: {c.message}")
        if c.fix and c.status in ("error", "warning"):
            ui.out(f"       fix: {c.fix}")
    failed = [c.name for c in health.checks if c.status == "error"]
    warned = [c.name for c in health.checks if c.status == "warning"]
    if failed:
        ui.out(f"{len(failed)} required check(s) failed: {', '.join(failed)}")
    elif warned:
        ui.out(f"All required checks passed; {len(warned)} warning(s): {', '.join(warned)}")
    else:
        ui.out("All checks passed.")


def render_sessions(ui: UI, containers: list[Any], saved: list[Any], *, format: str,
                    include_saved: bool, branches: list[Any] | None = None) -> None:
    """``coi list``: containers (and saved sessions with --all, branch sessions when there
    are any), as text or JSON."""
    if format == "json":
        data: dict[str, Any] = {"active_containers": [c.to_json() for c in containers]}
        if include_saved:
            data["saved_sessions"] = [dict(s.metadata, path=str(s.path)) for s in saved]
        data["branch_sessions"] = [b.to_json() for b in branches or []]
        print_json(ui, data)
        return
    ui.out("Active Containers:")
    if not containers:
        ui.out("  (none)")
    for c in containers:
        ui.out(f"  {c.name} ({'persistent' if c.persistent else 'ephemeral'})")
        ui.out(f"    Status: {c.status}")
        ui.out(f"    Created: {c.created_at}")
        ui.out(f"    Image: {c.image}")
        ui.out(f"    Workspace: {c.workspace}")
        ui.out(f"    IPv4: {', '.join(c.ipv4) if c.ipv4 else '-'}")
        if c.branch:
            ui.out(f"    Branch: coi/{c.branch}")
        if c.refused_connections:
            ui.out(f"    Refused connections: {c.refused_connections} (coi logs {c.name} --network)")
        if c.limits:
            ui.out(f"    Limits: {limits_line(c.limits)}")
        if c.ports:
            ui.out("    Ports: " + ", ".join(f"{p.host_endpoint} -> {p.container}" for p in c.ports))
        if c.ssh_agent:
            ui.out("    SSH agent: forwarded")
        if getattr(c, "ends_at", None):
            ui.out(f"    Ends: {c.ends_at} ([limits] max_duration)")
    if include_saved:
        _heading(ui, "Saved Sessions:", empty=not saved)
        for s in saved:
            md = s.metadata
            ui.out(f"  {md.get('session_id')} ({md.get('tool')})")
            ui.out(f"    Saved: {md.get('saved_at')}")
            ui.out(f"    Workspace: {md.get('workspace')}")
            if md.get("branch"):
                ui.out(f"    Branch: coi/{md['branch']}")
    if branches is not None:
        render_branches(ui, branches)


def limits_line(limits: dict[str, Any]) -> str:
    """``cpu=2, disk=20GiB, max_duration=2h``: a container's or a saved session's limits."""
    return ", ".join(f"{k}={shown(str(v))}" for k, v in sorted(limits.items()))


def shown(text: str) -> str:
    """``text`` safe for a terminal on one line: control characters (escape sequences,
    carriage returns, newlines, C1 codes) written as ``\\xNN``. Whatever an agent wrote
    passes through here."""
    return printable(text).replace("\n", "\\x0a")


def _heading(ui: UI, title: str, *, empty: bool) -> None:
    """A further section of ``coi list``: a blank line, its title, "(none)" when empty."""
    ui.out("")
    ui.out(title)
    if empty:
        ui.out("  (none)")


def render_branches(ui: UI, statuses: list[Any]) -> None:
    """``coi list``'s branch sessions: branch, workspace, work and state, one block each."""
    _heading(ui, "Branch Sessions:", empty=not statuses)
    for s in statuses:
        b = s.branch
        work = shown(s.problem) if s.problem else \
            f"{s.ahead} commit(s) ahead, {s.uncommitted} uncommitted file(s)"
        ui.out(f"  {b.branch}")
        ui.out(f"    Workspace: {b.workspace}")
        ui.out(f"    Work: {work}")
        ui.out(f"    State: {s.state}" + (f" ({s.container})" if s.container else ""))
        ui.out(f"    Copy: {b.copy}")


_PATCH_COLORS = (("+++", "1"), ("---", "1"), ("diff --git", "1"), ("@@", "36"), ("+", "32"), ("-", "31"))


def render_patch(ui: UI, patch: bytes, *, color: bool) -> None:
    """A patch from an agent's copy: every line through ``shown``, coloured on a terminal.
    Lines end at newlines only: a carriage return (or another line break) inside a line is
    shown, not obeyed, so no line of the agent's looks like two (one a forged ``+`` line)."""
    lines = patch.decode("utf-8", "replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    for raw in lines:
        line = shown(raw.removesuffix("\r"))  # a CRLF file's lines end as everyone's
        code = next((c for p, c in _PATCH_COLORS if line.startswith(p)), None) if color else None
        ui.out(f"\033[{code}m{line}\033[0m" if code else line)
