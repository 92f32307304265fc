"""The one table of configuration keys (``SCHEMA``) and the names around it: where the
files are, the tools and network modes, how a key path is written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from coi.tools import TOOLS as AGENT_TOOLS

SYSTEM_FILE = Path("/etc/coi/config.toml")


WORKSPACE_FILE = ".coi.toml"


TOOLS = tuple(AGENT_TOOLS)  # the agent tools, in the contract's order (coi.tools is the one list)


NETWORK_MODES = ("restricted", "allowlist", "open")


GIT_ISOLATION = ("shared", "branch")  # the workspace itself, or a copy of the repository on a branch of its own


# Files that usually hold secrets: the agent sees them empty and read-only ([security] masked_paths).
DEFAULT_MASKED_PATHS = (".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "secrets/**")


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
    # How allowlist mode lets traffic out: by name through coi's proxy (TCP 80/443; names and
    # *.wildcards), or by the addresses the names resolve to (every port; no wildcards).
    Key("network.allowlist_by", "str", "name", env="COI_NETWORK_ALLOWLIST_BY", choices=("name", "address")),
    Key("network.refresh_interval_minutes", "int", 30, bounds=(1, None)),
    Key("network.block_private_networks", "bool", True),
    Key("network.block_metadata_endpoint", "bool", True),
    Key("network.allow_local_network_access", "bool", False),
    Key("network.privileged_command", "strlist", []),  # e.g. ["sudo", "-n"]: how coi runs nft when not root
    Key("network.logging.enabled", "bool", False),
    Key("network.logging.path", "path?", ""),  # empty: <sessions_dir>/logs/network.log
    Key("mounts.default", "mounts", []),
    # Secrets the egress proxy injects (allowlist by name); only your own config can set them.
    Key("credentials", "credentials", []),
    # [[ports]]: container ports published on the host (TCP; { container = 3000, host = 8080, address = "127.0.0.1" }).
    Key("ports", "ports", []),
    # The user's SSH agent ($SSH_AUTH_SOCK) forwarded into the container as a socket; no key goes in.
    Key("ssh.forward_agent", "bool", False),
    Key("git.isolation", "str", "shared", env="COI_GIT_ISOLATION", choices=GIT_ISOLATION),
    # A checked-out spare copy per workspace, so that a branch session does not wait for a checkout.
    Key("git.keep_spare", "bool", True, env="COI_GIT_KEEP_SPARE"),
    # Saved sessions: how much of the agent's state a save copies out, and how many saves are kept.
    Key("sessions.keep", "int", 3, bounds=(1, 100)),
    Key("sessions.max_size", "str", "512MiB"),
    Key("sessions.max_files", "int", 20000, bounds=(1, None)),
    Key("sessions.max_depth", "int", 32, bounds=(1, None)),
    Key("limits.cpu", "cpu", ""),
    Key("limits.memory", "str", ""),
    Key("limits.processes", "int", 0),  # 0 = unlimited
    # How long a session may run ("2h", "90m"; "" = no limit) and its root disk's size ("20GiB").
    Key("limits.max_duration", "str", ""),
    Key("limits.disk", "str", ""),
    # Workspace paths the agent sees empty and read-only (coi.sessions.masks); a project's
    # .coi.toml can only add to the list.
    Key("security.masked_paths", "patterns", list(DEFAULT_MASKED_PATHS)),
    Key("build.base", "str", "", env="COI_BUILD_BASE"),  # empty = automatic
    Key("build.tools", "strlist", ["claude"], choices=TOOLS),
    # [prompts] NAME = "text": named prompts for ``coi run --prompt-name NAME`` (text for the agent only).
    Key("prompts.*", "str"),
    # [profiles.NAME]: every key optional; an unset key keeps the value above.
    Key("profiles.*.image", "str"),
    Key("profiles.*.persistent", "bool"),
    Key("profiles.*.tool", "str", choices=TOOLS),
    Key("profiles.*.environment", "strmap"),
    Key("profiles.*.mounts", "mounts"),
    Key("profiles.*.network.mode", "str", choices=NETWORK_MODES, attr="network_mode"),
    Key("profiles.*.network.allowed_domains", "strlist", attr="allowed_domains"),
    Key("profiles.*.git.isolation", "str", choices=GIT_ISOLATION, attr="git_isolation"),
    Key("profiles.*.limits.cpu", "cpu"),
    Key("profiles.*.limits.memory", "str"),
    Key("profiles.*.limits.processes", "int"),
    Key("profiles.*.limits.max_duration", "str"),
    Key("profiles.*.limits.disk", "str"),
)


ENV_VARS: dict[str, str] = {k.env: k.path for k in SCHEMA if k.env}


_KEYS = {k.path: k for k in SCHEMA}


_SECTIONS = {k.path.rsplit(".", i)[0] for k in SCHEMA for i in range(1, k.path.count(".") + 1)}


_ORDER = {path: i for i, path in enumerate(_KEYS)}


_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


_NO_FLAGS: Mapping[str, tuple[str, Any]] = MappingProxyType({})


Layer = dict[str, tuple[Any, str]]  # dotted key -> (value, origin)


# Tables whose keys are names the user chooses ([profiles.NAME], [prompts] NAME = ...).
NAMED_TABLES = ("profiles", "prompts")


def _generic(path: str) -> str:
    """``profiles.rust.image`` -> ``profiles.*.image``: the schema path of a key."""
    parts = path.split(".")
    if parts[0] in NAMED_TABLES and len(parts) > 1:
        parts[1] = "*"
    return ".".join(parts)


# Where each profile field lands among the top-level keys.
_PROFILE_TARGETS = {
    "image": "defaults.image", "persistent": "defaults.persistent", "tool": "tool.name",
    "mounts": "mounts.default", "network.mode": "network.mode",
    "network.allowed_domains": "network.allowed_domains", "git.isolation": "git.isolation",
    "limits.cpu": "limits.cpu",
    "limits.memory": "limits.memory", "limits.processes": "limits.processes",
    "limits.max_duration": "limits.max_duration", "limits.disk": "limits.disk",
}


def _sort_key(path: str) -> tuple[str, int]:
    """Top-level keys in schema order, then each profile (by name) in schema order."""
    parts = path.split(".")
    return (parts[1] if parts[0] == "profiles" else "", _ORDER[_generic(path)])
