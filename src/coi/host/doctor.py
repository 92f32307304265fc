"""``coi doctor``: checks of everything coi needs on this host, and ``--fix``.

Each check returns a ``Check``: ``ok``, ``warning``, ``error`` or ``skip``, with what to
do when it is not ok. The checks change nothing; the Incus ones ask the client they
are given. ``diagnose(fix=True)`` then runs, for each check that names one, a repair
built from ``coi setup``'s own steps (``REPAIRS``), and checks again: a repair whose
check still fails is reported as failed. Repairs that need root are not tried as a
normal user: they are reported with the ``sudo`` command that does them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from coi.errors import CoiError, DaemonUnavailableError, NotFoundError
from coi.host.daemon import (COI_NETWORK, COI_POOL, COI_PROFILE, INCUSD, ensure_network, ensure_profile,
                             ensure_storage_pool, start_daemon)
from coi.host.steps import RUN_SETUP, Report, Step
from coi.host.system import SUBID_FILES, ensure_address_lock, root_subid_ok
from coi.statedir import OWN_DIR_HINT, STATE_MODE

if TYPE_CHECKING:
    from coi.config import Config
    from coi.incus import IncusClient

FAST_CLONE_DRIVERS = {"btrfs", "zfs", "lvm", "lvmcluster", "ceph"}
MIN_NODE = 22  # what the agents need (Claude Code declares >= 22)
STATUSES = ("ok", "warning", "error")  # a report's status: its worst check's ("skip" counts as ok)
AS_ROOT = "run 'sudo coi doctor --fix' (or 'sudo coi setup')"


@dataclass(frozen=True)
class Check:
    """One line of the report. ``repair`` names the entry of ``REPAIRS`` that
    ``coi doctor --fix`` runs when the check is not ok."""

    name: str
    status: str  # "ok", "warning", "error" or "skip"
    message: str
    fix: str | None = None  # what the user can do about it
    repair: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Fix:
    """What ``coi doctor --fix`` did about the checks that share one repair."""

    action: str  # the repair's words: "start the Incus daemon"
    checks: tuple[str, ...]
    status: str  # "fixed", "failed" or "needs_root"
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "checks": list(self.checks), "status": self.status, "message": self.message}


@dataclass(frozen=True)
class Health:
    """The report: every check (after the fixes, when there were any) and the fixes."""

    checks: list[Check]
    fixes: list[Fix] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The worst status of the checks: ``ok``, ``warning`` or ``error``."""
        return max((c.status for c in self.checks if c.status in STATUSES), key=STATUSES.index, default="ok")

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "checks": [c.to_json() for c in self.checks],
                "fixes": [f.to_json() for f in self.fixes]}


# ---- the repairs -------------------------------------------------------------------------

@dataclass(frozen=True)
class Repair:
    """One thing ``coi doctor --fix`` may do: ``coi setup``'s own steps, reported as steps."""

    action: str
    run: Callable[[IncusClient, Config, Report], None]
    root: bool = False  # refused, with AS_ROOT, to a normal user


def _start_daemon(client: IncusClient, config: Config, report: Report) -> None:
    start_daemon(client, report, group=config.incus.group)


def _incus_objects(client: IncusClient, config: Config, report: Report) -> None:
    """coi's storage pool, bridge and profile where one is missing; the profile's root
    disk stays on the pool it names when that pool exists."""
    pools = {p["name"] for p in client.storage_pools()}
    try:
        named = ((client.profile(COI_PROFILE).get("devices") or {}).get("root") or {}).get("pool")
    except NotFoundError:
        named = None
    pool = named if named in pools else ensure_storage_pool(client, report)
    network = ensure_network(client, report, ipv6=False)
    ensure_profile(client, report, pool=pool, network=network)


def _address_lock(client: IncusClient, config: Config, report: Report) -> None:
    ensure_address_lock(config.incus.group, report)


def _network_rules(client: IncusClient, config: Config, report: Report) -> None:
    """What ``coi clean`` does about rules of containers that no longer exist."""
    from coi import network

    removed = network.clean_orphans(_existing(client), sessions_dir=config.paths.sessions_dir, client=client,
                                    privileged_command=config.network.privileged_command)
    report(Step("network rules", bool(removed), "removed the rules of " + ", ".join(removed) if removed
                else "no rules of vanished containers"))


