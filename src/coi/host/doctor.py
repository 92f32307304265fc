"""``coi doctor``: read-only checks of everything coi needs on this host.

Each check returns a ``Check`` with a fix hint when it fails; nothing here
changes the host. The Incus checks ask the client they are given.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coi.errors import CoiError
from coi.host.daemon import COI_NETWORK, COI_PROFILE, INCUSD
from coi.host.steps import RUN_SETUP
from coi.host.system import SUBID_FILES, root_subid_ok
from coi.statedir import OWN_DIR_HINT, STATE_MODE

if TYPE_CHECKING:
    from coi.config import Config
    from coi.incus import IncusClient

FAST_CLONE_DRIVERS = {"btrfs", "zfs", "lvm", "lvmcluster", "ceph"}
MIN_NODE = 22  # what the agents need (Claude Code declares >= 22)


@dataclass(frozen=True)
class Check:
    """One line of the report; a failed ``blocking`` check makes ``coi doctor`` exit 1."""

    name: str
    status: str  # "ok", "warn", "fail" or "skip"
    detail: str
    hint: str | None = None
    blocking: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "hint": self.hint, "blocking": self.blocking}


def run_checks(client: IncusClient, config: Config) -> list[Check]:
    """Every check, in order; later Incus checks are skipped when the daemon is out of reach."""
    checks: list[Check] = []
    installed = shutil.which("incus") is not None and os.path.exists(INCUSD)
    checks.append(Check("Incus installed", "ok" if installed else "fail",
                        "incus client and daemon present" if installed else "Incus is not installed",
                        None if installed else RUN_SETUP))
    path = client.path
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        checks.append(Check("socket permission", "fail", f"no access to {path}",
                            f"join the '{config.incus.group}' group: sudo usermod -aG {config.incus.group} "
                            "$USER, then log in again"))
    server: dict[str, Any] | None = None
    try:
        server = client.server()
        checks.append(Check("daemon", "ok", f"Incus {server['environment'].get('server_version', '?')} "
                                            f"answers on {path}"))
    except CoiError as exc:
        checks.append(Check("daemon", "fail", exc.message, exc.hint))
    if server is not None:
        for probe in (_storage, _bridge, _profile, _idmap, _image, _autostart, _proxy):
            try:
                checks.append(probe(client, server, config))
            except CoiError as exc:
                checks.append(Check(probe.__name__.strip("_"), "fail", exc.message, exc.hint))
    else:
        checks.append(Check("storage, bridge, profile, image", "skip", "daemon not reachable", blocking=False))
    checks.append(_subids())
    checks.append(check_state_dir(config))
    checks.append(check_isolated_python())
    checks.append(check_nftables())
    checks.append(check_network(config))
    has_tmux = shutil.which("tmux") is not None
    checks.append(Check("tmux", "ok" if has_tmux else "warn",
                        "tmux installed on the host" if has_tmux else "tmux is not installed on the host",
                        None if has_tmux else RUN_SETUP, blocking=False))
    return checks


# ---- the host ------------------------------------------------------------------------

def _proxy(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    """coi's egress proxy (the allowlist by name): installed, and running when a session uses it."""
    import ipaddress

    from coi.network import proxy
    from coi.network.egress import proxy_port

    by_name = config.network.allowlist_by == "name"
    try:
        gateway = str(ipaddress.ip_interface(client.network(COI_NETWORK)["config"]["ipv4.address"]).ip)
    except (KeyError, ValueError):
        return Check("egress proxy", "skip", f"bridge {COI_NETWORK} has no IPv4 address", blocking=False)
    listen = f"{gateway}:{proxy_port(os.getuid())}"
    installed, listening, pid = proxy.status(config.paths.sessions_dir / "network", listen)
    if not installed:
        return Check("egress proxy", "warn" if by_name else "skip",
                     "mitmproxy is not installed (needed for [network] allowlist_by = \"name\")",
                     "sudo ./scripts/install.sh" if by_name else None, blocking=False)
    if listening:
        return Check("egress proxy", "ok", f"running on {listen} (pid {pid})", blocking=False)
    if pid is not None:
        return Check("egress proxy", "warn", f"process {pid} does not listen on {listen}: sessions by name have no "
                     "egress until the next coi command restarts it", blocking=False)
    return Check("egress proxy", "ok", f"installed; starts on {listen} with the first session by name",
                 blocking=False)



