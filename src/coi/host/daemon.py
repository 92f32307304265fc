"""The Incus side of ``coi setup``: the daemon answers (through systemd, or started by
coi), and has a storage pool, the coi bridge and the coi profile.

Every step here talks to Incus through the client it is given. A client exists
before the daemon answers: it connects at its first request.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from coi.errors import CoiError, DaemonUnavailableError, NotFoundError
from coi.host.steps import Report, Step, run, systemd_runs
from coi.wait import wait_for

if TYPE_CHECKING:
    from coi.incus import IncusClient

COI_PROFILE = "coi"
COI_NETWORK = "coibr0"
COI_POOL = "coi"
INCUSD = "/usr/libexec/incus/incusd"
DAEMON_LOG = Path("/var/log/incus/incusd.log")
# Where coi looks for a free /24 for its bridge, in this order.
PRIVATE_RANGES = ("10.195.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
# ``ip route`` words that come before the destination.
_ROUTE_TYPES = ("broadcast", "local", "unicast", "multicast", "blackhole", "unreachable", "prohibit", "throw")


# ---- pure helpers (table-tested) -------------------------------------------

def used_networks(route_text: str, addr_text: str) -> list[ipaddress.IPv4Network]:
    """IPv4 networks in use, from ``ip -4 route show table all`` and ``ip -4 -o addr``."""
    nets: list[ipaddress.IPv4Network] = []
    for line in route_text.splitlines():
        words = line.split()
        if words and words[0] in _ROUTE_TYPES:
            words = words[1:]
        if not words or words[0] == "default":
            continue
        try:
            net = ipaddress.ip_network(words[0], strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
            nets.append(net)
    for line in addr_text.splitlines():
        words = line.split()
        if "inet" in words:
            try:
                nets.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
            except (ValueError, IndexError):
                continue
    return nets


def choose_subnet(used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first private /24 (10.195.0.0 upwards) that overlaps nothing in use."""
    taken = [n for n in used if not n.is_loopback]
    for base in PRIVATE_RANGES:
        for candidate in ipaddress.IPv4Network(base).subnets(new_prefix=24):
            if not any(candidate.overlaps(n) for n in taken):
                return candidate
    raise CoiError("no free private IPv4 /24 subnet for the coi bridge",
                   "free one, or create the bridge by hand: incus network create coibr0 ipv4.address=...")


def profile_devices(pool: str, network: str) -> dict[str, dict[str, str]]:
    """The coi profile's devices: the root disk on ``pool``, eth0 on ``network``."""
    return {
        "root": {"type": "disk", "path": "/", "pool": pool},
        "eth0": {"type": "nic", "name": "eth0", "network": network},
    }


# ---- the daemon ----------------------------------------------------------------

def answers(client: IncusClient) -> bool:
    """Whether the daemon answers on the client's socket."""
    try:
        client.server()
    except DaemonUnavailableError:
        return False
    return True


def start_daemon(client: IncusClient, report: Report, *, group: str, restart: bool = False) -> None:
    """Make the daemon answer: through systemd, or by starting incusd ourselves."""
    if answers(client) and not restart:
        report(Step("daemon", False, "Incus daemon is running"))
        return
    if systemd_runs():
        action = "restart" if restart else "start"
        run(["systemctl", "enable", "incus.socket", "incus.service"], capture_output=True)
        proc = run(["systemctl", action, "incus.service"], capture_output=True)
        if proc.returncode != 0:
            raise DaemonUnavailableError(f"systemctl {action} incus failed: {proc.stderr.strip()}",
                                         "see 'journalctl -u incus'")
        how = f"{action}ed incus.service"
    else:
        if restart:
            _stop_own_daemon(client)
        DAEMON_LOG.parent.mkdir(parents=True, exist_ok=True)
        log = DAEMON_LOG.open("ab")
        subprocess.Popen([INCUSD, "--group", group, "--logfile", str(DAEMON_LOG)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                         close_fds=True)
        how = f"started incusd (no systemd here; log: {DAEMON_LOG})"
    wait_for(lambda: answers(client), timeout=60, what="the Incus daemon to answer",
             hint=f"see {DAEMON_LOG}")
    report(Step("daemon", True, how))


def _stop_own_daemon(client: IncusClient) -> None:
    proc = run(["pgrep", "-x", "incusd"], capture_output=True)
    for pid in (int(p) for p in proc.stdout.split()):
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    wait_for(lambda: not answers(client), timeout=60, what="the Incus daemon to stop")


# ---- what the daemon holds for coi -------------------------------------------------

def ensure_storage_pool(client: IncusClient, report: Report) -> str:
    """An existing pool is kept; otherwise a loop-backed btrfs pool, or dir."""
    pools = client.storage_pools()
    if pools:
        chosen = next((p for p in pools if p["name"] == COI_POOL), None) or \
            next((p for p in pools if p["name"] == "default"), None) or pools[0]
        report(Step("storage", False, f"using storage pool {chosen['name']} ({chosen['driver']})"))
        return chosen["name"]
    try:
        client.create_storage_pool(COI_POOL, "btrfs", {"size": "30GiB"})
        report(Step("storage", True, f"created storage pool {COI_POOL} (btrfs, loop-backed: fast clones)"))
    except CoiError as exc:
        client.create_storage_pool(COI_POOL, "dir", {})
        report(Step("storage", True, f"created storage pool {COI_POOL} (dir; btrfs failed: {exc.message})"))
    return COI_POOL


def ensure_network(client: IncusClient, report: Report, *, ipv6: bool) -> str:
    """The coi bridge, on a private /24 that nothing on the host uses, NAT on."""
    try:
        net = client.network(COI_NETWORK)
        report(Step("network", False,
                    f"bridge {COI_NETWORK} exists ({net['config'].get('ipv4.address', 'no IPv4')})"))
        return COI_NETWORK
    except NotFoundError:
        pass
    routes = run(["ip", "-4", "route", "show", "table", "all"], capture_output=True).stdout
    addrs = run(["ip", "-4", "-o", "addr", "show"], capture_output=True).stdout
    subnet = choose_subnet(used_networks(routes, addrs))
    gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    client.create_network(COI_NETWORK, {
        "ipv4.address": gateway, "ipv4.nat": "true",
        "ipv6.address": "auto" if ipv6 else "none",
    }, description="coi containers")
    report(Step("network", True, f"created bridge {COI_NETWORK} with {gateway}, NAT on, IPv6 "
                + ("on" if ipv6 else "off")))
    return COI_NETWORK


def ensure_profile(client: IncusClient, report: Report, *, pool: str, network: str) -> None:
    """The coi profile: the root disk on ``pool`` and eth0 on ``network``; other keys kept."""
    devices = profile_devices(pool, network)
    try:
        current = client.profile(COI_PROFILE)
    except NotFoundError:
        client.create_profile(COI_PROFILE, config={}, devices=devices,
                              description="coi containers: root disk and the coi bridge")
        report(Step("profile", True, f"created profile {COI_PROFILE} (pool {pool}, bridge {network})"))
        return
    if current.get("devices") == devices:
        report(Step("profile", False, f"profile {COI_PROFILE} is up to date"))
        return
    client.update_profile(COI_PROFILE, config=current.get("config") or {}, devices=devices,
                          description=current.get("description") or "")
    report(Step("profile", True, f"updated profile {COI_PROFILE} (pool {pool}, bridge {network})"))