def _state_dir(client: IncusClient, config: Config, report: Report) -> None:
    from coi.statedir import check_state_dir as narrow

    narrow(config.paths.sessions_dir)
    report(Step("state directory", True, f"{config.paths.sessions_dir} is yours alone again (0700)"))


def _autostart_off(client: IncusClient, config: Config, report: Report) -> None:
    for name in _autostarting(client):
        client.update_instance(name, config={"boot.autostart": "false"})
        report(Step("autostart", True, f"{name} no longer starts on its own after a reboot"))


# In the order they run: the daemon first, since the Incus checks need it.
REPAIRS: Mapping[str, Repair] = {
    "daemon": Repair("start the Incus daemon", _start_daemon, root=True),
    "incus": Repair("create coi's storage pool, bridge and profile", _incus_objects),
    "address lock": Repair("make the address lock that coi users share", _address_lock, root=True),
    "network rules": Repair("remove the network rules of containers that no longer exist", _network_rules),
    "state directory": Repair("narrow the state directory to 0700", _state_dir),
    "autostart": Repair("keep coi containers from starting on their own after a reboot", _autostart_off),
}


def diagnose(client: IncusClient, config: Config, *, fix: bool = False, root: bool | None = None,
             repairs: Mapping[str, Repair] = REPAIRS) -> Health:
    """Every check; with ``fix``, the repairs they name (each at most once, until none is
    left: a started daemon lets the Incus checks name theirs), then every check again."""
    checks = run_checks(client, config)
    if not fix:
        return Health(checks)
    root = os.geteuid() == 0 if root is None else root
    fixes: dict[str, Fix] = {}
    while pending := _pending(checks, repairs, done=fixes):
        for key, names in pending.items():
            fixes[key] = _attempt(repairs[key], names, client, config, root=root)
        if all(fixes[key].status == "needs_root" for key in pending):
            break  # nothing was tried: nothing to check again
        checks = run_checks(client, config)
    return Health(checks, [_confirmed(key, f, checks) for key, f in fixes.items()])


def _pending(checks: list[Check], repairs: Mapping[str, Repair], *,
             done: Mapping[str, Fix]) -> dict[str, tuple[str, ...]]:
    """Repair -> the checks it is for, in the order of ``repairs``, leaving out those tried."""
    wanted: dict[str, tuple[str, ...]] = {}
    for c in checks:
        if c.repair and c.status in ("warning", "error") and c.repair not in done:
            wanted[c.repair] = (*wanted.get(c.repair, ()), c.name)
    return {key: wanted[key] for key in repairs if key in wanted}


def _attempt(repair: Repair, names: tuple[str, ...], client: IncusClient, config: Config, *, root: bool) -> Fix:
    """Run one repair; a failure is reported, not raised (the next repair still runs)."""
    if repair.root and not root:
        return Fix(repair.action, names, "needs_root", f"needs root: {AS_ROOT}")
    steps: list[Step] = []
    try:
        repair.run(client, config, steps.append)
    except CoiError as exc:
        return Fix(repair.action, names, "failed", exc.message + (f" ({exc.hint})" if exc.hint else ""))
    except OSError as exc:
        return Fix(repair.action, names, "failed", f"{exc.filename or 'host'}: {exc.strerror or exc}")
    done = [s.detail for s in steps if s.changed] or [s.detail for s in steps]
    return Fix(repair.action, names, "fixed", "; ".join(done) or repair.action)


def _confirmed(key: str, fix: Fix, checks: list[Check]) -> Fix:
    """A repair is fixed only when its checks pass afterwards."""
    left = [c for c in checks if c.repair == key and c.status in ("warning", "error")]
    if fix.status != "fixed" or not left:
        return fix
    return Fix(fix.action, fix.checks, "failed", f"{fix.message}; still: {left[0].name}: {left[0].message}")


# ---- the checks ----------------------------------------------------------------------------

