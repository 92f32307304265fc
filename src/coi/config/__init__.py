"""coi's configuration: built-in defaults, TOML files, COI_* variables, flags.

Owns: the one table of keys (``schema.SCHEMA``): parsing, validation, the
environment variables and ``coi config show`` are all driven by it. Each layer holds
only the keys it sets, so an explicit ``false`` or ``0`` in a higher layer wins and a
layer that omits a key leaves the lower value alone. Every value remembers where it
came from (``default``, a file path, ``env COI_X``, ``flag --x``). A workspace's own
``.coi.toml`` is held to an allowlist (``workspace``).

Must not: talk to Incus, write files, or import any other coi module than
``coi.errors`` and ``coi.tools`` (the one list of agent tools).
"""

from typing import Any

from coi.config.load import config_files, default_config, load_config, user_config_file
from coi.config.model import (Build, Config, Credential, Defaults, Incus, Limits, LoadedConfig, Mount, Mounts, Network,
                              NetworkLogging, Paths, Profile, ProfileLimits, PublishedPort, Security, Sessions, Ssh,
                              Tool)
from coi.config.schema import ENV_VARS, NETWORK_MODES, SCHEMA, SYSTEM_FILE, TOOLS, WORKSPACE_FILE, Key
from coi.config.values import expand_path
from coi.config.workspace import WORKSPACE_KEYS, untrusted_layer

__all__ = [
    "ENV_VARS", "NETWORK_MODES", "SCHEMA", "SYSTEM_FILE", "TOOLS", "WORKSPACE_FILE", "WORKSPACE_KEYS", "Build",
    "Config", "Credential", "Defaults", "Incus", "Key", "Limits", "LoadedConfig", "Mount", "Mounts", "Network", "NetworkLogging",
    "Paths", "Profile", "ProfileLimits", "PublishedPort", "Security", "Sessions", "Ssh", "Tool", "config_files",
    "default_config", "expand_path", "load_config", "render_toml", "to_json", "untrusted_layer", "user_config_file",
]


def __getattr__(name: str) -> Any:
    """``config show``'s rendering, loaded only for it."""
    if name in ("render_toml", "to_json"):
        from coi.config import render

        return getattr(render, name)
    raise AttributeError(f"module 'coi.config' has no attribute {name!r}")
