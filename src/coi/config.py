"""coi's configuration: built-in defaults, TOML files, COI_* variables, flags.

Every key is described once, in ``SCHEMA``; parsing, validation, the
environment variables and ``coi config show`` are all driven by that table.
Each layer holds only the keys it sets, so an explicit ``false`` or ``0`` in a
higher layer wins and a layer that omits a key leaves the lower value alone.
Every value remembers where it came from (``default``, a file path,
``env COI_X``, ``flag --x``) so ``coi config show`` can say so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from coi.errors import ConfigError

SYSTEM_FILE = Path("/etc/coi/config.toml")
WORKSPACE_FILE = ".coi.toml"
TOOLS = ("claude", "aider", "codex", "gemini", "opencode")
NETWORK_MODES = ("restricted", "allowlist", "open")


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives in TOML and what it accepts."""

    path: str  # dotted TOML path; ``*`` stands for a profile name
    kind: str  # a name in _KINDS
    default: Any = None  # as it would be written in TOML; None = no default (profiles)
    env: str | None = None  # the COI_* variable that sets it
    choices: tuple[str, ...] = ()  # allowed strings (for lists: allowed items)
    bounds: tuple[int, int | None] = (0, None)  # inclusive range of an int
    attr: str | None = None  # dataclass field when it differs from the TOML path


# The one table of configuration keys. The ``env`` column is the list of
# environment variables coi reads as configuration (lowest to highest:
# defaults, /etc/coi/config.toml, user file, <workspace>/.coi.toml, COI_*, flags).
SCHEMA: tuple[Key, ...] = (
    Key("defaults.image", "str", "coi", env="COI_IMAGE"),
    Key("defaults.persistent", "bool", False, env="COI_PERSISTENT"),
    Key("defaults.max_slots", "int", 10, env="COI_MAX_SLOTS", bounds=(1, 99)),
    Key("defaults.profile", "str", "", env="COI_PROFILE"),  # profile applied without --profile
    # Honoured only from /etc or the user's own file: lets <workspace>/.coi.toml
    # weaken network isolation and mount host paths outside the workspace.
    Key("defaults.trust_workspace_config", "bool", False),
    Key("tool.name", "str", "claude", env="COI_TOOL", choices=TOOLS),
    Key("tool.binary", "str", "", env="COI_TOOL_BINARY"),
    Key("tool.env_passthrough", "strlist", []),
    # Claude Code: copy the host's whole ~/.claude.json (MCP servers, other projects) instead of a minimal one.
    Key("tool.full_host_config", "bool", False),
    Key("paths.sessions_dir", "path", "~/.coi", env="COI_SESSIONS_DIR"),
    Key("paths.storage_dir", "path", "~/.coi/storage", env="COI_STORAGE_DIR"),
    Key("incus.project", "str", "default", env="COI_INCUS_PROJECT"),
    Key("incus.group", "str", "incus-admin"),
    Key("incus.code_uid", "int", 1000, bounds=(1, None)),
    Key("incus.disable_shift", "bool", False),
    Key("network.mode", "str", "restricted", env="COI_NETWORK_MODE", choices=NETWORK_MODES),
    Key("network.allowed_domains", "strlist", []),
    Key("network.refresh_interval_minutes", "int", 30, bounds=(1, None)),
    Key("network.block_private_networks", "bool", True),
    Key("network.block_metadata_endpoint", "bool", True),
    Key("network.allow_local_network_access", "bool", False),
    Key("network.privileged_command", "strlist", []),  # e.g. ["sudo", "-n"]: how coi runs nft when not root
    Key("network.logging.enabled", "bool", False),
    Key("network.logging.path", "path?", ""),  # empty: <sessions_dir>/logs/network.log
    Key("mounts.default", "mounts", []),
    # Saved sessions: how much of the agent's state a save copies out, and how many saves are kept.
    Key("sessions.keep", "int", 3, bounds=(1, 100)),
    Key("sessions.max_size", "str", "512MiB"),
    Key("sessions.max_files", "int", 20000, bounds=(1, None)),
    Key("sessions.max_depth", "int", 32, bounds=(1, None)),
    Key("limits.cpu", "cpu", ""),
    Key("limits.memory", "str", ""),
    Key("limits.processes", "int", 0),  # 0 = unlimited
    Key("build.base", "str", "", env="COI_BUILD_BASE"),  # empty = automatic
    Key("build.tools", "strlist", ["claude"], choices=TOOLS),
    # [profiles.NAME]: every key optional; an unset key keeps the value above.
    Key("profiles.*.image", "str"),
    Key("profiles.*.persistent", "bool"),
    Key("profiles.*.tool", "str", choices=TOOLS),
    Key("profiles.*.environment", "strmap"),
    Key("profiles.*.mounts", "mounts"),
    Key("profiles.*.network.mode", "str", choices=NETWORK_MODES, attr="network_mode"),
    Key("profiles.*.network.allowed_domains", "strlist", attr="allowed_domains"),
    Key("profiles.*.limits.cpu", "cpu"),
    Key("profiles.*.limits.memory", "str"),
    Key("profiles.*.limits.processes", "int"),
)