def check_nftables() -> Check:
    """nft is there and, as root, the kernel takes the rules coi's isolation writes."""
    # nft lives in /usr/sbin, which a normal user's PATH on Debian does not hold.
    if shutil.which("nft", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) is None:
        return Check("nftables", "warn", "nft is not installed (needed for network isolation)",
                     RUN_SETUP, blocking=False)
    if os.geteuid() != 0:
        return Check("nftables", "ok", "nft installed (kernel features are checked when run as root)",
                     blocking=False)
    from coi.network import nft_probe, nft_refusal

    inet = nft_refusal(nft_probe("inet", "ct state established,related accept\n  ip daddr 10.0.0.0/8 reject")) is None
    bridge_ct = nft_refusal(nft_probe("bridge", "ct state established accept")) is None
    bridge_drop = nft_refusal(nft_probe("bridge", "ip daddr 10.0.0.0/8 drop")) is None
    parts = [f"inet conntrack+reject: {'yes' if inet else 'no'}",
             f"bridge drop: {'yes' if bridge_drop else 'no'}",
             f"bridge conntrack: {'yes' if bridge_ct else 'no'}"]
    detail = ", ".join(parts) + ("" if bridge_ct else " (Incus network ACLs unavailable; host nftables used)")
    if not (inet and bridge_drop):
        return Check("nftables", "warn", detail, "this kernel lacks nftables features coi's isolation needs",
                     blocking=False)
    return Check("nftables", "ok", detail, blocking=False)


def check_network(config: Config) -> Check:
    """Which backend enforces network isolation for this user (nothing is changed)."""
    from coi import network

    report = network.backend_report(config.network, sessions_dir=config.paths.sessions_dir)
    return Check("network isolation", report.status, f"{report.backend}: {report.detail}", report.hint,
                 blocking=False)


def check_state_dir(config: Config) -> Check:
    """coi's state directory: the user's alone (records in it are acted on later)."""
    import stat

    path = Path(config.paths.sessions_dir)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check("state directory", "ok", f"{path} is made (mode 0700) at the first session", blocking=False)
    except OSError as exc:
        return Check("state directory", "fail", f"{path}: {exc.strerror}", "set [paths] sessions_dir")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        return Check("state directory", "fail", f"{path} belongs to uid {st.st_uid}, not to you", OWN_DIR_HINT)
    if mode != STATE_MODE:
        return Check("state directory", "warn", f"{path} has mode {mode:04o}; coi narrows it to 0700 at its "
                     "next use", f"chmod 700 {path}", blocking=False)
    return Check("state directory", "ok", f"{path} is yours alone (0700)", blocking=False)


def check_isolated_python() -> Check:
    """coi runs Python isolated (``-I``): nothing from the current directory or PYTHONPATH loads."""
    import sys

    if sys.flags.isolated:
        return Check("isolated python", "ok", "coi runs with python -I (no PYTHONPATH or current directory)",
                     blocking=False)
    return Check("isolated python", "warn", "coi runs without python -I: PYTHONPATH or the current directory "
                 "could put a project's code in front of coi's", "reinstall: sudo scripts/install.sh", blocking=False)


def _subids() -> Check:
    bad = [str(p) for p in SUBID_FILES if not (p.exists() and root_subid_ok(p.read_text()))]
    if bad:
        return Check("id ranges", "fail", f"root has no subordinate id range in {', '.join(bad)}", RUN_SETUP)
    return Check("id ranges", "ok", "root has subordinate uid/gid ranges")