def run_checks(client: IncusClient, config: Config) -> list[Check]:
    """Every check, in order; later Incus checks are skipped when the daemon is out of reach."""
    from coi.incus import DEFAULT_SOCKET

    checks: list[Check] = []
    installed = incus_installed()
    checks.append(Check("Incus installed", "ok" if installed else "error",
                        "incus client and daemon present" if installed else "Incus is not installed",
                        None if installed else RUN_SETUP))
    path = client.path
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        checks.append(Check("socket permission", "error", f"no access to {path}",
                            f"join the '{config.incus.group}' group: sudo usermod -aG {config.incus.group} "
                            "$USER, then log in again"))
    server: dict[str, Any] | None = None
    try:
        server = client.server()
        checks.append(Check("daemon", "ok", f"Incus {server['environment'].get('server_version', '?')} "
                                            f"answers on {path}"))
    except CoiError as exc:
        # Started only where it listens: on the daemon's own socket, not on INCUS_SOCKET's.
        startable = isinstance(exc, DaemonUnavailableError) and installed and path == DEFAULT_SOCKET
        checks.append(Check("daemon", "error", exc.message, exc.hint, "daemon" if startable else None))
    if server is not None:
        for name, probe in _PROBES:
            try:
                checks.append(probe(client, server, config))
            except CoiError as exc:
                checks.append(Check(name, "error", exc.message, exc.hint))
    else:
        checks.append(Check("storage, bridge, profile, image", "skip", "daemon not reachable"))
    checks.append(_subids())
    checks.append(check_state_dir(config))
    checks.append(check_address_lock(config))
    checks.append(check_isolated_python())
    checks.append(check_nftables())
    checks.append(check_network(config))
    has_tmux = shutil.which("tmux") is not None
    checks.append(Check("tmux", "ok" if has_tmux else "warning",
                        "tmux installed on the host" if has_tmux else "tmux is not installed on the host",
                        None if has_tmux else RUN_SETUP))
    return checks


# ---- the host ------------------------------------------------------------------------

def incus_installed() -> bool:
    return shutil.which("incus") is not None and os.path.exists(INCUSD)