ENV_VARS: dict[str, str] = {k.env: k.path for k in SCHEMA if k.env}
"""Environment variable -> configuration key it sets."""

_KEYS = {k.path: k for k in SCHEMA}
_SECTIONS = {k.path.rsplit(".", i)[0] for k in SCHEMA for i in range(1, k.path.count(".") + 1)}
_ORDER = {path: i for i, path in enumerate(_KEYS)}
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NO_FLAGS: Mapping[str, tuple[str, Any]] = MappingProxyType({})


# --- the effective configuration ---------------------------------------------


@dataclass(frozen=True)
class Mount:
    """A host directory bind-mounted into the container."""

    host: Path
    container: str


@dataclass(frozen=True)
class Defaults:
    image: str
    persistent: bool
    max_slots: int
    profile: str
    trust_workspace_config: bool


@dataclass(frozen=True)
class Tool:
    name: str
    binary: str
    env_passthrough: tuple[str, ...]
    full_host_config: bool = False


@dataclass(frozen=True)
class Paths:
    sessions_dir: Path
    storage_dir: Path


@dataclass(frozen=True)
class Incus:
    project: str
    group: str
    code_uid: int
    disable_shift: bool


@dataclass(frozen=True)
class NetworkLogging:
    enabled: bool
    path: Path | None  # None: <sessions_dir>/logs/network.log


@dataclass(frozen=True)
class Network:
    mode: str
    allowed_domains: tuple[str, ...]
    refresh_interval_minutes: int
    block_private_networks: bool
    block_metadata_endpoint: bool
    allow_local_network_access: bool
    logging: NetworkLogging
    privileged_command: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mounts:
    default: tuple[Mount, ...]


@dataclass(frozen=True)
class Sessions:
    """``[sessions]``: bounds of one save, and how many saves of a session are kept."""

    keep: int = 3
    max_size: str = "512MiB"
    max_files: int = 20000
    max_depth: int = 32


@dataclass(frozen=True)
class Limits:
    cpu: str
    memory: str
    processes: int  # 0 = unlimited


@dataclass(frozen=True)
class Build:
    base: str  # empty = automatic
    tools: tuple[str, ...]


@dataclass(frozen=True)
class ProfileLimits:
    cpu: str | None = None
    memory: str | None = None
    processes: int | None = None


@dataclass(frozen=True)
class Profile:
    """``[profiles.NAME]``: values that replace the top-level ones; None = not set."""

    image: str | None = None
    persistent: bool | None = None
    tool: str | None = None
    environment: Mapping[str, str] | None = None
    mounts: tuple[Mount, ...] | None = None
    network_mode: str | None = None
    allowed_domains: tuple[str, ...] | None = None
    limits: ProfileLimits = field(default_factory=ProfileLimits)


@dataclass(frozen=True)
class Config:
    defaults: Defaults
    tool: Tool
    paths: Paths
    incus: Incus
    network: Network
    mounts: Mounts
    limits: Limits
    build: Build
    profiles: Mapping[str, Profile]
    sessions: Sessions = field(default_factory=Sessions)