def node_ok(version: str) -> bool:
    """Whether ``coi.node`` (``v22.3.0`` or ``22.3.0``) is at least ``MIN_NODE``."""
    major = version.lstrip("v").split(".")[0]
    return major.isdigit() and int(major) >= MIN_NODE


# ---- what the daemon holds (each probe: client, server info, config) -----------------------

def _storage(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    pools = {p["name"]: p for p in client.storage_pools()}
    if not pools:
        return Check("storage", "fail", "no storage pool", RUN_SETUP)
    try:
        root = (client.profile(COI_PROFILE).get("devices") or {}).get("root", {})
        pool = pools.get(root.get("pool", ""), next(iter(pools.values())))
    except CoiError:
        pool = next(iter(pools.values()))
    driver = pool["driver"]
    if driver in FAST_CLONE_DRIVERS:
        return Check("storage", "ok", f"pool {pool['name']} ({driver}): fast clones")
    return Check("storage", "warn", f"pool {pool['name']} ({driver}): every container start unpacks the image",
                 "a btrfs or zfs pool makes session start near-instant", blocking=False)


def _bridge(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    net = client.network(COI_NETWORK)
    cfg = net.get("config") or {}
    subnet = cfg.get("ipv4.address", "none")
    if subnet in ("", "none"):
        return Check("bridge", "fail", f"bridge {COI_NETWORK} has no IPv4 subnet",
                     f"incus network set {COI_NETWORK} ipv4.address=<free /24>")
    nat = cfg.get("ipv4.nat", "false") == "true"
    return Check("bridge", "ok" if nat else "warn",
                 f"bridge {COI_NETWORK} {subnet}, NAT {'on' if nat else 'off'}",
                 None if nat else f"incus network set {COI_NETWORK} ipv4.nat=true", blocking=False)


def _profile(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    devices = client.profile(COI_PROFILE).get("devices") or {}
    missing = [d for d in ("root", "eth0") if d not in devices]
    if missing:
        return Check("profile", "fail", f"profile {COI_PROFILE} lacks {', '.join(missing)}", RUN_SETUP)
    return Check("profile", "ok", f"profile {COI_PROFILE}: root on {devices['root'].get('pool')}, "
                                  f"eth0 on {devices['eth0'].get('network')}")


def _idmap(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    features = server.get("environment", {}).get("kernel_features", {})
    if features.get("idmapped_mounts") == "true":
        return Check("idmapped mounts", "ok", "shift=true available for workspace mounts")
    return Check("idmapped mounts", "warn", "no idmapped mounts: workspaces fall back to raw.idmap",
                 "a kernel >= 5.12 with idmapped mount support gives per-mount UID shifting", blocking=False)


def _image(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    alias = config.defaults.image
    if client.image_exists(alias):
        props = client.image_by_alias(alias).get("properties") or {}
        node = props.get("coi.node", "")
        if props.get("coi.kind") == "coi" and not node_ok(node):
            return Check("image", "warn", f"image {alias} has Node.js {node or 'of an older build'}; "
                         f"the agents need {MIN_NODE} or newer", "rebuild it: coi build --force", blocking=False)
        return Check("image", "ok", f"image {alias} present" + (f" (Node.js {node})" if node else ""))
    return Check("image", "warn", f"image {alias} not built yet", "run 'coi build'", blocking=False)


def _autostart(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    """Session containers must not start again on their own after a host reboot."""
    from coi import naming, sessions

    loose = [i["name"] for i in client.instances(recursion=1)
             if sessions.is_coi(i, naming.container_prefix())
             and (i.get("config") or {}).get("boot.autostart") != "false"]
    if loose:
        return Check("autostart", "warn", f"{len(loose)} coi container(s) start again after a host reboot: "
                     + ", ".join(loose[:5]), "incus config set NAME boot.autostart=false (or end the session)",
                     blocking=False)
    return Check("autostart", "ok", "no coi container starts again on its own after a reboot", blocking=False)
