"""Network isolation: what a session container may reach, and the rules that enforce it.

Modes: ``restricted`` (the internet, but not the host, private ranges, link-local
or other containers), ``allowlist`` (only listed names and IPv4 addresses) and
``open`` (no filtering). The rules are generated as text by pure functions
(an nft ruleset, Incus ACL rule lists); two backends apply them:

* **Incus network ACLs** on the container's NIC, applied by the daemon (no root).
  Incus refuses them on kernels without bridge-family conntrack; that is
  detected once, remembered under ``<sessions_dir>/network/``, and coi falls back.
* **Host nftables**: table ``coi`` in the ``inet`` family (traffic routed out of
  the bridge and to the host; conntrack and reject) and in the ``bridge`` family
  (plain drops: anti-spoofing and container-to-container). Every container has
  its own chains and set, named ``<container>.<part>``, so removal is exact. As
  root this runs in-process; else coi's helper (``coi.nfthelper``, installed by
  ``coi setup``) runs through ``[network] privileged_command`` (for example
  ``["sudo", "-n"]``), taking JSON requests, never scripts. A gate in ``bridge coi``
  drops every frame of a coi container whose rules (or ACLs) have not opened it.

If the chosen mode cannot be enforced, ``apply`` raises (fail closed).
A detached helper (``python -m coi.netwatch``) follows each filtered container:
it re-resolves the allowlist, re-applies the rules when a restart changed the
container's host interface or address, writes blocked attempts to the network
log, and removes the rules when the container stops or disappears.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from coi.errors import CoiError, NotFoundError, OperationFailedError
from coi.wait import wait_for

Log = Callable[[str], None]

MODES = ("restricted", "allowlist", "open")
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
METADATA_RANGES = ("169.254.0.0/16",)
TABLE = "coi"
# Chains and the set of one container: "<container>.<part>". "fwd" is an nft
# keyword, so no part is called that.
PARTS = ("out", "host", "deny", "allow", "spoof", "ports")
REFRESH_ENV = "COI_NETWORK_REFRESH_SECONDS"  # seconds between allowlist refreshes (tests)
RESOLVER_ENV = "COI_NETWORK_RESOLVER"  # "ip[:port]" of the DNS server for allowlist names
OPEN_HINT = "start the session with --network=open to run it without network isolation"
ACL_DESCRIPTION = "coi network isolation for "
DHCP_TIMEOUT = 30.0
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,62}")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")


class BackendUnavailable(Exception):
    """A backend cannot enforce rules on this host (the reason is the message)."""


# ---- the policy -------------------------------------------------------------------

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


def plan(config_network: Any, mode_override: str | None = None, *,
         env: Mapping[str, str] | None = None) -> NetworkPolicy:
    """The policy for a session: ``[network]`` config, then ``--network`` on top.

    ``env`` (default ``os.environ``) may shorten the refresh interval
    (``COI_NETWORK_REFRESH_SECONDS``) and name the DNS server used for
    allowlist names (``COI_NETWORK_RESOLVER``).
    """
    env = os.environ if env is None else env
    mode = mode_override or config_network.mode
    if mode not in MODES:
        raise CoiError(f"unknown network mode {mode!r}", "use restricted, allowlist or open")
    blocked: list[str] = []
    if mode == "restricted":
        if config_network.block_private_networks and not config_network.allow_local_network_access:
            blocked += PRIVATE_RANGES
        if config_network.block_metadata_endpoint:
            blocked += METADATA_RANGES
    allowed = tuple(dict.fromkeys(_check_entry(e) for e in config_network.allowed_domains))
    if mode == "allowlist" and not allowed:
        raise CoiError("network mode allowlist needs at least one entry in [network] allowed_domains",
                       "list names or IPv4 addresses in allowed_domains, or use --network=restricted")
    refresh = config_network.refresh_interval_minutes * 60
    if env.get(REFRESH_ENV):
        try:
            refresh = max(1, int(env[REFRESH_ENV]))
        except ValueError:
            raise CoiError(f"{REFRESH_ENV}={env[REFRESH_ENV]!r} is not a whole number of seconds") from None
    logging = getattr(config_network, "logging", None)
    log_path = getattr(logging, "path", None)
    return NetworkPolicy(
        mode=mode, blocked=tuple(blocked), allowed=allowed if mode == "allowlist" else (),
        refresh_seconds=refresh,
        privileged_command=tuple(getattr(config_network, "privileged_command", ()) or ()),
        log_blocked=bool(getattr(logging, "enabled", False)) and mode != "open",
        log_path=str(log_path) if log_path else None,
        resolver=_resolver_address(env.get(RESOLVER_ENV, "")))


def _check_entry(entry: str) -> str:
    """An allowlist entry as written: a domain name, an IPv4 address or an IPv4 range."""
    text = entry.strip()
    if text.startswith("*."):
        raise CoiError(f"allowed_domains entry {entry!r}: wildcards are not supported",
                       f"list each subdomain explicitly, for example {text[2:]!r} and 'www.{text[2:]}'")
    if _is_ipv4(text):
        return str(ipaddress.ip_network(text, strict=False))
    if re.fullmatch(r"[\d./]+", text) or not _DOMAIN.fullmatch(text) or len(text) > 253:
        raise CoiError(f"allowed_domains entry {entry!r} is not a domain name or an IPv4 address")
    return text.rstrip(".").lower()


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_network(text, strict=False).version == 4
    except ValueError:
        return False


def _resolver_address(text: str) -> str | None:
    if not text:
        return None
    host, _, port = text.partition(":")
    try:
        ipaddress.IPv4Address(host)
        number = int(port or 53)
    except ValueError:
        raise CoiError(f"{RESOLVER_ENV}={text!r} is not IPV4[:PORT]") from None
    return f"{host}:{number}"


# ---- where the container is attached ------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    """The container's NIC as the host sees it: the keys of its rules."""

    container: str
    nic: str  # device name inside, e.g. eth0
    bridge: str  # the managed bridge, e.g. coibr0
    veth: str  # host-side interface (changes on every start)
    ipv4: str
    gateway: str  # the bridge's own address: DNS and DHCP
    subnet: str  # the bridge's subnet, e.g. 10.195.0.0/24


