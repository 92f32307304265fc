"""coi's network state under ``<sessions_dir>/network``: one record per filtered
container (its backend, attachment, policy and watcher), the watcher's log, the
DNS cache of allowlist names and what coi learnt about the backends here."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from coi.network.attach import NAME, check_name
from coi.network.policy import NetworkPolicy


class Store:
    """Per-container records, the DNS cache and the backend capability cache."""

    def __init__(self, sessions_dir: Path) -> None:
        self.root = Path(sessions_dir) / "network"

    def _write(self, path: Path, data: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def record_path(self, container: str) -> Path:
        return self.root / f"{check_name(container)}.json"

    def log_path(self, container: str) -> Path:
        return self.root / f"{check_name(container)}.log"

    def record(self, container: str) -> dict[str, Any] | None:
        return self._read(self.record_path(container))

    def save_record(self, container: str, data: Mapping[str, Any]) -> None:
        self._write(self.record_path(container), dict(data))

    def drop_record(self, container: str) -> None:
        for path in (self.record_path(container), self.log_path(container)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def records(self) -> dict[str, dict[str, Any]]:
        out = {}
        if self.root.is_dir():
            for path in self.root.glob("*.json"):
                if path.stem in ("dns-cache", "backends") or not NAME.fullmatch(path.stem):
                    continue
                data = self._read(path)
                if isinstance(data, dict):
                    out[path.stem] = data
        return out

    def dns_cache(self) -> dict[str, Any]:
        data = self._read(self.root / "dns-cache.json")
        return data if isinstance(data, dict) else {}

    def save_dns_cache(self, cache: Mapping[str, Any]) -> None:
        merged = {**self.dns_cache(), **cache}
        self._write(self.root / "dns-cache.json", merged)

    def capability(self, backend: str) -> dict[str, Any] | None:
        data = self._read(self.root / "backends.json") or {}
        entry = data.get(backend)
        if isinstance(entry, dict) and entry.get("kernel") == os.uname().release:
            return entry
        return None  # unknown, or learnt on another kernel: probe again

    def save_capability(self, backend: str, usable: bool, reason: str = "") -> None:
        data = self._read(self.root / "backends.json") or {}
        data[backend] = {"usable": usable, "reason": reason, "kernel": os.uname().release,
                         "at": int(time.time())}
        self._write(self.root / "backends.json", data)


def log_file(policy: NetworkPolicy, sessions_dir: Path) -> Path:
    """Where blocked attempts are logged: ``[network.logging] path``, else ``<sessions_dir>/logs/network.log``."""
    return Path(policy.log_path) if policy.log_path else Path(sessions_dir) / "logs" / "network.log"
