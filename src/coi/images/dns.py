"""The builder's network: wait for its DHCP address and for names to resolve, and repair
an image whose resolver is a loopback stub that does not run (inside the builder only)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from coi.errors import CoiError, OperationFailedError
from coi.images.log import Log
from coi.images.run import capture
from coi.incus.records import ipv4_address
from coi.wait import wait_for

if TYPE_CHECKING:
    from coi.incus import IncusClient

DNS_PROBE = "deb.debian.org"  # a name every builder must resolve (its package mirror)
_NETWORK_TIMEOUT = 90.0
_DNS_TIMEOUT = 20.0


class NetworkNotReady(CoiError):
    """The builder got no address, or names do not resolve in it (and could not be repaired)."""


def resolv_is_stub_only(text: str) -> bool:
    """True when resolv.conf sends every query to a loopback stub (or names no server)."""
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                servers.append(ipaddress.ip_address(words[1].split("%")[0]))
            except ValueError:
                continue
    return all(s.is_loopback for s in servers)  # glibc asks 127.0.0.1 when none is named


def default_gateway(proc_net_route: str, device: str = "eth0") -> str | None:
    """The IPv4 default gateway of ``device`` from ``/proc/net/route`` text."""
    for line in proc_net_route.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[0] == device and cols[1] == "00000000":
            gateway = int(cols[2], 16)
            if gateway:
                return str(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
    return None


def wait_for_network(client: IncusClient, builder: str, *, say: Log) -> bool:
    """DHCP on eth0, then names resolve; True when a dead loopback resolver had to be repaired.

    Raises NetworkNotReady saying what is missing.
    """
    try:
        address = wait_for(lambda: ipv4_address(client.instance_state(builder)),
                           timeout=_NETWORK_TIMEOUT, what=f"an IPv4 address on eth0 of {builder}")
    except CoiError:
        raise NetworkNotReady(f"eth0 got no IPv4 address (DHCP) within {_NETWORK_TIMEOUT:g}s; "
                              "check the coi bridge with 'coi doctor'") from None
    say(f"    eth0: {address}")
    if _resolves(client, builder, timeout=_DNS_TIMEOUT, give_up_on_dead_stub=True):
        return False
    _, resolv = capture(client, builder, ["cat", "/etc/resolv.conf"])
    if not resolv_is_stub_only(resolv):
        raise NetworkNotReady(f"names do not resolve ({DNS_PROBE}) although eth0 has address {address}")
    _, routes = capture(client, builder, ["cat", "/proc/net/route"])
    gateway = default_gateway(routes)
    if gateway is None:
        raise NetworkNotReady("names do not resolve and eth0 has no default gateway")
    say(f"DNS: the image's resolver is a local stub that does not answer; "
        f"pointing /etc/resolv.conf at the bridge's resolver {gateway} (inside the image only)")
    code, _ = capture(client, builder, ["sh", "-c", 'rm -f /etc/resolv.conf && printf "nameserver %s\\n" "$1" '
                                        "> /etc/resolv.conf", "sh", gateway])
    if code != 0 or not _resolves(client, builder, timeout=_DNS_TIMEOUT):
        raise NetworkNotReady(f"names still do not resolve after pointing /etc/resolv.conf at {gateway}")
    say("DNS repaired: names resolve through the bridge's resolver")
    return True


def _resolves(client: IncusClient, builder: str, *, timeout: float, give_up_on_dead_stub: bool = False) -> bool:
    """Poll ``getent hosts``; with ``give_up_on_dead_stub``, stop early when no stub runs."""
    def check() -> str | None:
        try:
            code, _ = capture(client, builder, ["getent", "hosts", DNS_PROBE])
            if code == 0:
                return "ok"
            if give_up_on_dead_stub and _stub_is_dead(client, builder):
                return "dead"
        except OperationFailedError:
            pass  # init still settling ("Failed to retrieve PID..."): ask again
        return None

    try:
        return wait_for(check, timeout=timeout, what=f"{DNS_PROBE} to resolve",
                        first_interval=0.1, max_interval=1.0) == "ok"
    except CoiError:
        return False


def _stub_is_dead(client: IncusClient, builder: str) -> bool:
    """resolv.conf names only a loopback stub and no resolver service is starting or running."""
    _, resolv = capture(client, builder, ["cat", "/etc/resolv.conf"])
    if not resolv_is_stub_only(resolv):
        return False
    code, _ = capture(client, builder, ["sh", "-c", "systemctl is-active --quiet systemd-resolved.service "
                                        "|| systemctl is-active --quiet dnsmasq.service "
                                        "|| systemctl is-active --quiet unbound.service"])
    return code != 0