def check_name(container: str) -> str:
    """Container names become nft identifiers: refuse anything else (no quoting games)."""
    if not _NAME.fullmatch(container) or container.endswith("-"):
        raise CoiError(f"container name {container!r} cannot carry network rules")
    return container


def find_attachment(client: Any, container: str, *, timeout: float = DHCP_TIMEOUT) -> Attachment:
    """The bridge, host-side interface and IPv4 of a container.

    A container with a pinned NIC (``pin_nic``) has them in its config,
    running or not. Otherwise it must be running, and this waits (with a
    deadline) for DHCP to give it an address.
    """
    check_name(container)
    inst = client.instance(container)
    nic, bridge = _bridged_nic(inst)
    net_cfg = client.network(bridge).get("config") or {}
    gateway_cidr = net_cfg.get("ipv4.address", "")
    try:
        gateway_if = ipaddress.IPv4Interface(gateway_cidr)
    except ValueError:
        raise CoiError(f"bridge {bridge} has no IPv4 subnet ({gateway_cidr or 'none'})",
                       "coi setup creates the bridge coibr0 with one") from None
    veth, ipv4 = _pinned(inst, nic) or _leased(client, container, inst, nic, timeout)
    return Attachment(container=container, nic=nic, bridge=bridge, veth=veth, ipv4=ipv4,
                      gateway=str(gateway_if.ip), subnet=str(gateway_if.network))


def _leased(client: Any, container: str, inst: Mapping[str, Any], nic: str,
            timeout: float) -> tuple[str, str]:
    """(host-side interface, IPv4) of a running container once DHCP gave it an address."""
    def addressed() -> tuple[str, str] | None:
        state = client.instance_state(container)
        if state.get("status") not in ("Running", None):
            raise CoiError(f"container {container} is not running ({state.get('status')})")
        data = (state.get("network") or {}).get(nic) or {}
        veth = data.get("host_name") or (inst.get("config") or {}).get(f"volatile.{nic}.host_name", "")
        ipv4 = [a["address"] for a in data.get("addresses") or []
                if a.get("family") == "inet" and a.get("scope") == "global"]
        return (veth, str(ipaddress.IPv4Address(ipv4[0]))) if veth and ipv4 else None

    try:
        return wait_for(addressed, timeout=timeout, what=f"{container} to get an IPv4 address",
                        first_interval=0.02)
    except CoiError as exc:
        if "timed out" not in exc.message:
            raise
        raise CoiError(f"cannot isolate {container}: its {nic} got no IPv4 address within {timeout:g}s",
                       f"check the image's DHCP client, or {OPEN_HINT}") from None


def _bridged_nic(inst: Mapping[str, Any]) -> tuple[str, str]:
    devices = inst.get("expanded_devices") or inst.get("devices") or {}
    nics = {name: d for name, d in devices.items() if d.get("type") == "nic"}
    for name in sorted(nics, key=lambda n: (n != "eth0", n)):
        bridge = nics[name].get("network") or nics[name].get("parent")
        if bridge:
            return name, bridge
    raise CoiError(f"container {inst.get('name')} has no NIC on a bridge to isolate",
                   f"the coi profile gives containers eth0 on coibr0; or {OPEN_HINT}")


def _pinned(inst: Mapping[str, Any], nic: str) -> tuple[str, str] | None:
    """(host-side interface, IPv4) when the NIC's config fixes both."""
    device = (inst.get("expanded_devices") or {}).get(nic) or {}
    if device.get("host_name") and device.get("ipv4.address"):
        return device["host_name"], str(ipaddress.IPv4Address(device["ipv4.address"]))
    return None


def is_pinned(inst: Mapping[str, Any]) -> bool:
    """Whether the container's rules can be keyed before it starts (see ``pin_nic``)."""
    try:
        return _pinned(inst, _bridged_nic(inst)[0]) is not None
    except CoiError:
        return False


def applies_before_start(inst: Mapping[str, Any], policy: NetworkPolicy, sessions_dir: Path) -> bool:
    """Whether ``apply`` can run before the container starts: its NIC is pinned and the
    backend is known. (Incus accepts ACLs on a stopped container even on kernels where
    the start then fails with them, so the first probe needs a running one.)"""
    if policy.mode == "open":
        return True
    return is_pinned(inst) and Store(sessions_dir).capability(AclBackend.name) is not None


# ---- pinned addresses -----------------------------------------------------------------
#
# A session container gets its IPv4 address and its host-side interface name
# when it is created (an override of the profile's NIC), and LXC configures the
# address and default route inside before init runs. Its rules can then go on
# before it starts, and its network works from its first moment: no wait for
# DHCP, and no moment of running unfiltered. Incus's dnsmasq leases the same
# address to the container's DHCP client later. Incus refuses an address
# another NIC has, but two creations at once can both pass that check, so the
# choice and the creation happen under ``address_lock``.

# Made by `coi setup` (group incus-admin), so every coi user on the host shares it.
ADDRESS_LOCK = Path("/var/lib/coi/addresses.lock")
HOST_NAME_PREFIX = "coi"  # + 12 hex digits: 15 characters, the longest interface name


