"""Loading: the layers (defaults, /etc/coi/config.toml, the user's file, the
workspace's .coi.toml, COI_* variables, flags), merged key by key, and profiles."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from coi.config.model import Config, LoadedConfig, _build_config
from coi.config.schema import (_KEYS, _NO_FLAGS, _PROFILE_NAME, _PROFILE_TARGETS, _SECTIONS, SCHEMA,
                               SYSTEM_FILE, WORKSPACE_FILE, Layer, _generic, _sort_key)
from coi.config.values import _given, _home, _Source, _value
from coi.config.workspace import WORKSPACE_KEYS, untrusted_layer
from coi.errors import ConfigError

def _walk(table: Mapping[str, Any], prefix: str, where: str, warnings: list[str]) -> Iterable[tuple[str, Any]]:
    """Yield (dotted key, raw value) for each known key in ``table``; warn about the others."""
    for name, raw in table.items():
        path = prefix + name
        generic = _generic(path)
        if prefix in ("profiles.", "prompts.") and not _PROFILE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: {prefix[:-2]} name {_given(name)} is not allowed; "
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


def default_config(*, env: Mapping[str, str]) -> Config:
    """The built-in defaults alone (``~`` expanded from ``env``): handy for tests and fakes."""
    return _build_config({key: value for key, (value, _) in _default_layer(env).items()})

