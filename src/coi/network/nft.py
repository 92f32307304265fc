"""coi's nftables rules as text, and what coi reads back from nft (pure).

Table ``coi`` in the ``inet`` family (traffic routed out of the bridge and to
the host; conntrack and reject) and in the ``bridge`` family (plain drops:
anti-spoofing and container-to-container). Every container has its own chains
and set, named ``<container>.<part>``, so removal is exact. Every script is fed
to ``nft -f -`` as one transaction, by the root helper (``coi.network.helper``)
or in coi's own process as root.

The gate, a default-deny base at the bridge: rules go away with a reboot (and
never come for a container started outside coi), so the bridge itself refuses
every frame of a coi container that coi has not opened. Base chain ``gate``
(bridge prerouting, before the per-container ``.spoof`` chains at -200) accepts
frames from interfaces in set ``open`` and drops the rest from interfaces named
like coi's pinned NICs (``coi`` + 12 hex digits, see ``attach.pin_nic``): ARP
and DHCP too, so such a container has no network at all. An accept here ends
only this base chain: the container's own chains still filter. This kernel has
no bridge ``meta ibrname`` (CONFIG_NFT_BRIDGE_META), so the gate is keyed on
coi's interface names rather than on the bridge.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Mapping

from coi.errors import CoiError
from coi.network.attach import HOST_NAME_PREFIX, Attachment, check_name
from coi.network.egress import EXPLICIT_OFFSET, PROXIED_PORTS
from coi.network.policy import NetworkPolicy, collapse

TABLE = "coi"
# Chains and the set of one container: "<container>.<part>". "fwd" is an nft
# keyword, so no part is called that.
PARTS = ("out", "host", "deny", "allow", "spoof", "ports", "nat")
GATE_SET = "open"
GATE_CHAIN = "gate"
GATE_PRIORITY = -300
_INET_CHAINS = ("out", "host", "deny", "nat")
_BRIDGE_CHAINS = ("spoof", "ports")


def chain(container: str, part: str) -> str:
    return f"{container}.{part}"


def _set_items(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def check_iface(name: str) -> str:
    """Host interface names become quoted nft strings: refuse anything but plain names."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", name):
        raise CoiError(f"unexpected host interface name {name!r}"[:120])
    return name


def _iface(name: str) -> str:
    return f'"{check_iface(name)}"'


# ---- the gate ----------------------------------------------------------------------------

def nft_gate_script() -> str:
    """Load (or re-load) the gate; idempotent, and keeps the ``open`` set's elements."""
    t = TABLE
    return "\n".join([
        f"add table bridge {t}",
        f"add set bridge {t} {GATE_SET} {{ type ifname; }}",
        f"add chain bridge {t} {GATE_CHAIN} {{ type filter hook prerouting priority {GATE_PRIORITY}; policy accept; }}",
        f"flush chain bridge {t} {GATE_CHAIN}",
        f"add rule bridge {t} {GATE_CHAIN} iifname @{GATE_SET} accept",
        f'add rule bridge {t} {GATE_CHAIN} iifname "{HOST_NAME_PREFIX}*" drop',
    ]) + "\n"


def nft_open_script(veth: str) -> str:
    """Let one interface's frames past the gate (the Incus ACL backend's containers)."""
    return "\n".join([*nft_gate_script().splitlines(),
                      f"add element bridge {TABLE} {GATE_SET} {{ {_iface(veth)} }}"]) + "\n"


def nft_close_script(veth: str) -> str:
    """Shut the gate for one interface again; fine when it was not open."""
    return "\n".join(_close_lines([veth])) + "\n"


def _close_lines(veths: Iterable[str]) -> list[str]:
    # add-then-delete: deleting an element that is not there would fail the transaction
    lines = [f"add table bridge {TABLE}", f"add set bridge {TABLE} {GATE_SET} {{ type ifname; }}"]
    for veth in dict.fromkeys(veths):
        name = _iface(veth)
        lines += [f"add element bridge {TABLE} {GATE_SET} {{ {name} }}",
                  f"delete element bridge {TABLE} {GATE_SET} {{ {name} }}"]
    return lines


# ---- one container's rules -------------------------------------------------------------------

def nft_remove_script(container: str, veths: Iterable[str] = ()) -> str:
    """Remove one container's chains and set, and shut the gate for ``veths`` (its
    interfaces, as read from its ``.spoof`` chain); fine when none of it exists.

    ``add`` of an existing object is a no-op, so add-flush-delete always works
    in one transaction (nft 1.0.6 has no ``destroy``).
    """
    c = check_name(container)
    inet = [f"add table inet {TABLE}"]
    for verb in ("add", "flush", "delete"):
        inet += [f"{verb} chain inet {TABLE} {chain(c, p)}" for p in _INET_CHAINS]
    inet += [f"add set inet {TABLE} {chain(c, 'allow')} {{ type ipv4_addr; flags interval; }}",
             f"delete set inet {TABLE} {chain(c, 'allow')}"]
    bridge = [f"add table bridge {TABLE}"]
    for verb in ("add", "flush", "delete"):
        bridge += [f"{verb} chain bridge {TABLE} {chain(c, p)}" for p in _BRIDGE_CHAINS]
    veths = list(veths)
    return "\n".join(inet + bridge + (_close_lines(veths)[2:] if veths else [])) + "\n"