def _proxy(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    """coi's egress proxy (the allowlist by name): installed, and running when a session uses it."""
    import ipaddress

    from coi.network import proxy
    from coi.network.egress import proxy_port

    by_name = config.network.allowlist_by == "name"
    try:
        gateway = str(ipaddress.ip_interface(client.network(COI_NETWORK)["config"]["ipv4.address"]).ip)
    except (KeyError, ValueError, NotFoundError):
        return Check("egress proxy", "skip", f"bridge {COI_NETWORK} has no IPv4 address")
    listen = f"{gateway}:{proxy_port(os.getuid())}"
    installed, listening, pid = proxy.status(config.paths.sessions_dir / "network", listen)
    if not installed:
        return Check("egress proxy", "warning" if by_name else "skip",
                     "mitmproxy is not installed (needed for [network] allowlist_by = \"name\")",
                     "sudo ./scripts/install.sh" if by_name else None)
    if listening:
        return Check("egress proxy", "ok", f"running on {listen} (pid {pid})")
    if pid is not None:
        return Check("egress proxy", "warning", f"process {pid} does not listen on {listen}: sessions by name have "
                     "no egress until the next coi command restarts it", "run 'coi list'")
    return Check("egress proxy", "ok", f"installed; starts on {listen} with the first session by name")


def check_nftables() -> Check:
    """nft is there and, as root, the kernel takes the rules coi's isolation writes."""
    # nft lives in /usr/sbin, which a normal user's PATH on Debian does not hold.
    if shutil.which("nft", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) is None:
        return Check("nftables", "warning", "nft is not installed (needed for network isolation)", RUN_SETUP)
    if os.geteuid() != 0:
        return Check("nftables", "ok", "nft installed (kernel features are checked when run as root)")
    from coi.network import nft_probe, nft_refusal

    inet = nft_refusal(nft_probe("inet", "ct state established,related accept\n  ip daddr 10.0.0.0/8 reject")) is None
    bridge_ct = nft_refusal(nft_probe("bridge", "ct state established accept")) is None
    bridge_drop = nft_refusal(nft_probe("bridge", "ip daddr 10.0.0.0/8 drop")) is None
    parts = [f"inet conntrack+reject: {'yes' if inet else 'no'}",
             f"bridge drop: {'yes' if bridge_drop else 'no'}",
             f"bridge conntrack: {'yes' if bridge_ct else 'no'}"]
    detail = ", ".join(parts) + ("" if bridge_ct else " (Incus network ACLs unavailable; host nftables used)")
    if not (inet and bridge_drop):
        return Check("nftables", "warning", detail, "this kernel lacks nftables features coi's isolation needs")
    return Check("nftables", "ok", detail)


# What the network service's report says (BackendReport.status), in the doctor's words.
_BACKEND_STATUS = {"ok": "ok", "warn": "warning", "fail": "error"}


def check_network(config: Config) -> Check:
    """Which backend enforces network isolation for this user (nothing is changed). With
    none, sessions in the default (restricted) mode cannot start: an error."""
    from coi import network

    report = network.backend_report(config.network, sessions_dir=config.paths.sessions_dir)
    return Check("network isolation", _BACKEND_STATUS.get(report.status, report.status),
                 f"{report.backend}: {report.detail}", report.hint)


def check_state_dir(config: Config) -> Check:
    """coi's state directory: the user's alone (records in it are acted on later)."""
    import stat

    path = Path(config.paths.sessions_dir)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check("state directory", "ok", f"{path} is made (mode 0700) at the first session")
    except OSError as exc:
        return Check("state directory", "error", f"{path}: {exc.strerror}", "set [paths] sessions_dir")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        return Check("state directory", "error", f"{path} belongs to uid {st.st_uid}, not to you", OWN_DIR_HINT)
    if mode != STATE_MODE:
        return Check("state directory", "warning", f"{path} has mode {mode:04o}; coi narrows it to 0700 at its "
                     "next use", f"chmod 700 {path}", "state directory")
    return Check("state directory", "ok", f"{path} is yours alone (0700)")


def check_address_lock(config: Config, *, path: Path | None = None) -> Check:
    """The lock under which every coi user picks a new container's address (``coi setup``
    makes it): without it each user locks alone, and two users' sessions starting at
    the same moment can be given the same address."""
    import grp
    import stat

    from coi.network import ADDRESS_LOCK

    path = path or ADDRESS_LOCK
    group = config.incus.group
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return Check("address lock", "warning", f"group {group} does not exist", RUN_SETUP)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Check("address lock", "warning", f"{path} is missing: two users' sessions starting at once can be "
                     "given the same address", AS_ROOT, "address lock")
    if not stat.S_ISREG(st.st_mode) or st.st_gid != gid or stat.S_IMODE(st.st_mode) != 0o660:
        return Check("address lock", "warning", f"{path} is not a file of group {group} with mode 0660 (users "
                     "who cannot open it lock alone)", AS_ROOT, "address lock")
    return Check("address lock", "ok", f"{path} is shared by group {group}")


def check_isolated_python() -> Check:
    """coi runs Python isolated (``-I``): nothing from the current directory or PYTHONPATH loads."""
    import sys

    if sys.flags.isolated:
        return Check("isolated python", "ok", "coi runs with python -I (no PYTHONPATH or current directory)")
    return Check("isolated python", "warning", "coi runs without python -I: PYTHONPATH or the current directory "
                 "could put a project's code in front of coi's", "reinstall: sudo scripts/install.sh")


def _subids() -> Check:
    bad = [str(p) for p in SUBID_FILES if not (p.exists() and root_subid_ok(p.read_text()))]
    if bad:
        return Check("id ranges", "error", f"root has no subordinate id range in {', '.join(bad)}", RUN_SETUP)
    return Check("id ranges", "ok", "root has subordinate uid/gid ranges")


def node_ok(version: str) -> bool:
    """Whether ``coi.node`` (``v22.3.0`` or ``22.3.0``) is at least ``MIN_NODE``."""
    major = version.lstrip("v").split(".")[0]
    return major.isdigit() and int(major) >= MIN_NODE


# ---- what the daemon holds (each probe: client, server info, config) -----------------------

def _storage(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    pools = {p["name"]: p for p in client.storage_pools()}
    if not pools:
        return Check("storage", "error", "no storage pool", RUN_SETUP, "incus")
    try:
        root = (client.profile(COI_PROFILE).get("devices") or {}).get("root", {})
        pool = pools.get(root.get("pool", ""), next(iter(pools.values())))
    except CoiError:
        pool = next(iter(pools.values()))
    driver = pool["driver"]
    if driver in FAST_CLONE_DRIVERS:
        return Check("storage", "ok", f"pool {pool['name']} ({driver}): fast clones")
    # --fix leaves storage alone: a new pool changes where new containers live.
    new = COI_POOL if COI_POOL not in pools else f"{COI_POOL}-btrfs"
    return Check("storage", "warning", f"pool {pool['name']} ({driver}): every launch unpacks the image again",
                 f"a btrfs pool makes launches clone it: incus storage create {new} btrfs size=30GiB, then "
                 f"incus profile device set {COI_PROFILE} root pool={new} (with no coi container left on "
                 f"{pool['name']})")


def _bridge(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    try:
        net = client.network(COI_NETWORK)
    except NotFoundError:
        return Check("bridge", "error", f"bridge {COI_NETWORK} does not exist", RUN_SETUP, "incus")
    cfg = net.get("config") or {}
    subnet = cfg.get("ipv4.address", "none")
    if subnet in ("", "none"):
        return Check("bridge", "error", f"bridge {COI_NETWORK} has no IPv4 subnet",
                     f"incus network set {COI_NETWORK} ipv4.address=<free /24>")
    nat = cfg.get("ipv4.nat", "false") == "true"
    return Check("bridge", "ok" if nat else "warning",
                 f"bridge {COI_NETWORK} {subnet}, NAT {'on' if nat else 'off'}",
                 None if nat else f"incus network set {COI_NETWORK} ipv4.nat=true")


def _profile(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    try:
        devices = client.profile(COI_PROFILE).get("devices") or {}
    except NotFoundError:
        return Check("profile", "error", f"profile {COI_PROFILE} does not exist", RUN_SETUP, "incus")
    missing = [d for d in ("root", "eth0") if d not in devices]
    if missing:
        return Check("profile", "error", f"profile {COI_PROFILE} lacks {', '.join(missing)}", RUN_SETUP, "incus")
    return Check("profile", "ok", f"profile {COI_PROFILE}: root on {devices['root'].get('pool')}, "
                                  f"eth0 on {devices['eth0'].get('network')}")


def _idmap(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    features = server.get("environment", {}).get("kernel_features", {})
    if features.get("idmapped_mounts") == "true":
        return Check("idmapped mounts", "ok", "shift=true available for workspace mounts")
    return Check("idmapped mounts", "warning", "no idmapped mounts: workspaces fall back to raw.idmap",
                 "a kernel >= 5.12 with idmapped mount support gives per-mount UID shifting")


def _image(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    alias = config.defaults.image
    if client.image_exists(alias):
        props = client.image_by_alias(alias).get("properties") or {}
        node = props.get("coi.node", "")
        if props.get("coi.kind") == "coi" and not node_ok(node):
            return Check("image", "warning", f"image {alias} has Node.js {node or 'of an older build'}; "
                         f"the agents need {MIN_NODE} or newer", "rebuild it: coi build --force")
        return Check("image", "ok", f"image {alias} present" + (f" (Node.js {node})" if node else ""))
    return Check("image", "warning", f"image {alias} not built yet", "run 'coi build'")


def _autostarting(client: IncusClient) -> list[str]:
    from coi import naming, sessions

    return [i["name"] for i in client.instances(recursion=1)
            if sessions.is_coi(i, naming.container_prefix())
            and (i.get("config") or {}).get("boot.autostart") != "false"]


def _autostart_check(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    """Session containers must not start again on their own after a host reboot."""
    loose = _autostarting(client)
    if loose:
        return Check("autostart", "warning", f"{len(loose)} coi container(s) start again after a host reboot: "
                     + ", ".join(loose[:5]), "incus config set NAME boot.autostart=false (or end the session)",
                     "autostart")
    return Check("autostart", "ok", "no coi container starts again on its own after a reboot")


def _existing(client: IncusClient) -> set[str]:
    """Every instance that exists, in every project: none of them ever loses its rules."""
    return {i["name"] for i in client.instances(recursion=1, all_projects=True)}


def orphaned_rules(client: IncusClient, config: Config) -> list[str]:
    """Containers that no longer exist but still have network rules (what ``coi clean`` removes)."""
    from coi import network

    return network.orphans(_existing(client), sessions_dir=config.paths.sessions_dir, client=client,
                           privileged_command=config.network.privileged_command)


def _rules(client: IncusClient, server: dict[str, Any], config: Config) -> Check:
    if check_state_dir(config).status == "error":
        return Check("network rules", "skip", "the state directory is not usable (see above)")
    gone = orphaned_rules(client, config)
    if gone:
        return Check("network rules", "warning", f"rules of {len(gone)} container(s) that no longer exist: "
                     + ", ".join(gone[:5]), "run 'coi clean'", "network rules")
    return Check("network rules", "ok", "no rules of containers that no longer exist")


# The Incus checks, in the report's order; a probe that raises is one failed check of its name.
_PROBES: tuple[tuple[str, Callable[[IncusClient, dict[str, Any], Config], Check]], ...] = (
    ("storage", _storage), ("bridge", _bridge), ("profile", _profile), ("idmapped mounts", _idmap),
    ("image", _image), ("autostart", _autostart_check), ("egress proxy", _proxy), ("network rules", _rules),
)