_CLASSES: Mapping[str, type] = {
    "defaults": Defaults, "tool": Tool, "paths": Paths, "incus": Incus, "network": Network,
    "network.logging": NetworkLogging, "mounts": Mounts, "limits": Limits, "build": Build,
    "sessions": Sessions,
}
_PROFILE_CLASSES: Mapping[str, type] = {"limits": ProfileLimits}


@dataclass(frozen=True)
class LoadedConfig:
    """The effective config plus, per dotted key, its value and where it came from."""

    config: Config
    values: dict[str, Any]  # dotted key -> value, in schema order
    origins: dict[str, str]  # dotted key -> "default", a file path, "env COI_X", "flag --x"
    warnings: list[str]
    files: list[tuple[Path, bool]]  # config files consulted, lowest first, and whether they exist
    profile: str | None = None  # the profile applied, if any
    environment: Mapping[str, str] = field(default_factory=dict)  # the profile's environment


# --- kinds of values ---------------------------------------------------------


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
    "mounts": ('a list of tables such as { host = "~/notes", container = "/notes" }', _mounts),
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


# --- layers ------------------------------------------------------------------

Layer = dict[str, tuple[Any, str]]  # dotted key -> (value, origin)


def _generic(path: str) -> str:
    """``profiles.rust.image`` -> ``profiles.*.image``: the schema path of a key."""
    parts = path.split(".")
    if parts[0] == "profiles" and len(parts) > 1:
        parts[1] = "*"
    return ".".join(parts)


def _walk(table: Mapping[str, Any], prefix: str, where: str, warnings: list[str]) -> Iterable[tuple[str, Any]]:
    """Yield (dotted key, raw value) for each known key in ``table``; warn about the others."""
    for name, raw in table.items():
        path = prefix + name
        generic = _generic(path)
        if prefix == "profiles." and not _PROFILE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: profile name {_given(name)} is not allowed; "
                              "use letters, digits, '-' and '_'")
        if generic in _KEYS:
            yield path, raw
        elif generic in _SECTIONS:
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: {path} = {_given(raw)} is not allowed; use a table ([{path}])")
            yield from _walk(raw, path + ".", where, warnings)
        else:
            warnings.append(_unknown(where, path, raw))


def _unknown(where: str, path: str, raw: Any) -> str:
    import difflib  # only when there is something to warn about

    parent, _, name = path.rpartition(".")
    parent = parent + "." if parent else ""
    generic = _generic(parent)
    known = {p[len(generic):].split(".")[0] for p in (*_KEYS, *_SECTIONS) if p.startswith(generic)}
    close = difflib.get_close_matches(name, known, n=1)
    what = "section" if isinstance(raw, dict) else "key"
    return f"{where}: unknown {what} {path} is ignored" + (f"; did you mean {parent}{close[0]}?" if close else "")


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # here: a user without config files does not pay for it

    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "<reason> (at line 3, column 7)"; lead with the place.
        match = re.fullmatch(r"(.*) \((at .*)\)", str(exc), re.DOTALL)
        detail = f" {match[2]}: {match[1]}" if match else f": {exc}"
        raise ConfigError(f"{path}: invalid TOML{detail}") from None


def _file_layer(path: Path, src: _Source, warnings: list[str], dropped: list[str] | None = None) -> Layer:
    """The keys a file sets; with ``dropped``, keys outside ``WORKSPACE_KEYS`` are not even
    read but named there (an untrusted file's value for them is nobody's business)."""
    where = str(path)
    layer = {}
    for key, raw in _walk(_read_toml(path), "", where, warnings):
        if dropped is not None and _generic(key) not in WORKSPACE_KEYS:
            dropped.append(key)
        else:
            layer[key] = (_value(_KEYS[_generic(key)], raw, src, where=where, name=key), where)
    return layer


def _default_layer(env: Mapping[str, str]) -> Layer:
    return {
        k.path: (_value(k, k.default, _Source(env), where="built-in default", name=k.path, hint="is HOME set?"), "default")
        for k in SCHEMA if k.default is not None
    }


