"""The per-session connection log of coi's egress proxy: one JSON line per connection
(time, container, name, port, kind, verdict, why, and the bytes sent and received), in
``<state>/network/connections/<container>.jsonl``. Read by ``coi logs --network`` and
counted by ``coi list``; kept small to import (``coi list`` loads it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

LOG_DIR = "connections"  # under <state>/network


def log_path(network_dir: Path, container: str) -> Path:
    return network_dir / LOG_DIR / f"{container}.jsonl"


def begin(network_dir: Path, container: str) -> None:
    """A new session of ``container``: its log starts empty (the last session's goes)."""
    log_path(network_dir, container).unlink(missing_ok=True)


def entries(path: Path) -> Iterator[dict[str, Any]]:
    """The log's entries; lines that are not JSON objects are skipped."""
    try:
        with open(path) as fh:
            for line in fh:
                entry = parse_line(line)
                if entry is not None:
                    yield entry
    except OSError:
        return


def parse_line(line: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def refused_count(network_dir: Path, container: str) -> int:
    """How many of the session's connections the proxy refused (0 without a log)."""
    path = log_path(network_dir, container)
    if not path.exists():
        return 0
    return sum(1 for e in entries(path) if e.get("verdict") == "refused")


def text(entry: dict[str, Any]) -> str:
    """One entry as a line for a person (the caller escapes what came from the container)."""
    if entry.get("verdict") == "full":  # the proxy's last line of a log at its size limit
        return f"{entry.get('time', '?')} {entry.get('why', 'the log is full')}"
    where = f"{entry.get('name') or '(no name)'}:{entry.get('port')}"
    why = f" ({entry['why']})" if entry.get("why") else ""
    carried = ""
    if isinstance(entry.get("bytes_sent"), int) and isinstance(entry.get("bytes_received"), int):
        carried = f" sent {entry['bytes_sent']} B, received {entry['bytes_received']} B"
    return f"{entry.get('time', '?')} {entry.get('verdict', '?'):8} {entry.get('kind', '?'):4} {where}{why}{carried}"
