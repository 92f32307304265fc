"""Incus network ACL rules for one container (pure).

Incus orders ACL rules drop > reject > allow > default, and always lets DNS
and DHCP to the bridge through first. The ACL is named like the container and
described ``coi network isolation for <container>``, which is how coi finds its
own ACLs again.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from coi.network.attach import Attachment, check_name
from coi.network.policy import NetworkPolicy, collapse

ACL_DESCRIPTION = "coi network isolation for "

Rule = dict[str, str]


def acl_name(container: str) -> str:
    return check_name(container)


def acl_spec(att: Attachment, policy: NetworkPolicy, addresses: Iterable[str] = (), *,
             host_addresses: Iterable[str] = ()) -> tuple[list[Rule], list[Rule], dict[str, str]]:
    """(egress rules, ingress rules, NIC settings) of the Incus ACL for one container.

    Restricted mode refuses the host's own addresses (``host_addresses``) too,
    whichever network they are on; the NIC gets Incus's MAC and IPv4 anti-spoofing.
    """
    def rule(action: str, description: str, **match: str) -> Rule:
        return {"action": action, "state": "enabled", "description": description, **match}

    ingress = [rule("drop", "no connections from other containers on the bridge",
                    source=range_without(att.subnet, att.gateway))]
    if policy.mode == "restricted":
        egress = [rule("reject", "not the host or other containers", destination=att.subnet),
                  rule("reject", "no IPv6", destination="::/0")]
        if policy.blocked:
            egress.insert(1, rule("reject", "blocked ranges", destination=",".join(policy.blocked)))
        own = collapse(a for a in host_addresses if not ipaddress.IPv4Address(a) in ipaddress.IPv4Network(att.subnet))
        if own:
            egress.insert(1, rule("reject", "the host's own addresses", destination=",".join(own)))
        default = "allow"
    elif policy.mode == "allowlist":
        elements = collapse(addresses)
        egress = [rule("allow", "allowed names and addresses", destination=",".join(elements))] if elements else []
        default = "reject"
    else:
        raise ValueError(f"no rules for mode {policy.mode}")
    nic = {"security.acls": acl_name(att.container),
           "security.acls.default.egress.action": default,
           "security.acls.default.ingress.action": "allow",
           "security.ipv4_filtering": "true", "security.mac_filtering": "true"}
    return egress, ingress, nic


def range_without(subnet: str, gateway: str) -> str:
    """The bridge's host addresses except the gateway, as Incus ACL ranges."""
    net = ipaddress.IPv4Network(subnet)
    gw = ipaddress.IPv4Address(gateway)
    hosts = list(net.hosts()) or [net.network_address]
    ranges, start = [], None
    prev = None
    for addr in hosts:
        if addr == gw:
            if start is not None:
                ranges.append((start, prev))
            start = None
        elif start is None:
            start = addr
        prev = addr
    if start is not None:
        ranges.append((start, prev))
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def refusal_reason(message: str) -> str:
    """Why Incus refused the ACL on the NIC, from its error message, in one line."""
    if "Protocol error" in message or "ct state" in message:
        return "Incus cannot apply network ACLs to bridge NICs on this kernel (no bridge-family conntrack)"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return f"Incus refused network ACLs on the NIC: {(lines[0] if lines else 'no output')[:300]}"
