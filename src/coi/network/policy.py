"""What a session may reach: the policy from ``[network]`` config and ``--network``.

Modes (``coi.config.NETWORK_MODES``): ``restricted`` (the internet, but not the
host, private ranges, link-local or other containers), ``allowlist`` (only
listed names and IPv4 addresses) and ``open`` (no filtering). Pure: nothing here
reads the host or the daemon.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from coi.errors import CoiError

if TYPE_CHECKING:
    from coi.config import Network

PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
METADATA_RANGES = ("169.254.0.0/16",)
REFRESH_ENV = "COI_NETWORK_REFRESH_SECONDS"  # seconds between allowlist refreshes (tests)
RESOLVER_ENV = "COI_NETWORK_RESOLVER"  # "ip[:port]" of the DNS server for allowlist names
OPEN_HINT = "start the session with --network=open to run it without network isolation"
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")


@dataclass(frozen=True)
class NetworkPolicy:
    """What one session may reach, resolved from config and ``--network``."""

    mode: str
    blocked: tuple[str, ...] = ()  # restricted: destination ranges refused
    allowed: tuple[str, ...] = ()  # allowlist: names, IPv4 addresses and ranges as configured
    refresh_seconds: int = 1800
    privileged_command: tuple[str, ...] = ()  # from trusted config at use; never written to a record
    log_blocked: bool = False
    log_path: str | None = None  # None: <sessions_dir>/logs/network.log
    resolver: str | None = None  # "ip:port"; None: the bridge's own DNS at the gateway
    proxy: bool = False  # allowlist by name: TCP 80/443 through coi's proxy (coi.network.egress)
    allow_local: bool = False  # the proxy may connect to private ranges (block_private_networks off)

    def to_json(self) -> dict[str, Any]:
        """The record's copy: everything but the privileged command, which coi takes from
        trusted config each time it is needed (a record on disk never chooses a command)."""
        data = asdict(self)
        del data["privileged_command"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, privileged_command: Iterable[str] = ()) -> NetworkPolicy:
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data and f != "privileged_command"}
        for key in ("blocked", "allowed"):
            known[key] = tuple(known.get(key, ()))
        return cls(**known, privileged_command=tuple(privileged_command))


def plan(config_network: Network, mode_override: str | None = None, *,
         env: Mapping[str, str] | None = None) -> NetworkPolicy:
    """The policy for a session: ``[network]`` config, then ``--network`` on top.

    ``env`` (default ``os.environ``) may shorten the refresh interval
    (``COI_NETWORK_REFRESH_SECONDS``) and name the DNS server used for
    allowlist names (``COI_NETWORK_RESOLVER``).
    """
    from coi.config import NETWORK_MODES  # here: the root helper imports this module, not the config

    env = os.environ if env is None else env
    mode = mode_override or config_network.mode
    if mode not in NETWORK_MODES:
        raise CoiError(f"unknown network mode {mode!r}",
                       f"use {', '.join(NETWORK_MODES[:-1])} or {NETWORK_MODES[-1]}")
    allowed = tuple(dict.fromkeys(check_entry(e) for e in config_network.allowed_domains))
    if mode == "allowlist" and not allowed:
        raise CoiError("network mode allowlist needs at least one entry in [network] allowed_domains",
                       "list names or IPv4 addresses in allowed_domains, or use --network=restricted")
    logging = getattr(config_network, "logging", None)
    log_path = getattr(logging, "path", None)
    proxy = mode == "allowlist" and getattr(config_network, "allowlist_by", "name") == "name"
    wildcards = [e for e in allowed if e.startswith("*.")]
    if mode == "allowlist" and wildcards and not proxy:
        raise CoiError(f"allowed_domains entry {wildcards[0]!r}: wildcards need the allowlist by name",
                       'set [network] allowlist_by = "name", or list each subdomain')
    return NetworkPolicy(
        mode=mode, blocked=blocked_ranges(config_network, mode),
        allowed=allowed if mode == "allowlist" else (),
        refresh_seconds=refresh_seconds(config_network.refresh_interval_minutes, env),
        privileged_command=tuple(getattr(config_network, "privileged_command", ()) or ()),
        log_blocked=bool(getattr(logging, "enabled", False)) and mode != "open",
        log_path=str(log_path) if log_path else None,
        resolver=resolver_address(env.get(RESOLVER_ENV, "")), proxy=proxy,
        allow_local=not config_network.block_private_networks or config_network.allow_local_network_access)


def blocked_ranges(config_network: Network, mode: str) -> tuple[str, ...]:
    """The destination ranges restricted mode refuses, as the ``[network]`` switches say."""
    if mode != "restricted":
        return ()
    blocked: list[str] = []
    if config_network.block_private_networks and not config_network.allow_local_network_access:
        blocked += PRIVATE_RANGES
    if config_network.block_metadata_endpoint:
        blocked += METADATA_RANGES
    return tuple(blocked)


def refresh_seconds(minutes: int, env: Mapping[str, str]) -> int:
    """The allowlist refresh interval: the config's minutes, or ``COI_NETWORK_REFRESH_SECONDS``."""
    if not env.get(REFRESH_ENV):
        return minutes * 60
    try:
        return max(1, int(env[REFRESH_ENV]))
    except ValueError:
        raise CoiError(f"{REFRESH_ENV}={env[REFRESH_ENV]!r} is not a whole number of seconds") from None


def check_entry(entry: str) -> str:
    """An allowlist entry as written: a domain name, an IPv4 address or an IPv4 range."""
    text = entry.strip()
    if text.startswith("*."):
        rest = check_entry(text[2:])
        if is_ipv4(rest):
            raise CoiError(f"allowed_domains entry {entry!r}: a wildcard needs a domain name after '*.'")
        return "*." + rest
    if is_ipv4(text):
        return str(ipaddress.ip_network(text, strict=False))
    if re.fullmatch(r"[\d./]+", text) or not _DOMAIN.fullmatch(text) or len(text) > 253:
        raise CoiError(f"allowed_domains entry {entry!r} is not a domain name or an IPv4 address")
    return text.rstrip(".").lower()


def is_ipv4(text: str) -> bool:
    """Whether ``text`` is an IPv4 address or range (not a name, not IPv6)."""
    try:
        return ipaddress.ip_network(text, strict=False).version == 4
    except ValueError:
        return False


def resolver_address(text: str) -> str | None:
    """``COI_NETWORK_RESOLVER`` as ``ip:port`` (port 53 when left out); None when unset."""
    if not text:
        return None
    host, _, port = text.partition(":")
    try:
        ipaddress.IPv4Address(host)
        number = int(port or 53)
    except ValueError:
        raise CoiError(f"{RESOLVER_ENV}={text!r} is not IPV4[:PORT]") from None
    return f"{host}:{number}"


def collapse(addresses: Iterable[str]) -> list[str]:
    """IPv4 addresses and ranges, without duplicates or overlaps (as nft interval sets need)."""
    nets = {ipaddress.IPv4Network(a, strict=False) for a in addresses}
    out = []
    for net in ipaddress.collapse_addresses(nets):
        out.append(str(net.network_address) if net.prefixlen == 32 else str(net))
    return out
