"""The effective configuration as frozen dataclasses, built from flat dotted values."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from coi.config.schema import _KEYS, DEFAULT_MASKED_PATHS, _generic

@dataclass(frozen=True)
class Mount:
    """A host directory bind-mounted into the container."""

    host: Path
    container: str


@dataclass(frozen=True)
class Credential:
    """``[[credentials]]``: a secret the egress proxy puts into requests to ``hosts`` (the
    container holds a placeholder). One source: ``env`` (a host variable), ``file`` or
    ``command`` (its standard output)."""

    name: str
    hosts: tuple[str, ...]  # names and *. wildcards
    header: str  # e.g. "x-api-key", "Authorization"
    env: str = ""
    file: Path | None = None
    command: tuple[str, ...] = ()
    container_env: str = ""  # the variable that holds the placeholder in the container
    value: str = "{secret}"  # the header's value around the secret, e.g. "Bearer {secret}"


@dataclass(frozen=True)
class PublishedPort:
    """``[[ports]]`` or ``--port``: a TCP port of the container, published on the host's
    ``address`` (127.0.0.1 unless the user's own config says otherwise) at port ``host``."""

    container: int
    host: int
    address: str = "127.0.0.1"

    @property
    def host_endpoint(self) -> str:
        """``127.0.0.1:8080``, ``[::1]:8080``: where the port is on the host."""
        return f"[{self.address}]:{self.host}" if ":" in self.address else f"{self.address}:{self.host}"

    def to_json(self) -> dict[str, Any]:
        return {"host_address": self.address, "host_port": self.host, "container_port": self.container}


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
    allowlist_by: str = "name"  # "name": through coi's proxy (coi.network.egress); "address": nft sets


@dataclass(frozen=True)
class Mounts:
    default: tuple[Mount, ...]


@dataclass(frozen=True)
class Git:
    """``[git]``: what the agent's /workspace is: the workspace itself ("shared") or a copy of
    the repository on a branch of its own ("branch", ``coi.branches``)."""

    isolation: str = "shared"
    keep_spare: bool = True  # one checked-out spare copy per workspace, made in the background


@dataclass(frozen=True)
class Ssh:
    """``[ssh]``: the user's SSH agent forwarded into the container (a socket; no key goes in)."""

    forward_agent: bool = False


@dataclass(frozen=True)
class Sessions:
    """``[sessions]``: bounds of one save, and how many saves of a session are kept."""

    keep: int = 3
    max_size: str = "512MiB"
    max_files: int = 20000
    max_depth: int = 32


@dataclass(frozen=True)
class Security:
    """``[security]``: workspace paths the agent sees empty and read-only (``coi.sessions.masks``)."""

    masked_paths: tuple[str, ...] = DEFAULT_MASKED_PATHS


@dataclass(frozen=True)
class Limits:
    cpu: str
    memory: str
    processes: int  # 0 = unlimited
    max_duration: str = ""  # how long a session may run (coi.config.limits); "" = no limit
    disk: str = ""  # the root disk's size; "" = the storage pool's default


@dataclass(frozen=True)
class Build:
    base: str  # empty = automatic
    tools: tuple[str, ...]


@dataclass(frozen=True)
class ProfileLimits:
    cpu: str | None = None
    memory: str | None = None
    processes: int | None = None
    max_duration: str | None = None
    disk: str | None = None


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
    git_isolation: str | None = None
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
    git: Git = field(default_factory=Git)
    credentials: tuple[Credential, ...] = ()
    ports: tuple[PublishedPort, ...] = ()
    ssh: Ssh = field(default_factory=Ssh)
    prompts: Mapping[str, str] = field(default_factory=dict)  # [prompts] NAME = "text"
    security: Security = field(default_factory=Security)


_CLASSES: Mapping[str, type] = {
    "defaults": Defaults, "tool": Tool, "paths": Paths, "incus": Incus, "network": Network,
    "network.logging": NetworkLogging, "mounts": Mounts, "limits": Limits, "build": Build,
    "sessions": Sessions, "git": Git, "ssh": Ssh, "security": Security,
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
    prompts = {path.split(".", 1)[1]: value for path, value in values.items() if path.startswith("prompts.")}
    return _build(Config, {**values, "profiles": profiles, "prompts": prompts}, _CLASSES)
