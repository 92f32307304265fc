"""Where a container is attached: its NIC, bridge, host-side interface and IPv4 address.

A session container gets its IPv4 address and its host-side interface name
when it is created (``pin_nic``: an override of the profile's NIC), and LXC
configures the address and default route inside before init runs. Its rules
can then go on before it starts, and its network works from its first moment:
no wait for DHCP, and no moment of running unfiltered. Incus's dnsmasq leases
the same address to the container's DHCP client later. Incus refuses an
address another NIC has, but two creations at once can both pass that check,
so the choice and the creation happen under ``address_lock``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from coi.errors import CoiError, TimedOutError
from coi.incus.records import ipv4_address
from coi.network.policy import OPEN_HINT
from coi.wait import wait_for

if TYPE_CHECKING:
    from coi.incus import IncusClient

DHCP_TIMEOUT = 30.0
# Made by `coi setup` (group incus-admin), so every coi user on the host shares it.
ADDRESS_LOCK = Path("/var/lib/coi/addresses.lock")
HOST_NAME_PREFIX = "coi"  # + 12 hex digits: 15 characters, the longest interface name
NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,62}")  # container names that may carry rules


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
    if not NAME.fullmatch(container) or container.endswith("-"):
        raise CoiError(f"container name {container!r} cannot carry network rules")
    return container


def find_attachment(client: IncusClient, container: str, *, timeout: float = DHCP_TIMEOUT) -> Attachment:
    """The bridge, host-side interface and IPv4 of a container.

    A container with a pinned NIC (``pin_nic``) has them in its config,
    running or not. Otherwise it must be running, and this waits (with a
    deadline) for DHCP to give it an address.
    """
    check_name(container)
    inst = client.instance(container)
    nic, bridge = bridged_nic(inst)
    net_cfg = client.network(bridge).get("config") or {}
    gateway_cidr = net_cfg.get("ipv4.address", "")
    try:
        gateway_if = ipaddress.IPv4Interface(gateway_cidr)
    except ValueError:
        raise CoiError(f"bridge {bridge} has no IPv4 subnet ({gateway_cidr or 'none'})",
                       "coi setup creates the bridge coibr0 with one") from None
    veth, ipv4 = pinned(inst, nic) or _leased(client, container, inst, nic, timeout)
    return Attachment(container=container, nic=nic, bridge=bridge, veth=veth, ipv4=ipv4,
                      gateway=str(gateway_if.ip), subnet=str(gateway_if.network))


def _leased(client: IncusClient, container: str, inst: Mapping[str, Any], nic: str,
            timeout: float) -> tuple[str, str]:
    """(host-side interface, IPv4) of a running container once DHCP gave it an address."""
    def addressed() -> tuple[str, str] | None:
        state = client.instance_state(container)
        if state.get("status") not in ("Running", None):
            raise CoiError(f"container {container} is not running ({state.get('status')})")
        data = (state.get("network") or {}).get(nic) or {}
        veth = data.get("host_name") or (inst.get("config") or {}).get(f"volatile.{nic}.host_name", "")
        ipv4 = ipv4_address(state, nic)
        return (veth, str(ipaddress.IPv4Address(ipv4))) if veth and ipv4 else None

    try:
        return wait_for(addressed, timeout=timeout, what=f"{container} to get an IPv4 address",
                        first_interval=0.02)
    except TimedOutError:
        raise CoiError(f"cannot isolate {container}: its {nic} got no IPv4 address within {timeout:g}s",
                       f"check the image's DHCP client, or {OPEN_HINT}") from None


def bridged_nic(inst: Mapping[str, Any]) -> tuple[str, str]:
    """(NIC, bridge) of the container's NIC to filter: eth0 first, else the first by name."""
    devices = inst.get("expanded_devices") or inst.get("devices") or {}
    nics = {name: d for name, d in devices.items() if d.get("type") == "nic"}
    for name in sorted(nics, key=lambda n: (n != "eth0", n)):
        bridge = nics[name].get("network") or nics[name].get("parent")
        if bridge:
            return name, bridge
    raise CoiError(f"container {inst.get('name')} has no NIC on a bridge to isolate",
                   f"the coi profile gives containers eth0 on coibr0; or {OPEN_HINT}")


def pinned(inst: Mapping[str, Any], nic: str) -> tuple[str, str] | None:
    """(host-side interface, IPv4) when the NIC's config fixes both."""
    device = (inst.get("expanded_devices") or {}).get(nic) or {}
    if device.get("host_name") and device.get("ipv4.address"):
        return device["host_name"], str(ipaddress.IPv4Address(device["ipv4.address"]))
    return None


def is_pinned(inst: Mapping[str, Any]) -> bool:
    """Whether the container's rules can be keyed before it starts (see ``pin_nic``)."""
    try:
        return pinned(inst, bridged_nic(inst)[0]) is not None
    except CoiError:
        return False


# ---- pinned addresses -----------------------------------------------------------------

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


def pin_nic(client: IncusClient, instances: Iterable[Mapping[str, Any]], *, profile: str = "coi",
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
    address = choose_address(subnet, used_addresses(client, bridge, instances), rand=rand)
    net, gateway = subnet.network, subnet.ip
    return Pin(
        devices={name: {**nic, "ipv4.address": address, "host_name": HOST_NAME_PREFIX + rand(6).hex()}},
        config={"raw.lxc": f"lxc.net.0.ipv4.address = {address}/{net.prefixlen} {net.broadcast_address}\n"
                           f"lxc.net.0.ipv4.gateway = {gateway}\n"},
        files={"/etc/resolv.conf": f"nameserver {gateway}\n".encode()})


def used_addresses(client: IncusClient, bridge: str, instances: Iterable[Mapping[str, Any]]) -> set[str]:
    """The bridge's leases and the addresses other containers' NICs on it are pinned to."""
    used = {lease.get("address", "") for lease in client.network_leases(bridge)}
    for inst in instances:
        for device in (inst.get("expanded_devices") or {}).values():
            if device.get("type") == "nic" and device.get("network") == bridge:
                used.add(device.get("ipv4.address", ""))
    return used


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
