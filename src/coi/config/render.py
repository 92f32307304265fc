"""``coi config show``: the effective configuration as TOML or JSON, with origins."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from coi.config.model import Credential, LoadedConfig, Mount, PublishedPort

def _plain(value: Any) -> Any:
    """A config value as JSON/TOML data: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mount):
        return {"host": str(value.host), "container": value.container}
    if isinstance(value, PublishedPort):
        return {"container": value.container, "host": value.host, "address": value.address}
    if isinstance(value, Credential):  # where the secret comes from; never the secret
        return {k: _plain(v) for k, v in vars(value).items() if v not in ("", None, ())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return "" if value is None else value


def _toml(value: Any) -> str:
    """Plain data (see _plain) as a one-line TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    pairs = (f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else _toml(k)} = {_toml(v)}" for k, v in value.items())
    return "{ " + ", ".join(pairs) + " }" if value else "{}"


def render_toml(loaded: LoadedConfig) -> str:
    """The effective config as TOML, each line commented with where its value came from."""
    sections: dict[str, list[str]] = {}
    for path, value in loaded.values.items():
        section, _, name = path.rpartition(".")
        sections.setdefault(section, []).append(f"{name} = {_toml(_plain(value))}  # from {loaded.origins[path]}")
    top = sections.pop("", [])  # keys outside any table ([[credentials]])
    blocks = ["\n".join(top)] if top else []
    blocks += [f"[{section}]\n" + "\n".join(lines) for section, lines in sections.items()]
    return "# effective coi configuration\n\n" + "\n\n".join(blocks) + "\n"


def to_json(loaded: LoadedConfig) -> dict[str, Any]:
    """``{"config": {section: {key: value}}, "origins": {"section.key": origin}}``."""
    config: dict[str, Any] = {}
    for path, value in loaded.values.items():
        *parents, name = path.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = _plain(value)
    config.setdefault("profiles", {})
    return {"config": config, "origins": dict(loaded.origins)}