def _env_layer(env: Mapping[str, str]) -> Layer:
    """COI_* variables; an empty variable counts as unset (``COI_IMAGE= coi ...``)."""
    return {
        k.path: (_value(k, env[k.env], _Source(env), where="environment", name=k.env, hint=f"{k.env} sets {k.path}",
                        text=True), f"env {k.env}")
        for k in SCHEMA if k.env and env.get(k.env)
    }


def _flag_layer(flags: Mapping[str, tuple[str, Any]], env: Mapping[str, str]) -> Layer:
    return {
        path: (_value(_KEYS[path], raw, _Source(env), where="command line", name=label, text=True), f"flag {label}")
        for path, (label, raw) in flags.items()
    }


def user_config_file(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/coi/config.toml``, by default ``~/.config/coi/config.toml``."""
    base = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore relative values
        base = os.path.join(_home(env), ".config")
    return Path(base, "coi", "config.toml")


def config_files(
    *, workspace: Path | None, env: Mapping[str, str], system_file: Path = SYSTEM_FILE, user_file: Path | None = None
) -> list[tuple[Path, bool]]:
    """The config files coi consults, lowest precedence first, and whether each exists."""
    paths = [system_file, user_file or user_config_file(env)]
    if workspace is not None:
        paths.append(workspace / WORKSPACE_FILE)
    return [(path, path.exists()) for path in paths]


def load_config(
    *,
    workspace: Path | None,
    env: Mapping[str, str],
    flags: Mapping[str, tuple[str, Any]] = _NO_FLAGS,
    system_file: Path = SYSTEM_FILE,
    user_file: Path | None = None,
) -> LoadedConfig:
    """Merge defaults < system file < user file < workspace file < COI_* < flags.

    ``flags`` maps a dotted key to (flag label, value), e.g.
    ``{"defaults.image": ("--image", "coi-rust")}``. Missing files are skipped.
    """
    files = config_files(workspace=workspace, env=env, system_file=system_file, user_file=user_file)
    warnings: list[str] = []
    layers = [_default_layer(env)]
    workspace_file = str(workspace / WORKSPACE_FILE) if workspace is not None else None
    trusted = layers[0]
    for path, exists in files:
        if not exists:
            continue
        if str(path) == workspace_file:
            assert workspace is not None
            trusted = _merge(layers)  # defaults, /etc and the user's own file
            trust = trusted.get("defaults.trust_workspace_config", (False, ""))[0]
            dropped: list[str] = []
            layer = _file_layer(path, _Source(env, literal_base=workspace), warnings, None if trust else dropped)
            layer = untrusted_layer(layer, trusted, workspace=workspace, warnings=warnings, where=str(path),
                                    dropped=dropped)
        else:
            layer = _file_layer(path, _Source(env), warnings)
            trusted = _merge([*layers, layer])
        layers.append(layer)
    env_layer, flag_layer = _env_layer(env), _flag_layer(flags, env)
    below = _merge([*layers, env_layer, flag_layer])
    profile, chosen_by = below.get("defaults.profile", ("", ""))
    environment: dict[str, str] = {}
    if profile:
        profile_layer, environment, from_workspace = _profile_layer(profile, below, workspace_file)
        if workspace is not None and (chosen_by == workspace_file or from_workspace):
            # The project chose the profile, or wrote part of it: the same filter as its own file.
            checked = profile_layer if chosen_by == workspace_file else \
                {k: v for k, v in profile_layer.items() if k in from_workspace}
            kept = untrusted_layer(checked, trusted, workspace=workspace, warnings=warnings,
                                   where=f"profile {profile} (from {workspace_file})")
            profile_layer = {k: v for k, v in profile_layer.items() if k not in checked or k in kept}
        layers.append(profile_layer)
    merged = _merge([*layers, env_layer, flag_layer])
    merged = dict(sorted(merged.items(), key=lambda item: _sort_key(item[0])))
    values = {key: value for key, (value, _) in merged.items()}
    origins = {key: origin for key, (_, origin) in merged.items()}
    return LoadedConfig(config=_build_config(values), values=values, origins=origins, warnings=warnings,
                        files=files, profile=profile or None, environment=environment)


def _merge(layers: Iterable[Layer]) -> Layer:
    return {key: entry for layer in layers for key, entry in layer.items()}


# Where each profile field lands among the top-level keys.
_PROFILE_TARGETS = {
    "image": "defaults.image", "persistent": "defaults.persistent", "tool": "tool.name",
    "mounts": "mounts.default", "network.mode": "network.mode",
    "network.allowed_domains": "network.allowed_domains", "limits.cpu": "limits.cpu",
    "limits.memory": "limits.memory", "limits.processes": "limits.processes",
}


def _profile_layer(name: str, merged: Layer, workspace_file: str | None) -> tuple[Layer, dict[str, str], set[str]]:
    """``[profiles.NAME]`` as a layer over the config files, its environment, and the
    top-level keys whose profile value came from ``workspace_file``."""
    prefix = f"profiles.{name}."
    own = {key[len(prefix):]: entry for key, entry in merged.items() if key.startswith(prefix)}
    if not own:
        defined = sorted({key.split(".")[1] for key in merged if key.startswith("profiles.")})
        raise ConfigError(f"unknown profile {name!r}",
                          "defined profiles: " + ", ".join(defined) if defined else "no profiles are defined")
    label = f"profile {name}"
    layer = {_PROFILE_TARGETS[rest]: (value, label) for rest, (value, _) in own.items() if rest in _PROFILE_TARGETS}
    from_workspace = {_PROFILE_TARGETS[rest] for rest, (_, origin) in own.items()
                      if rest in _PROFILE_TARGETS and origin == workspace_file}
    environment = dict(own.get("environment", ({}, ""))[0])
    return layer, environment, from_workspace


_MODE_STRENGTH = {"open": 0, "restricted": 1, "allowlist": 2}

# What a workspace's own ``.coi.toml`` may set at all (schema paths). Each value is
# still checked against the user's own config (``_untrusted_reason``); every other
# key is ignored with a warning. The user's ``trust_workspace_config`` lifts both.
WORKSPACE_KEYS = frozenset({
    "defaults.image", "defaults.persistent", "defaults.max_slots", "defaults.profile",
    "tool.name", "tool.binary",
    "network.mode", "network.allowed_domains", "network.refresh_interval_minutes",
    "network.block_private_networks", "network.block_metadata_endpoint",
    "network.allow_local_network_access", "network.logging.enabled",
    "mounts.default", "limits.cpu", "limits.memory", "limits.processes",
    *(k.path for k in SCHEMA if k.path.startswith("profiles.*.")),
})


def untrusted_layer(layer: Layer, trusted: Layer, *, workspace: Path, warnings: list[str],
                    where: str, dropped: Iterable[str] = ()) -> Layer:
    """What an untrusted project may set: keys of ``WORKSPACE_KEYS`` only, isolation only
    stricter, limits only lower than the user's own (``trusted``), mounts only inside the
    workspace, unless the user's own config sets ``trust_workspace_config``.
    What is ignored is said in one warning line."""
    if trusted.get("defaults.trust_workspace_config", (False, ""))[0]:
        return layer
    kept: Layer = {}
    ignored = [f"{key} (only your own config can set it)" for key in dropped]
    for key, (value, origin) in layer.items():
        reason = _untrusted_reason(key, value, trusted, workspace)
        if reason is None:
            kept[key] = (value, origin)
        else:
            ignored.append(f"{key} ({reason})")
    if ignored:
        warnings.append(f"{where}: ignored {'; '.join(ignored)} "
                        "(set trust_workspace_config = true in your own config to allow it)")
    return kept


def _untrusted_reason(key: str, value: Any, below: Layer, workspace: Path) -> str | None:
    """Why a workspace may not set ``key`` to ``value`` over the user's ``below``; None when it may."""
    generic = _generic(key)
    if generic not in WORKSPACE_KEYS:
        return "only your own config can set it"
    name = generic.removeprefix("profiles.*.")
    top = _PROFILE_TARGETS.get(name, name)  # the top-level key a profile value lands on
    base = below.get(top, (None, ""))[0]
    if top == "network.mode" and _MODE_STRENGTH[value] < _MODE_STRENGTH[base]:
        return f"a workspace file cannot weaken network isolation ({base} -> {value})"
    if top == "network.allowed_domains" and not set(value) <= set(base):
        return "a workspace file cannot add domains to the network allowlist"
    if top in ("network.block_private_networks", "network.block_metadata_endpoint") and not value:
        return "a workspace file cannot lift a network block"
    if top == "network.allow_local_network_access" and value:
        return "a workspace file cannot open the local network"
    if top == "mounts.default":
        outside = [str(m.host) for m in value if not _inside(m.host, workspace)]
        if outside:
            return f"a workspace file cannot mount host paths outside the workspace ({', '.join(outside)})"
    if top in ("defaults.max_slots", "limits.cpu", "limits.memory", "limits.processes") \
            and not _lower_limit(top, value, base):
        return f"a workspace file may only lower your limit ({_given(base)} -> {_given(value)})"
    return None


def _lower_limit(key: str, value: Any, base: Any) -> bool:
    """Whether ``value`` is no more than the user's ``base`` ("" or 0: unlimited)."""
    if key in ("defaults.max_slots", "limits.processes"):
        return not base or (0 < value <= base)
    if not base:
        return True
    measure = _cpu_count if key == "limits.cpu" else _memory_size
    mine, theirs = measure(value), measure(base)
    return mine is not None and theirs is not None and mine[0] == theirs[0] and mine[1] <= theirs[1]


def _cpu_count(spec: str) -> tuple[str, int] | None:
    """("cpus", how many) of ``limits.cpu``: a count ("2") or CPU numbers ("0-1,4")."""
    if spec.isdigit():
        return "cpus", int(spec)
    try:
        ranges = [part.split("-") for part in spec.split(",")]
        return "cpus", sum(int(r[-1]) - int(r[0]) + 1 for r in ranges if len(r) <= 2)
    except ValueError:
        return None


_UNITS = {"": 1, "B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _memory_size(text: str) -> tuple[str, float] | None:
    """("bytes", n) or ("percent", n) of a ``limits.memory`` value; None when it is neither."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|[kMGT]i?B|B)?", text.strip())
    if not match:
        return None
    if match[2] == "%":
        return "percent", float(match[1])
    unit = _UNITS.get(match[2] or "")
    return None if unit is None else ("bytes", float(match[1]) * unit)


def _inside(path: Path, workspace: Path) -> bool:
    resolved, root = Path(os.path.realpath(path)), Path(os.path.realpath(workspace))
    return resolved == root or root in resolved.parents


def default_config(*, env: Mapping[str, str]) -> Config:
    """The built-in defaults alone (``~`` expanded from ``env``): handy for tests and fakes."""
    return _build_config({key: value for key, (value, _) in _default_layer(env).items()})


def _sort_key(path: str) -> tuple[str, int]:
    """Top-level keys in schema order, then each profile (by name) in schema order."""
    parts = path.split(".")
    return (parts[1] if parts[0] == "profiles" else "", _ORDER[_generic(path)])


def _build(cls: type, values: Mapping[str, Any], classes: Mapping[str, type], prefix: str = "") -> Any:
    """Make dataclass ``cls`` from flat dotted ``values``; a missing value keeps the field default."""
    kwargs = {}
    for f in fields(cls):
        path = prefix + f.name
        if path in classes:
            kwargs[f.name] = _build(classes[path], values, classes, path + ".")
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def _build_config(values: Mapping[str, Any]) -> Config:
    per_profile: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        if path.startswith("profiles."):
            _, name, rest = path.split(".", 2)
            per_profile.setdefault(name, {})[_KEYS[_generic(path)].attr or rest] = value
    profiles = {name: _build(Profile, v, _PROFILE_CLASSES) for name, v in per_profile.items()}
    return _build(Config, {**values, "profiles": profiles}, _CLASSES)


# --- rendering ---------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A config value as JSON/TOML data: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mount):
        return {"host": str(value.host), "container": value.container}
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
    blocks = [f"[{section}]\n" + "\n".join(lines) for section, lines in sections.items()]
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
