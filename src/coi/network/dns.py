"""Resolving allowlist names: a plain UDP DNS client (stdlib only) and the lookup of
every entry, with the last good answers kept when a lookup fails."""

from __future__ import annotations

import os
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from coi.network.attach import Attachment
from coi.network.policy import NetworkPolicy, collapse, is_ipv4

Query = Callable[[str, tuple[str, int]], list[str]]


class ResolveError(Exception):
    """A name did not resolve (the message says which, and why)."""


def dns_query_a(name: str, server: tuple[str, int], *, timeout: float = 2.0) -> list[str]:
    """The IPv4 addresses of ``name`` from one DNS server (a plain UDP query, stdlib only)."""
    qid = int.from_bytes(os.urandom(2), "big")
    try:
        labels = name.rstrip(".").encode("idna").split(b".")
    except UnicodeError:
        raise ResolveError(f"{name}: not a valid name") from None
    question = b"".join(bytes([len(label)]) + label for label in labels) + b"\0" + struct.pack("!HH", 1, 1)
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(server)
            sock.send(packet)
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(4096)
                if len(data) >= 12 and struct.unpack("!H", data[:2])[0] == qid:
                    return parse_dns_answer(data, name)
        except OSError as exc:  # timeout, refused, unreachable
            raise ResolveError(f"{name}: no answer from {server[0]}:{server[1]} ({exc.strerror or exc})") from None


def parse_dns_answer(data: bytes, name: str = "") -> list[str]:
    """A records of a DNS response; ResolveError for errors and malformed answers."""
    try:
        _, flags, qd, an, _, _ = struct.unpack("!HHHHHH", data[:12])
        rcode = flags & 0xF
        if rcode == 3:
            raise ResolveError(f"{name}: no such name")
        if rcode:
            raise ResolveError(f"{name}: DNS error code {rcode}")
        pos = 12
        for _ in range(qd):
            pos = _skip_name(data, pos) + 4
        found = []
        for _ in range(an):
            pos = _skip_name(data, pos)
            rtype, rclass, _, length = struct.unpack("!HHIH", data[pos:pos + 10])
            pos += 10
            if pos + length > len(data):
                raise ResolveError(f"{name}: truncated answer")
            if rtype == 1 and rclass == 1 and length == 4:
                found.append(socket.inet_ntoa(data[pos:pos + 4]))
            pos += length
        return found
    except (struct.error, IndexError):
        raise ResolveError(f"{name}: malformed answer") from None


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + length


@dataclass
class Resolution:
    addresses: list[str]  # everything allowed, collapsed
    by_entry: dict[str, list[str]]
    failed: dict[str, str]  # entry -> why (and no cached addresses either)
    stale: list[str] = field(default_factory=list)  # entries kept from the cache


def resolve_allowed(entries: Iterable[str], *, server: tuple[str, int], cache: dict[str, Any],
                    query: Query | None = None) -> Resolution:
    """Resolve allowlist names in parallel; a failed lookup keeps the cached addresses.

    ``cache`` (name -> {"addresses": [...]}) is updated in place with good answers.
    """
    query = query or (lambda n, s: dns_query_a(n, s))
    entries = list(entries)
    names = [e for e in entries if not is_ipv4(e)]
    results: dict[str, list[str] | ResolveError] = {}

    def one(name: str) -> tuple[str, list[str] | ResolveError]:
        try:
            return name, query(name, server) or ResolveError(f"{name}: no IPv4 address")
        except ResolveError as exc:
            return name, exc

    if names:
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            results = dict(pool.map(one, names))
    by_entry: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    stale = []
    for entry in entries:
        if is_ipv4(entry):
            by_entry[entry] = [entry]
            continue
        got = results[entry]
        if isinstance(got, list):
            by_entry[entry] = sorted(set(got))
            cache[entry] = {"addresses": by_entry[entry], "at": int(time.time())}
        elif (cache.get(entry) or {}).get("addresses"):
            by_entry[entry] = list(cache[entry]["addresses"])
            stale.append(entry)
        else:
            failed[entry] = str(got)
    everything = [a for addrs in by_entry.values() for a in addrs]
    return Resolution(collapse(everything), by_entry, failed, stale)


def resolver_for(policy: NetworkPolicy, att: Attachment) -> tuple[str, int]:
    """Where allowlist names are looked up: the bridge's DNS (what the container asks) by default."""
    if policy.resolver:
        host, _, port = policy.resolver.partition(":")
        return host, int(port)
    return att.gateway, 53