def nft_apply_script(att: Attachment, policy: NetworkPolicy, addresses: Iterable[str] = (), *,
                     closed: Iterable[str] = (), proxy_port: int | None = None) -> str:
    """The whole rule set of one container, replacing any earlier one atomically, and its
    interface opened in the gate in the same transaction (``closed``: the interfaces of
    its earlier rules, shut first). The parts: ``_inet_lines`` and ``_bridge_lines``.
    """
    if policy.mode not in ("restricted", "allowlist"):
        raise ValueError(f"no rules for mode {policy.mode}")
    c = check_name(att.container)
    # ValueError: never into a rule
    ipaddress.IPv4Address(att.ipv4), ipaddress.IPv4Address(att.gateway), ipaddress.IPv4Network(att.subnet)
    lines = [nft_gate_script().rstrip("\n"), nft_remove_script(c, closed).rstrip("\n")]
    lines += _inet_lines(att, policy, addresses, proxy_port)
    lines += _bridge_lines(att)
    return "\n".join(lines) + "\n"


def _inet_lines(att: Attachment, policy: NetworkPolicy, addresses: Iterable[str],
                proxy_port: int | None = None) -> list[str]:
    """inet (routed traffic, conntrack and reject work):

    ``<c>.host``  input hook: the container may reach the host only for DNS
                  and DHCP (and answer connections the host opened);
    ``<c>.out``   forward hook: restricted refuses the blocked ranges and the
                  bridge subnet; allowlist accepts only ``@<c>.allow``; other
                  containers may not open connections to this one either;
    ``<c>.deny``  the refusal: TCP reset, else ICMP admin-prohibited, so
                  blocked connections fail at once instead of timing out;
    ``<c>.nat``   allowlist by name (``proxy_port``): every TCP connection to
                  80 and 443 redirected to coi's proxy on the gateway, which
                  lets it through by name (``coi.network.proxy``); ``.host``
                  then accepts that port.
    """
    c, ip, t = att.container, str(ipaddress.IPv4Address(att.ipv4)), TABLE
    out, host, deny, allow = (chain(c, p) for p in ("out", "host", "deny", "allow"))
    lines = [
        f"add chain inet {t} {deny}",
        *([f"add rule inet {t} {deny} meta nftrace set 1"] if policy.log_blocked else []),
        f"add rule inet {t} {deny} meta l4proto tcp reject with tcp reset",
        f"add rule inet {t} {deny} reject with icmpx admin-prohibited",
        f"add chain inet {t} {host} {{ type filter hook input priority filter; policy accept; }}",
        f"add rule inet {t} {host} ip saddr {ip} ct state established,related accept",
        f"add rule inet {t} {host} ip saddr {ip} udp dport 67 accept",
        f"add rule inet {t} {host} ip saddr {ip} ip daddr {att.gateway} meta l4proto {{ tcp, udp }} th dport 53 accept",
        *([f"add rule inet {t} {host} ip saddr {ip} ip daddr {att.gateway} tcp dport "
           f"{{ {int(proxy_port)}, {int(proxy_port) + EXPLICIT_OFFSET} }} accept"] if proxy_port else []),
        f"add rule inet {t} {host} ip saddr {ip} goto {deny}",
        f"add chain inet {t} {out} {{ type filter hook forward priority filter; policy accept; }}",
        f"add rule inet {t} {out} ip saddr {att.subnet} ip daddr {ip} goto {deny}",
    ]
    if policy.mode == "restricted":
        lines.append(f"add rule inet {t} {out} ip saddr {ip} ip daddr {att.subnet} goto {deny}")
        if policy.blocked:
            lines.append(f"add rule inet {t} {out} ip saddr {ip} ip daddr {_set_items(policy.blocked)} goto {deny}")
        return lines
    if proxy_port:
        nat, ports = chain(c, "nat"), ", ".join(str(p) for p in PROXIED_PORTS)
        lines += [f"add chain inet {t} {nat} {{ type nat hook prerouting priority dstnat; policy accept; }}",
                  f"add rule inet {t} {nat} ip saddr {ip} tcp dport {{ {ports} }} redirect to :{int(proxy_port)}"]
    lines.append(f"add set inet {t} {allow} {{ type ipv4_addr; flags interval; }}")
    elements = collapse(addresses)
    if elements:
        lines.append(f"add element inet {t} {allow} {_set_items(elements)}")
    return lines + [f"add rule inet {t} {out} ip saddr {ip} ip daddr @{allow} accept",
                    f"add rule inet {t} {out} ip saddr {ip} goto {deny}"]


