"""Kinds of values: each TOML or text value checked and converted by its key's kind,
with where it came from in every error."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coi.config.model import Mount
from coi.config.schema import Key
from coi.errors import ConfigError

def _expect(ok: bool, value: Any) -> Any:
    if not ok:
        raise ValueError(value)
    return value


def _is_int(raw: Any) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


@dataclass(frozen=True)
class _Source:
    """What a layer's values may draw on: ``env`` expands ``~`` and ``$VAR`` in paths. A
    workspace's own file is the project's text: no expansion, relative paths from ``literal_base``."""

    env: Mapping[str, str]
    literal_base: Path | None = None


def _str(raw: Any, src: _Source) -> str:
    return _expect(isinstance(raw, str), raw)


def _bool(raw: Any, src: _Source) -> bool:
    return _expect(isinstance(raw, bool), raw)


def _int(raw: Any, src: _Source) -> int:
    return _expect(_is_int(raw), raw)


def _cpu(raw: Any, src: _Source) -> str:
    """Incus takes ``limits.cpu`` as text ("2", "0-3"); a plain TOML number is accepted too."""
    return str(raw) if _is_int(raw) and raw >= 1 else _str(raw, src)


def _path(raw: Any, src: _Source) -> Path:
    text = _str(raw, src)
    if src.literal_base is not None:  # a workspace's own file: no ~ or $VAR from the host
        path = Path(text) if Path(text).is_absolute() else src.literal_base / text
        return Path(os.path.normpath(path))
    path = expand_path(text, src.env)
    return _expect(path.is_absolute(), path)


def _optional_path(raw: Any, src: _Source) -> Path | None:
    return _path(raw, src) if _str(raw, src) else None


def _strlist(raw: Any, src: _Source) -> tuple[str, ...]:
    return tuple(_str(item, src) for item in _expect(isinstance(raw, (list, tuple)), raw))


def _strmap(raw: Any, src: _Source) -> dict[str, str]:
    return {name: _str(value, src) for name, value in _expect(isinstance(raw, dict), raw).items()}


def _mounts(raw: Any, src: _Source) -> tuple[Mount, ...]:
    return tuple(_mount(item, src) for item in _expect(isinstance(raw, (list, tuple)), raw))


def _mount(raw: Any, src: _Source) -> Mount:
    _expect(isinstance(raw, dict) and raw.keys() == {"host", "container"}, raw)
    container = _str(raw["container"], src)
    return Mount(host=_path(raw["host"], src), container=_expect(container.startswith("/"), container))


_PORT_KEYS = {"container", "host", "address"}


def _ports(raw: Any, src: _Source) -> tuple[Any, ...]:
    return tuple(_port(item, src) for item in _expect(isinstance(raw, (list, tuple)), raw))


def _port(raw: Any, src: _Source) -> Any:
    """One ``[[ports]]`` table: ``container``, and ``host`` (default: the same) and ``address``
    (default 127.0.0.1: an IP address, written the one way Incus and coi list show it)."""
    import ipaddress

    from coi.config.model import PublishedPort

    _expect(isinstance(raw, dict) and "container" in raw and raw.keys() <= _PORT_KEYS, raw)
    container = _int(raw["container"], src)
    host = _int(raw.get("host", container), src)
    _expect(all(1 <= port <= 65535 for port in (container, host)), raw)
    try:
        address = str(ipaddress.ip_address(_str(raw.get("address", "127.0.0.1"), src)))
    except ValueError:
        raise ValueError(raw) from None
    return PublishedPort(container=container, host=host, address=address)


def _patterns(raw: Any, src: _Source) -> tuple[str, ...]:
    """``[security] masked_paths``: path patterns relative to the workspace (coi.sessions.masks
    matches them). Refused: empty ones, control characters, ``.`` and ``..`` components."""
    return tuple(_expect(_pattern_ok(item), item) for item in _strlist(raw, src))


def _pattern_ok(text: str) -> bool:
    body = text.removeprefix("!").removeprefix("/").removesuffix("/")
    parts = body.split("/")
    return bool(body) and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) and \
        not any(part in ("", ".", "..") for part in parts)


_CREDENTIAL_KEYS = {"name", "hosts", "header", "env", "file", "command", "container_env", "value"}


def _credentials(raw: Any, src: _Source) -> tuple[Any, ...]:
    return tuple(_credential(item, src) for item in _expect(isinstance(raw, (list, tuple)), raw))


def _credential(raw: Any, src: _Source) -> Any:
    from coi.config.model import Credential

    _expect(isinstance(raw, dict) and {"name", "hosts", "header"} <= raw.keys() <= _CREDENTIAL_KEYS, raw)
    sources = [k for k in ("env", "file", "command") if k in raw]
    _expect(len(sources) == 1, raw)  # exactly one source
    name, header = _str(raw["name"], src), _str(raw["header"], src)
    _expect(re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name) is not None, raw)
    _expect(re.fullmatch(r"[A-Za-z0-9-]{1,64}", header) is not None, raw)
    env_names = [raw.get("env", ""), raw.get("container_env", "")]
    _expect(all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) for v in env_names if v), raw)
    value = _str(raw.get("value", "{secret}"), src)
    _expect(value.count("{secret}") == 1 and "\n" not in value, raw)
    return Credential(name=name, hosts=_strlist(raw["hosts"], src), header=header, env=raw.get("env", ""),
                      file=_path(raw["file"], src) if "file" in raw else None,
                      command=_strlist(raw["command"], src) if "command" in raw else (),
                      container_env=raw.get("container_env", ""), value=value)


# kind -> (what is allowed, converter raising ValueError)
_KINDS: dict[str, tuple[str, Callable[[Any, _Source], Any]]] = {
    "str": ("a string", _str),
    "bool": ("true or false", _bool),
    "int": ("a whole number", _int),
    "cpu": ('a string such as "2" or a whole number >= 1', _cpu),
    "path": ("an absolute path (~ and $VAR are expanded)", _path),
    "path?": ('an absolute path (~ and $VAR are expanded), or "" for the default', _optional_path),
    "strlist": ("a list of strings", _strlist),
    "strmap": ('a table of strings such as { NAME = "value" }', _strmap),
    "patterns": ('a list of path patterns such as ".env", "*.pem", "config/*.key" or "secrets/**" '
                 '(no "." or ".." parts)', _patterns),
    "mounts": ('a list of tables such as { host = "~/notes", container = "/notes" }', _mounts),
    "ports": ('a list of tables such as { container = 3000, host = 8080, address = "127.0.0.1" } (ports 1 to '
              '65535; host defaults to container, address to 127.0.0.1)', _ports),
    "credentials": ('a list of tables such as { name = "anthropic", hosts = ["api.anthropic.com"], '
                    'header = "x-api-key", env = "ANTHROPIC_API_KEY" } (one of env, file, command)', _credentials),
}


_TEXT_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _allowed(key: Key) -> str:
    if key.kind == "int":
        low, high = key.bounds
        return f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high}"
    if key.choices:
        listed = ", ".join(key.choices)
        return f"a list drawn from {listed}" if key.kind == "strlist" else f"one of {listed}"
    return _KINDS[key.kind][0]


def _convert(key: Key, raw: Any, src: _Source) -> Any:
    """``raw`` (a TOML value) as ``key`` stores it; ValueError when not allowed."""
    value = _KINDS[key.kind][1](raw, src)
    items = value if key.kind == "strlist" else (value,)
    _expect(not key.choices or all(item in key.choices for item in items), raw)
    low, high = key.bounds
    _expect(key.kind != "int" or (value >= low and (high is None or value <= high)), raw)
    return value


def _from_text(key: Key, text: str) -> Any:
    """A value written as text (environment, flags) as TOML would give it."""
    if key.kind == "bool":
        return _TEXT_BOOLS.get(text.strip().lower(), text)
    if key.kind == "int" and re.fullmatch(r"\s*[+-]?\d+\s*", text):
        return int(text)
    return text


def _given(raw: Any) -> str:
    text = json.dumps(raw, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _value(
    key: Key, raw: Any, src: _Source, *, where: str, name: str, hint: str | None = None, text: bool = False
) -> Any:
    """``raw`` converted for ``key``, or a ConfigError naming where, what was given and what is allowed.

    ``text``: a string in ``raw`` was typed as text (environment, flags), so
    ``"0"`` may mean a number and ``"yes"`` a boolean.
    """
    try:
        return _convert(key, _from_text(key, raw) if text and isinstance(raw, str) else raw, src)
    except ValueError:
        raise ConfigError(f"{where}: {name} = {_given(raw)} is not allowed; use {_allowed(key)}", hint) from None


def expand_path(text: str, env: Mapping[str, str]) -> Path:
    """Expand ``~`` (HOME from ``env``) and ``$VAR``/``${VAR}`` (unknown ones stay as written)."""
    if text == "~" or text.startswith("~/"):
        text = _home(env) + text[1:]
    elif text.startswith("~"):
        text = os.path.expanduser(text)  # ~user
    return Path(re.sub(r"\$(\w+|\{[^}]*\})", lambda m: env.get(m[1].strip("{}"), m[0]), text))


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")