@contextmanager
def address_lock(fallback_dir: Path) -> Iterator[None]:
    """Host-wide lock for choosing an address; a per-user one where setup made none."""
    try:
        fd = os.open(ADDRESS_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        fallback_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(fallback_dir / "addresses.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Pin:
    """What a new container gets so that its network is known and up from the start."""

    devices: dict[str, dict[str, str]]  # the NIC override
    config: dict[str, str]  # raw.lxc: address and route inside, before init
    files: dict[str, bytes]  # resolv.conf: the bridge's resolver, before systemd-resolved runs


def pin_nic(client: Any, instances: Iterable[Mapping[str, Any]], *, profile: str = "coi",
            rand: Callable[[int], bytes] = os.urandom) -> Pin | None:
    """Pin a new container's NIC to a free address; None when the profile's only NIC is
    not on a managed bridge with an IPv4 subnet (its rules then wait for DHCP).

    Call it under ``address_lock`` with a fresh list of instances.
    """
    devices = client.profile(profile).get("devices") or {}
    nics = {n: d for n, d in devices.items() if d.get("type") == "nic"}
    if len(nics) != 1:  # LXC numbers NICs: with one, it is lxc.net.0
        return None
    (name, nic), = nics.items()
    bridge = nic.get("network")
    if not bridge:
        return None
    try:
        subnet = ipaddress.IPv4Interface((client.network(bridge).get("config") or {}).get("ipv4.address", ""))
    except ValueError:
        return None
    used = {lease.get("address", "") for lease in client.network_leases(bridge)}
    for inst in instances:
        for device in (inst.get("expanded_devices") or {}).values():
            if device.get("type") == "nic" and device.get("network") == bridge:
                used.add(device.get("ipv4.address", ""))
    address = choose_address(subnet, used, rand=rand)
    net, gateway = subnet.network, subnet.ip
    return Pin(
        devices={name: {**nic, "ipv4.address": address, "host_name": HOST_NAME_PREFIX + rand(6).hex()}},
        config={"raw.lxc": f"lxc.net.0.ipv4.address = {address}/{net.prefixlen} {net.broadcast_address}\n"
                           f"lxc.net.0.ipv4.gateway = {gateway}\n"},
        files={"/etc/resolv.conf": f"nameserver {gateway}\n".encode()})


def choose_address(subnet: ipaddress.IPv4Interface, used: Iterable[str], *,
                   rand: Callable[[int], bytes] = os.urandom) -> str:
    """A free host address of the bridge's subnet (not the bridge's own), from a random start."""
    net = subnet.network
    first, count = int(net.network_address) + 1, net.num_addresses - 2
    taken = {int(subnet.ip)}
    for address in used:
        try:
            taken.add(int(ipaddress.IPv4Address(address)))
        except ValueError:
            pass
    start = int.from_bytes(rand(4), "big") % max(count, 1)
    for i in range(max(count, 0)):
        candidate = first + (start + i) % count
        if candidate not in taken:
            return str(ipaddress.IPv4Address(candidate))
    raise CoiError(f"no free IPv4 address left in {net} for a new container",
                   "end sessions you no longer need (coi list, coi kill NAME)")


# ---- nftables rules (pure) ------------------------------------------------------------

def chain(container: str, part: str) -> str:
    return f"{container}.{part}"


def _set_items(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def collapse(addresses: Iterable[str]) -> list[str]:
    """IPv4 addresses and ranges, without duplicates or overlaps (as nft interval sets need)."""
    nets = {ipaddress.IPv4Network(a, strict=False) for a in addresses}
    out = []
    for net in ipaddress.collapse_addresses(nets):
        out.append(str(net.network_address) if net.prefixlen == 32 else str(net))
    return out


# ---- the gate: a default-deny base at the bridge ----------------------------------------
#
# Rules go away with a reboot (and never come for a container started outside
# coi), so the bridge itself refuses every frame of a coi container that coi
# has not opened: base chain ``gate`` (bridge prerouting, before the per-container
# ``.spoof`` chains at -200) accepts frames from interfaces in set ``open`` and
# drops the rest from interfaces named like coi's pinned NICs (``coi`` + 12 hex
# digits, see ``pin_nic``): ARP and DHCP too, so such a container has no network
# at all. An accept here ends only this base chain: the container's own chains
# still filter. This kernel has no bridge ``meta ibrname`` (CONFIG_NFT_BRIDGE_META),
# so the gate is keyed on coi's interface names rather than on the bridge.

GATE_SET = "open"
GATE_CHAIN = "gate"
GATE_PRIORITY = -300


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


def nft_remove_script(container: str, veths: Iterable[str] = ()) -> str:
    """Remove one container's chains and set, and shut the gate for ``veths`` (its
    interfaces, as read from its ``.spoof`` chain); fine when none of it exists.

    ``add`` of an existing object is a no-op, so add-flush-delete always works
    in one transaction (nft 1.0.6 has no ``destroy``).
    """
    c = check_name(container)
    inet = [f"add table inet {TABLE}"]
    inet += [f"add chain inet {TABLE} {chain(c, p)}" for p in ("out", "host", "deny")]
    inet += [f"flush chain inet {TABLE} {chain(c, p)}" for p in ("out", "host", "deny")]
    inet += [f"delete chain inet {TABLE} {chain(c, p)}" for p in ("out", "host", "deny")]
    inet += [f"add set inet {TABLE} {chain(c, 'allow')} {{ type ipv4_addr; flags interval; }}",
             f"delete set inet {TABLE} {chain(c, 'allow')}"]
    bridge = [f"add table bridge {TABLE}"]
    bridge += [f"add chain bridge {TABLE} {chain(c, p)}" for p in ("spoof", "ports")]
    bridge += [f"flush chain bridge {TABLE} {chain(c, p)}" for p in ("spoof", "ports")]
    bridge += [f"delete chain bridge {TABLE} {chain(c, p)}" for p in ("spoof", "ports")]
    veths = list(veths)
    return "\n".join(inet + bridge + (_close_lines(veths)[2:] if veths else [])) + "\n"


def nft_apply_script(att: Attachment, policy: NetworkPolicy, addresses: Iterable[str] = (), *,
                     closed: Iterable[str] = ()) -> str:
    """The whole rule set of one container, replacing any earlier one atomically, and its
    interface opened in the gate in the same transaction (``closed``: the interfaces of
    its earlier rules, shut first).

    inet (routed traffic, conntrack and reject work):
      ``<c>.host``  input hook: the container may reach the host only for DNS
                    and DHCP (and answer connections the host opened);
      ``<c>.out``   forward hook: restricted refuses the blocked ranges and the
                    bridge subnet; allowlist accepts only ``@<c>.allow``; other
                    containers may not open connections to this one either;
      ``<c>.deny``  the refusal: TCP reset, else ICMP admin-prohibited, so
                    blocked connections fail at once instead of timing out.
    bridge (plain drops only; no conntrack or reject in this family):
      ``<c>.spoof`` prerouting: frames from the container's interface must be
                    IPv4 or ARP from its own address (DHCP's 0.0.0.0 too);
      ``<c>.ports`` forward, after br_netfilter: nothing but ARP between this
                    container and other bridge ports (a backstop when the inet
                    rules do not see bridged traffic).
    """
    if policy.mode not in ("restricted", "allowlist"):
        raise ValueError(f"no rules for mode {policy.mode}")
    c, ip, t = check_name(att.container), str(ipaddress.IPv4Address(att.ipv4)), TABLE
    ipaddress.IPv4Address(att.gateway), ipaddress.IPv4Network(att.subnet)  # ValueError: never into a rule
    out, host, deny, allow = (chain(c, p) for p in ("out", "host", "deny", "allow"))
    lines = [nft_gate_script().rstrip("\n"), nft_remove_script(c, closed).rstrip("\n")]
    lines += [
        f"add chain inet {t} {deny}",
        *([f"add rule inet {t} {deny} meta nftrace set 1"] if policy.log_blocked else []),
        f"add rule inet {t} {deny} meta l4proto tcp reject with tcp reset",
        f"add rule inet {t} {deny} reject with icmpx admin-prohibited",
        f"add chain inet {t} {host} {{ type filter hook input priority filter; policy accept; }}",
        f"add rule inet {t} {host} ip saddr {ip} ct state established,related accept",
        f"add rule inet {t} {host} ip saddr {ip} udp dport 67 accept",
        f"add rule inet {t} {host} ip saddr {ip} ip daddr {att.gateway} meta l4proto {{ tcp, udp }} th dport 53 accept",
        f"add rule inet {t} {host} ip saddr {ip} goto {deny}",
        f"add chain inet {t} {out} {{ type filter hook forward priority filter; policy accept; }}",
        f"add rule inet {t} {out} ip saddr {att.subnet} ip daddr {ip} goto {deny}",
    ]
    if policy.mode == "restricted":
        lines.append(f"add rule inet {t} {out} ip saddr {ip} ip daddr {att.subnet} goto {deny}")
        if policy.blocked:
            lines.append(f"add rule inet {t} {out} ip saddr {ip} ip daddr {_set_items(policy.blocked)} goto {deny}")
    else:
        lines.append(f"add set inet {t} {allow} {{ type ipv4_addr; flags interval; }}")
        elements = collapse(addresses)
        if elements:
            lines.append(f"add element inet {t} {allow} {_set_items(elements)}")
        lines += [f"add rule inet {t} {out} ip saddr {ip} ip daddr @{allow} accept",
                  f"add rule inet {t} {out} ip saddr {ip} goto {deny}"]
    spoof, ports, veth = chain(c, "spoof"), chain(c, "ports"), _iface(att.veth)
    lines += [
        f"add chain bridge {t} {spoof} {{ type filter hook prerouting priority -200; policy accept; }}",
        f"add rule bridge {t} {spoof} iifname {veth} ether type != {{ ip, arp }} drop",
        f"add rule bridge {t} {spoof} iifname {veth} ether type ip ip saddr != {{ {ip}, 0.0.0.0 }} drop",
        f"add rule bridge {t} {spoof} iifname {veth} ether type arp arp saddr ip != {{ {ip}, 0.0.0.0 }} drop",
        f"add chain bridge {t} {ports} {{ type filter hook forward priority 100; policy accept; }}",
        f"add rule bridge {t} {ports} iifname {veth} ether type != arp drop",
        f"add rule bridge {t} {ports} oifname {veth} ether type != arp drop",
        f"add element bridge {t} {GATE_SET} {{ {veth} }}",
    ]
    return "\n".join(lines) + "\n"


def nft_set_script(container: str, addresses: Iterable[str]) -> str:
    """Replace the allowlist set's addresses in one transaction (fails when the set is gone)."""
    allow = chain(check_name(container), "allow")
    lines = [f"flush set inet {TABLE} {allow}"]
    elements = collapse(addresses)
    if elements:
        lines.append(f"add element inet {TABLE} {allow} {_set_items(elements)}")
    return "\n".join(lines) + "\n"


def check_iface(name: str) -> str:
    """Host interface names become quoted nft strings: refuse anything but plain names."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", name):
        raise CoiError(f"unexpected host interface name {name!r}"[:120])
    return name


def _iface(name: str) -> str:
    return f'"{check_iface(name)}"'


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


# ---- Incus ACL rules (pure) --------------------------------------------------------------

def _range_without(subnet: str, gateway: str) -> str:
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


def host_ipv4_addresses() -> list[str]:
    """The host's own IPv4 addresses (every interface, loopback aside): restricted mode
    refuses them on the ACL backend (the nft backend refuses all of them in its input hook)."""
    proc = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True)
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        links = []
    found = {info.get("local", "") for link in links for info in link.get("addr_info") or []}
    return sorted(a for a in found if _is_ipv4(a) and not ipaddress.IPv4Address(a).is_loopback)


def acl_spec(att: Attachment, policy: NetworkPolicy, addresses: Iterable[str] = (), *,
             host_addresses: Iterable[str] = ()) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, str]]:
    """(egress rules, ingress rules, NIC settings) of the Incus ACL for one container.

    Incus orders ACL rules drop > reject > allow > default, and always lets
    DNS and DHCP to the bridge through first. Restricted mode refuses the host's
    own addresses (``host_addresses``) too, whichever network they are on; the NIC
    gets Incus's MAC and IPv4 anti-spoofing.
    """
    def rule(action: str, description: str, **match: str) -> dict[str, str]:
        return {"action": action, "state": "enabled", "description": description, **match}

    ingress = [rule("drop", "no connections from other containers on the bridge",
                    source=_range_without(att.subnet, att.gateway))]
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


def acl_name(container: str) -> str:
    return check_name(container)


# ---- resolving allowlist names ------------------------------------------------------------

class ResolveError(Exception):
    pass


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
                    query: Callable[[str, tuple[str, int]], list[str]] | None = None) -> Resolution:
    """Resolve allowlist names in parallel; a failed lookup keeps the cached addresses.

    ``cache`` (name -> {"addresses": [...]}) is updated in place with good answers.
    """
    query = query or (lambda n, s: dns_query_a(n, s))
    entries = list(entries)
    names = [e for e in entries if not _is_ipv4(e)]
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
        if _is_ipv4(entry):
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


# ---- state under <sessions_dir>/network ---------------------------------------------------

class Store:
    """Per-container records, the DNS cache and the backend capability cache."""

    def __init__(self, sessions_dir: Path) -> None:
        self.root = Path(sessions_dir) / "network"

    def _write(self, path: Path, data: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def record_path(self, container: str) -> Path:
        return self.root / f"{check_name(container)}.json"

    def log_path(self, container: str) -> Path:
        return self.root / f"{check_name(container)}.log"

    def record(self, container: str) -> dict[str, Any] | None:
        return self._read(self.record_path(container))

    def save_record(self, container: str, data: Mapping[str, Any]) -> None:
        self._write(self.record_path(container), dict(data))

    def drop_record(self, container: str) -> None:
        for path in (self.record_path(container), self.log_path(container)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def records(self) -> dict[str, dict[str, Any]]:
        out = {}
        if self.root.is_dir():
            for path in self.root.glob("*.json"):
                if path.stem in ("dns-cache", "backends") or not _NAME.fullmatch(path.stem):
                    continue
                data = self._read(path)
                if isinstance(data, dict):
                    out[path.stem] = data
        return out

    def dns_cache(self) -> dict[str, Any]:
        data = self._read(self.root / "dns-cache.json")
        return data if isinstance(data, dict) else {}

    def save_dns_cache(self, cache: Mapping[str, Any]) -> None:
        merged = {**self.dns_cache(), **cache}
        self._write(self.root / "dns-cache.json", merged)

    def capability(self, backend: str) -> dict[str, Any] | None:
        data = self._read(self.root / "backends.json") or {}
        entry = data.get(backend)
        if isinstance(entry, dict) and entry.get("kernel") == os.uname().release:
            return entry
        return None  # unknown, or learnt on another kernel: probe again

    def save_capability(self, backend: str, usable: bool, reason: str = "") -> None:
        data = self._read(self.root / "backends.json") or {}
        data[backend] = {"usable": usable, "reason": reason, "kernel": os.uname().release,
                         "at": int(time.time())}
        self._write(self.root / "backends.json", data)


# ---- backends ---------------------------------------------------------------------------------

def _nft_binary() -> str:
    found = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if not found:
        raise BackendUnavailable("nft is not installed (run 'sudo coi setup')")
    return found


# Installed by 'coi setup' (root:root 0755): the one command a coi user may run through
# sudo. It takes one JSON request on stdin and touches only coi's tables (coi.nfthelper).
HELPER = "/usr/local/libexec/coi/coi-nft"


def apply_request(att: Attachment, policy: NetworkPolicy, addresses: Iterable[str] = ()) -> dict[str, Any]:
    """The helper request that puts one container's rules on (the helper generates them)."""
    return {"action": "apply", "container": att.container, "ipv4": att.ipv4, "veth": att.veth,
            "gateway": att.gateway, "subnet": att.subnet, "mode": policy.mode,
            "blocked": list(policy.blocked), "allowed": list(addresses), "log": bool(policy.log_blocked)}


class NftBackend:
    """Host nftables: in-process as root, else the helper through the privileged command
    (``[*privileged_command, HELPER]``, e.g. ``sudo -n /usr/local/libexec/coi/coi-nft``)."""

    name = "nftables"

    def __init__(self, privileged_command: Iterable[str] = (), *, helper: str = HELPER) -> None:
        prefix = tuple(privileged_command)
        if os.geteuid() == 0:
            _nft_binary()
            self.argv: list[str] = []  # root: the helper's code runs in this process
        elif prefix:
            if not os.path.exists(helper):
                raise BackendUnavailable(f"coi's nft helper {helper} is not installed "
                                         "(run 'sudo coi setup --user $USER')")
            self.argv = [*prefix, helper]
        else:
            raise BackendUnavailable(
                "host nftables need root, and [network] privileged_command is not set "
                f"(for example privileged_command = [\"sudo\", \"-n\"] with the sudoers rule for {helper} "
                "that 'sudo coi setup --user NAME' writes)")
        self.via = "" if os.geteuid() == 0 else " via " + " ".join(prefix)

    @property
    def description(self) -> str:
        return f"host nftables (inet + bridge){self.via}"

    def request(self, request: Mapping[str, Any], what: str) -> str:
        """Run one helper request; its output (``list``) or BackendUnavailable."""
        if not self.argv:
            from coi import nfthelper

            try:
                return nfthelper.execute(request)
            except nfthelper.HelperError as exc:
                raise BackendUnavailable(f"{what}: {exc.message}") from None
        try:
            proc = subprocess.run(self.argv, input=json.dumps(request), text=True, capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(f"{what}: {' '.join(self.argv)} failed ({exc})") from None
        if proc.returncode != 0:
            raise BackendUnavailable(f"{what}: {_first_lines(proc.stderr, 2)}")
        return proc.stdout

    def listing(self) -> dict[str, Any]:
        """``{"containers": [...], "gate": bool}``: who has chains in coi's tables, and the gate."""
        try:
            data = json.loads(self.request({"action": "list"}, "listing coi's nft rules") or "{}")
        except ValueError:
            raise BackendUnavailable("listing coi's nft rules: the helper's answer is not JSON") from None
        return data if isinstance(data, dict) else {}

    def containers(self) -> set[str]:
        """Containers that have chains or sets in coi's tables (what ``clean_orphans`` needs)."""
        return {n for n in self.listing().get("containers", []) if isinstance(n, str) and _NAME.fullmatch(n)}

    def monitor_argv(self) -> list[str]:
        """``nft monitor trace`` as root; else the helper, which passes on coi's trace lines only."""
        return [_nft_binary(), "monitor", "trace"] if not self.argv else list(self.argv)

    def monitor_input(self) -> str:
        """What to write to the monitor's stdin (then close it)."""
        return "" if not self.argv else json.dumps({"action": "monitor"})

    def apply(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        self.request(apply_request(att, policy, addresses), f"rules for {att.container}")

    def update_allowed(self, container: str, addresses: list[str]) -> None:
        self.request({"action": "allow", "container": container, "addresses": list(addresses)},
                     f"allowlist of {container}")

    def remove(self, container: str) -> None:
        self.request({"action": "remove", "container": container}, f"removing the rules of {container}")

    def ensure_gate(self) -> None:
        self.request({"action": "gate"}, "loading the bridge gate")

    def open(self, veth: str) -> None:
        """Let ``veth`` past the gate (for containers filtered by Incus ACLs)."""
        self.request({"action": "open", "veth": veth}, f"opening the gate for {veth}")

    def close(self, veth: str) -> None:
        self.request({"action": "close", "veth": veth}, f"closing the gate for {veth}")


def _first_lines(text: str, n: int = 4) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[:n]) or "no output"


class AclBackend:
    """Incus network ACLs on the container's NIC, applied by the daemon."""

    name = "incus-acl"
    description = "Incus network ACLs"

    def __init__(self, client: Any) -> None:
        self.client = client

    def apply(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        egress, ingress, nic_settings = acl_spec(att, policy, addresses, host_addresses=host_ipv4_addresses())
        name = acl_name(att.container)
        description = ACL_DESCRIPTION + att.container
        try:
            self.client.put_network_acl(name, egress=egress, ingress=ingress, description=description)
        except NotFoundError:
            self.client.create_network_acl(name, egress=egress, ingress=ingress, description=description)
        inst = self.client.instance(att.container)
        nic = dict((inst.get("expanded_devices") or {}).get(att.nic) or {})
        nic.update(nic_settings)
        try:
            self.client.update_instance(att.container, devices={att.nic: nic})
        except OperationFailedError as exc:
            self._delete_acl(name)
            raise BackendUnavailable(_acl_reason(exc.message)) from None

    def update_allowed(self, container: str, addresses: list[str], att: Attachment,
                       policy: NetworkPolicy) -> None:
        egress, ingress, _ = acl_spec(att, policy, addresses, host_addresses=host_ipv4_addresses())
        self.client.put_network_acl(acl_name(container), egress=egress, ingress=ingress,
                                    description=ACL_DESCRIPTION + container)

    def remove(self, container: str, nic: str | None = None) -> None:
        """Take the ACL off the NIC and delete it; the NIC itself (its pinned address and
        interface name) and its anti-spoofing stay."""
        name = acl_name(container)
        try:
            inst = self.client.instance(container)
        except NotFoundError:
            inst = None
        if inst is not None:
            for dev, spec in (inst.get("devices") or {}).items():
                if spec.get("type") == "nic" and spec.get("security.acls") == name:
                    kept = {k: v for k, v in spec.items() if not k.startswith("security.acls")}
                    try:
                        self.client.update_instance(container, devices={dev: kept})
                    except NotFoundError:
                        pass
        self._delete_acl(name)

    def _delete_acl(self, name: str) -> None:
        try:
            self.client.delete_network_acl(name)
        except NotFoundError:
            pass

    def orphans(self, existing: set[str]) -> list[str]:
        return [a["name"] for a in self.client.network_acls()
                if str(a.get("description", "")).startswith(ACL_DESCRIPTION) and a["name"] not in existing]


def _acl_reason(message: str) -> str:
    if "Protocol error" in message or "ct state" in message:
        return "Incus cannot apply network ACLs to bridge NICs on this kernel (no bridge-family conntrack)"
    return f"Incus refused network ACLs on the NIC: {_first_lines(message, 1)[:300]}"


# ---- the service: apply, remove, clean, report ----------------------------------------------

def apply(client: Any, container: str, policy: NetworkPolicy, *, sessions_dir: Path, log: Log) -> str:
    """Enforce ``policy`` on a started container before its agent starts; returns the backend used.

    Call it on every start (a restart gives the container a new host interface).
    Raises CoiError when the mode cannot be enforced: the session must not start.
    """
    store = Store(sessions_dir)
    _stop_watcher(store, container)
    if policy.mode == "open":
        remove(container, sessions_dir=sessions_dir, client=client, privileged_command=policy.privileged_command)
        inst = client.instance(container)
        if is_pinned(inst):  # the gate holds only coi's pinned interfaces
            att = find_attachment(client, container)
            _open_gate(att, policy, log)
            store.save_record(container, {"container": container, "backend": OPEN_BACKEND, "mode": "open",
                                          "attachment": asdict(att), "policy": policy.to_json(),
                                          "project": getattr(client, "project", "default"), "watcher": None})
        return "open (no filtering)"
    att = find_attachment(client, container)
    _drop_stale_address(store, att, client=client, log=log, privileged_command=policy.privileged_command)
    addresses: list[str] = []
    resolution = None
    if policy.mode == "allowlist":
        cache = store.dns_cache()
        resolution = resolve_allowed(policy.allowed, server=resolver_for(policy, att), cache=cache)
        if not resolution.addresses:
            raise CoiError("network mode allowlist: none of the allowed names resolved ("
                           + "; ".join(resolution.failed.values()) + ")",
                           f"check [network] allowed_domains and DNS, or {OPEN_HINT}")
        store.save_dns_cache(cache)
        for entry, why in resolution.failed.items():
            log(f"Warning: allowed name {entry} did not resolve ({why}); it stays blocked until it does")
        for entry in resolution.stale:
            log(f"Warning: allowed name {entry} did not resolve now; using its last known addresses")
        addresses = resolution.addresses
    backend, description = _enforce(client, store, att, policy, addresses, log)
    store.save_record(container, {
        "container": container, "backend": backend.name, "mode": policy.mode,
        "attachment": asdict(att), "policy": policy.to_json(), "addresses": addresses,
        "project": getattr(client, "project", "default"), "applied_at": int(time.time()),
        "sessions_dir": str(sessions_dir), "watcher": None,
    })
    try:
        pid = _start_watcher(store, container, sessions_dir=sessions_dir, client=client)
    except OSError as exc:  # the rules hold; only refresh and clean-up after a poweroff are missing
        log(f"Warning: the network watcher of {container} did not start ({exc.strerror or exc}); "
            "allowlist refresh is off and 'coi clean' removes its rules once it is gone")
        return description
    record = store.record(container) or {}
    record["watcher"] = pid
    store.save_record(container, record)
    return description


def _enforce(client: Any, store: Store, att: Attachment, policy: NetworkPolicy, addresses: list[str],
             log: Log) -> tuple[Any, str]:
    """Incus ACLs when this host allows them, else host nftables; fail closed when neither works."""
    reasons = []
    known = store.capability(AclBackend.name)
    if known is None or known.get("usable"):
        acl = AclBackend(client)
        try:
            acl.apply(att, policy, addresses)
            if known is None:
                store.save_capability(AclBackend.name, True)
            _open_gate(att, policy, log)
            return acl, acl.description
        except BackendUnavailable as exc:
            store.save_capability(AclBackend.name, False, str(exc))
            log(f"Network: {exc}; falling back to host nftables")
            reasons.append(str(exc))
    else:
        reasons.append(known.get("reason") or "Incus network ACLs are unavailable here")
    try:
        nft = NftBackend(policy.privileged_command)
        nft.apply(att, policy, addresses)
        return nft, nft.description
    except BackendUnavailable as exc:
        reasons.append(str(exc))
    raise CoiError(f"cannot enforce network mode {policy.mode} on {att.container}: " + "; ".join(reasons),
                   f"set [network] privileged_command (e.g. [\"sudo\", \"-n\"]) or run as root, or {OPEN_HINT}")


# The record's backend of a container opened in the gate without coi's nft rules (open mode).
OPEN_BACKEND = "open"


def _open_gate(att: Attachment, policy: NetworkPolicy, log: Log) -> None:
    """Let a container past the bridge gate whose traffic coi's nft rules do not filter
    (open mode, Incus ACLs); they open it themselves otherwise."""
    if not att.veth.startswith(HOST_NAME_PREFIX):
        return  # not one of coi's pinned interfaces: the gate does not hold it
    try:
        NftBackend(policy.privileged_command).open(att.veth)
    except BackendUnavailable as exc:
        log(f"Warning: could not open the coi bridge gate for {att.container} ({exc}); "
            "where 'coi setup' loaded the gate, the container has no network")


def _drop_stale_address(store: Store, att: Attachment, *, client: Any, log: Log,
                        privileged_command: Sequence[str]) -> None:
    """Rules left for another container that had this address are stale now: remove them."""
    for name, record in store.records().items():
        if name != att.container and (record.get("attachment") or {}).get("ipv4") == att.ipv4:
            log(f"Network: removing stale rules of {name} (its address {att.ipv4} now belongs to {att.container})")
            remove(name, sessions_dir=Path(store.root).parent, client=client, privileged_command=privileged_command)


def remove(container: str, *, sessions_dir: Path, client: Any, privileged_command: Sequence[str] = ()) -> None:
    """Remove a container's rules and its watcher; call when coi stops or deletes it.

    Harmless when there is nothing to remove. ``privileged_command`` comes from the
    caller's trusted config (never from the record).
    """
    store = Store(sessions_dir)
    record = store.record(container) or {}
    _stop_watcher(store, container)
    if record.get("backend") in (AclBackend.name, OPEN_BACKEND):
        if record["backend"] == AclBackend.name:
            AclBackend(client).remove(container)
        veth = (record.get("attachment") or {}).get("veth")
        if veth:
            try:
                NftBackend(privileged_command).close(veth)
            except BackendUnavailable:
                pass  # the gate is not loaded here, or coi may not change it: nothing is open either
    else:
        try:
            NftBackend(privileged_command).remove(container)
        except BackendUnavailable:
            if record.get("backend") == NftBackend.name:
                raise CoiError(f"could not remove the network rules of {container}",
                               "run 'coi clean' as a user who may run nft") from None
    store.drop_record(container)


def clean_orphans(existing: set[str], *, sessions_dir: Path, client: Any = None,
                  privileged_command: Iterable[str] = ()) -> list[str]:
    """Remove rules whose container no longer exists; returns the containers cleaned.

    ``existing``: names of every instance that still exists (any status, every
    project), so no live container ever loses its rules. Rules of other users'
    vanished containers in the shared ``coi`` tables are removed too.
    """
    store = Store(sessions_dir)
    gone: set[str] = set()
    for name, record in store.records().items():
        if name not in existing:
            gone.add(name)
            remove(name, sessions_dir=sessions_dir, client=client, privileged_command=tuple(privileged_command))
    privileged = tuple(privileged_command)
    try:
        nft = NftBackend(privileged)
        for name in sorted(nft.containers() - existing):
            nft.remove(name)
            gone.add(name)
    except BackendUnavailable:
        pass
    if client is not None:
        acl = AclBackend(client)
        try:
            for name in acl.orphans(existing):
                acl.remove(name)
                gone.add(name)
        except CoiError:
            pass
    return sorted(gone)


@dataclass(frozen=True)
class BackendReport:
    """What ``coi doctor`` shows about network isolation."""

    status: str  # "ok", "warn" or "fail"
    backend: str
    detail: str
    hint: str | None = None


def backend_report(config_network: Any = None, *, sessions_dir: Path | None = None) -> BackendReport:
    """Which backend sessions will use here, and why (nothing is changed)."""
    privileged = tuple(getattr(config_network, "privileged_command", ()) or ())
    acl = Store(sessions_dir).capability(AclBackend.name) if sessions_dir else None
    if acl and acl.get("usable"):
        return BackendReport("ok", "Incus network ACLs", "Incus network ACLs on the container's NIC")
    acl_note = (f"Incus network ACLs unavailable ({acl.get('reason')})" if acl
                else "Incus network ACLs are tried at the first session")
    try:
        nft = NftBackend(privileged)
    except BackendUnavailable as exc:
        if acl is None:
            return BackendReport("warn", "unknown", f"{acl_note}; host nftables unavailable: {exc}",
                                 "set [network] privileged_command or run coi as root")
        return BackendReport("fail", "none", f"{acl_note}; host nftables unavailable: {exc}",
                             "set [network] privileged_command (e.g. [\"sudo\", \"-n\"]) or run as root; "
                             "until then only --network=open sessions start")
    try:
        listing = nft.listing()  # read-only; through the helper it proves the sudoers rule works
    except BackendUnavailable as exc:
        return BackendReport("fail", "host nftables", f"{acl_note}; coi's nft helper{nft.via} failed: {exc}",
                             "run 'sudo coi setup --user $USER' (it installs the helper and its sudoers rule)")
    if acl is None and os.geteuid() == 0 and \
            nft_refusal(nft_probe("bridge", "ct state established accept"), [_nft_binary()]) is not None:
        # Incus emits bridge-family conntrack rules for ACLs: without them here, ACLs cannot work.
        acl_note = "Incus network ACLs unavailable (no bridge-family conntrack in this kernel)"
    if not listing.get("gate"):
        return BackendReport("warn", "host nftables",
                             f"{acl_note}; {nft.description}; the bridge gate is not loaded, so a container "
                             "started outside coi (or after a reboot) runs unfiltered",
                             "run 'sudo coi setup' (it loads the gate, before Incus starts on systemd hosts)")
    return BackendReport("ok", "host nftables", f"{acl_note}; {nft.description}; bridge gate loaded")


def nft_probe(family: str, rule: str) -> str:
    """A one-rule ruleset for asking the kernel whether it supports ``rule``."""
    return (f"table {family} coi_doctor_probe {{\n chain c {{\n"
            f"  type filter hook forward priority 0; policy accept;\n  {rule}\n }}\n}}\n")


def nft_refusal(ruleset: str, argv: Sequence[str] = ("nft",)) -> str | None:
    """None when the kernel accepts ``ruleset`` (``nft -c``: checked, never applied), else why not."""
    proc = subprocess.run([*argv, "-c", "-f", "-"], input=ruleset, text=True, capture_output=True)
    return None if proc.returncode == 0 else _first_lines(proc.stderr, 1)


# ---- the watcher process -------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_watcher(pid: int, container: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"coi.netwatch" in argv and container.encode() in argv


def _stop_watcher(store: Store, container: str) -> None:
    record = store.record(container) or {}
    pid = record.get("watcher")
    if not isinstance(pid, int) or pid == os.getpid() or not _is_watcher(pid, container):
        return
    # SIGKILL to its process group (it leads one): immediate, and takes its
    # 'nft monitor' child along. Whatever nft change it had under way is atomic.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except PermissionError:
        return  # another user's watcher: it exits by itself when its record goes
    wait_for(lambda: not _alive(pid), timeout=5, what=f"the network watcher of {container} to stop",
             first_interval=0.001, max_interval=0.05)


# What the watcher inherits from coi's environment: enough to find the daemon and the
# user's own config, nothing that could steer Python (PYTHONPATH and the like).
WATCHER_ENV = ("HOME", "USER", "LOGNAME", "LANG", "XDG_CONFIG_HOME", "INCUS_SOCKET", "INCUS_DIR")


def watcher_argv(container: str, sessions_dir: Path) -> list[str]:
    """Isolated Python (``-I``: no current directory, user site or PYTHON* variables on
    the path), so nothing from a workspace can be imported by it."""
    return [sys.executable, "-I", "-m", "coi.netwatch", container, str(Path(sessions_dir))]


def _start_watcher(store: Store, container: str, *, sessions_dir: Path, client: Any) -> int:
    """Start the watcher detached (own session, no terminal, cwd ``/``); returns its pid."""
    env = {k: os.environ[k] for k in WATCHER_ENV if k in os.environ}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    socket_path = getattr(client, "path", None)
    if socket_path:
        env["INCUS_SOCKET"] = socket_path
    fd = os.open(store.log_path(container), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        proc = subprocess.Popen(watcher_argv(container, sessions_dir), cwd="/", env=env, stdin=subprocess.DEVNULL,
                                stdout=fd, stderr=fd, start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    return proc.pid


def log_file(policy: NetworkPolicy, sessions_dir: Path) -> Path:
    return Path(policy.log_path) if policy.log_path else Path(sessions_dir) / "logs" / "network.log"


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