def _bridge_lines(att: Attachment) -> list[str]:
    """bridge (plain drops only; no conntrack or reject in this family):

    ``<c>.spoof`` prerouting: frames from the container's interface must be
                  IPv4 or ARP from its own address (DHCP's 0.0.0.0 too);
    ``<c>.ports`` forward, after br_netfilter: nothing but ARP between this
                  container and other bridge ports (a backstop when the inet
                  rules do not see bridged traffic);
    and the interface opened in the gate.
    """
    c, ip, t = att.container, str(ipaddress.IPv4Address(att.ipv4)), TABLE
    spoof, ports, veth = chain(c, "spoof"), chain(c, "ports"), _iface(att.veth)
    return [
        f"add chain bridge {t} {spoof} {{ type filter hook prerouting priority -200; policy accept; }}",
        f"add rule bridge {t} {spoof} iifname {veth} ether type != {{ ip, arp }} drop",
        f"add rule bridge {t} {spoof} iifname {veth} ether type ip ip saddr != {{ {ip}, 0.0.0.0 }} drop",
        f"add rule bridge {t} {spoof} iifname {veth} ether type arp arp saddr ip != {{ {ip}, 0.0.0.0 }} drop",
        f"add chain bridge {t} {ports} {{ type filter hook forward priority 100; policy accept; }}",
        f"add rule bridge {t} {ports} iifname {veth} ether type != arp drop",
        f"add rule bridge {t} {ports} oifname {veth} ether type != arp drop",
        f"add element bridge {t} {GATE_SET} {{ {veth} }}",
    ]


def nft_set_script(container: str, addresses: Iterable[str]) -> str:
    """Replace the allowlist set's addresses in one transaction (fails when the set is gone)."""
    allow = chain(check_name(container), "allow")
    lines = [f"flush set inet {TABLE} {allow}"]
    elements = collapse(addresses)
    if elements:
        lines.append(f"add element inet {TABLE} {allow} {_set_items(elements)}")
    return "\n".join(lines) + "\n"


def nft_probe(family: str, rule: str) -> str:
    """A one-rule ruleset for asking the kernel whether it supports ``rule``."""
    return (f"table {family} coi_doctor_probe {{\n chain c {{\n"
            f"  type filter hook forward priority 0; policy accept;\n  {rule}\n }}\n}}\n")


# ---- reading nft's answers (``nft -j list ...``, ``nft monitor trace``) ------------------------

def containers_in_ruleset(ruleset: Mapping[str, Any]) -> set[str]:
    """Containers that have chains or sets in coi's tables (from ``nft -j list ruleset``)."""
    names = set()
    for item in ruleset.get("nftables", []):
        obj = item.get("chain") or item.get("set")
        if obj and obj.get("table") == TABLE and obj.get("family") in ("inet", "bridge"):
            base, _, part = obj.get("name", "").rpartition(".")
            if base and part in PARTS:
                names.add(base)
    return names


def interfaces_in_chain(listing: Mapping[str, Any]) -> list[str]:
    """The interfaces a container's rules are keyed on (``iifname``/``oifname`` matches in
    ``nft -j list chain bridge coi <c>.spoof``): what its removal shuts in the gate."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            left = node.get("left")
            if isinstance(left, dict) and (left.get("meta") or {}).get("key") in ("iifname", "oifname"):
                right = node.get("right")
                if isinstance(right, str):
                    try:
                        found.append(check_iface(right))
                    except CoiError:
                        pass
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for item in listing.get("nftables", []):
        if isinstance(item, dict) and "rule" in item:
            walk(item["rule"].get("expr", []))
    return list(dict.fromkeys(found))


def gate_in_ruleset(listing: Mapping[str, Any]) -> bool:
    """Whether ``nft -j list table bridge coi`` shows the gate's base chain."""
    return any(isinstance(item, dict) and (item.get("chain") or {}).get("name") == GATE_CHAIN
               and (item.get("chain") or {}).get("hook") == "prerouting"
               for item in listing.get("nftables", []))


_TRACE = re.compile(r"trace id (\w+) inet coi (\S+)\.deny packet: (.*)")


def parse_trace(line: str) -> tuple[str, str] | None:
    """(container, "proto src -> dst:port") from an ``nft monitor trace`` packet line of a deny chain."""
    match = _TRACE.search(line)
    if not match:
        return None
    fields = match[3]

    def get(key: str) -> str:
        m = re.search(rf"\b{key} (\S+)", fields)
        return m[1] if m else ""

    proto = get("ip protocol") or ("tcp" if "tcp dport" in fields else "udp" if "udp dport" in fields else "ip")
    port = get("tcp dport") or get("udp dport")
    dst = get("ip daddr") + (f":{port}" if port else "")
    return match[2], f"{proto} {get('ip saddr')} -> {dst}"
