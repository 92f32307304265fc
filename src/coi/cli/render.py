"""Rendering of results (plain data) as text or JSON: the one place that formats."""

from __future__ import annotations

import json
from typing import Any, Iterable

from coi.cli.ui import UI

_MARK = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}


def print_json(ui: UI, data: Any) -> None:
    ui.out(json.dumps(data, indent=2, sort_keys=False))


def render_checks(ui: UI, checks: Iterable[Any], *, format: str) -> None:
    checks = list(checks)
    if format == "json":
        blocking = [c.name for c in checks if c.status == "fail" and c.blocking]
        print_json(ui, {"ok": not blocking, "checks": [c.to_json() for c in checks]})
        return
    for c in checks:
        ui.out(f"{_MARK.get(c.status, c.status)} {c.name}: {c.detail}")
        if c.hint and c.status in ("fail", "warn"):
            ui.out(f"       fix: {c.hint}")
    failed = [c for c in checks if c.status == "fail" and c.blocking]
    ui.out("All required checks passed." if not failed else
           f"{len(failed)} required check(s) failed: {', '.join(c.name for c in failed)}")
