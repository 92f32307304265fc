"""Egress by name (allowlist mode through coi's proxy), the pure part: which names an
allowlist lets through (exact names and ``*.example.com`` wildcards), which upstream
addresses the proxy never connects to, the proxy's port, and its refusal text.

The proxy itself (``coi.network.proxy``) and the redirect to it (``coi.network.nft``)
use these; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

# Ports whose TCP connections are redirected to the proxy.
PROXIED_PORTS = (80, 443)


# The proxy's port on the bridge gateway: one per host user (the root helper computes
# it from the calling user, so a request cannot redirect a container to another port).
PORT_BASE = 13000


def proxy_port(uid: int) -> int:
    """The port the redirect goes to (transparent)."""
    return PORT_BASE + uid % 1000


EXPLICIT_OFFSET = 1000  # the explicit port is the transparent one + this


def explicit_port(uid: int) -> int:
    """The port for programs that honour HTTP(S)_PROXY (CONNECT and absolute URLs)."""
    return proxy_port(uid) + EXPLICIT_OFFSET


def proxy_variables(gateway: str, uid: int) -> dict[str, str]:
    """The agent's proxy variables: the same filter, for programs that ask for a proxy."""
    url = f"http://{gateway}:{explicit_port(uid)}"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}


def normal_host(host: str) -> str:
    """A host name as the allowlist compares it: lower case, no trailing dot, no port."""
    host = host.strip().lower()
    if host.startswith("[") or host.count(":") > 1:  # IPv6 literal: never a listed name
        return host
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


@dataclass(frozen=True)
class NameRules:
    """An allowlist's names: exact ones and wildcard suffixes (``*.example.com`` -> ``.example.com``)."""

    exact: frozenset[str]
    suffixes: tuple[str, ...]

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> NameRules:
        exact, suffixes = set(), []
        for entry in entries:
            if entry.startswith("*."):
                suffixes.append(entry[1:].lower())
            elif not _is_address(entry):
                exact.add(entry.lower())
        return cls(frozenset(exact), tuple(suffixes))

    def allows(self, host: str | None) -> bool:
        """Whether ``host`` (an SNI, Host or CONNECT name) is listed; a wildcard covers every
        name below its domain, not the domain itself."""
        if not host:
            return False
        name = normal_host(host)
        if _is_address(name):
            return False  # addresses are allowed by the address rules, not by the proxy
        return name in self.exact or any(name.endswith(s) and len(name) > len(s) for s in self.suffixes)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_network(text.strip("[]"), strict=False)
        return True
    except ValueError:
        return False


ALWAYS_REFUSED = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")


def upstream_problem(address: str, *, refused: Iterable[str]) -> str | None:
    """Why the proxy must not connect to ``address`` for a container (loopback, link-local,
    the bridge, and ``refused``: the private ranges unless local network access is on), or
    None. A listed name that resolves there would otherwise open the host to the agent."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an address"
    if ip.version != 4:
        return "IPv6 upstreams are not supported"
    for net in (*ALWAYS_REFUSED, *refused):
        if ip in ipaddress.ip_network(net, strict=False):
            return f"{address} is in {net}, which a session may not reach"
    return None


def refusal_text(host: str | None, port: int) -> str:
    """The body of the 403 a refused plain-HTTP request gets."""
    shown = normal_host(host) if host else "(no host name)"
    return (f"coi: {shown}:{port} is not in this session's network allowlist.\n"
            f"To allow it, add \"{shown}\" (or a \"*.\" wildcard above it) to [network] allowed_domains "
            "in your coi config, then start the session again.\n")
