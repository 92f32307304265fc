"""Host set-up: install Incus and what coi needs beside it, start the daemon,
and give Incus a storage pool, a bridge and a profile for coi containers.

Every step checks first and changes only what is missing, so ``coi setup``
is safe to run again. Steps report what they did as ``Step`` results; the
CLI prints them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from coi.errors import CoiError, DaemonUnavailableError, NotFoundError
from coi.incus import Incus
from coi.wait import wait_for

COI_PROFILE = "coi"
COI_NETWORK = "coibr0"
COI_POOL = "coi"
INCUSD = "/usr/libexec/incus/incusd"
DAEMON_LOG = Path("/var/log/incus/incusd.log")
BACKPORTS_SOURCES = Path("/etc/apt/sources.list.d/coi-bookworm-backports.sources")
# Unprivileged containers need root to own a large id range; this is the
# range Debian's incus package itself adds.
SUBID_START, SUBID_COUNT, SUBID_MINIMUM = 1000000, 1000000000, 65536


@dataclass(frozen=True)
class Step:
    """One set-up step: what it is about and what happened."""

    name: str
    changed: bool
    detail: str


Report = Callable[[Step], None]


# ---- pure helpers (table-tested) -------------------------------------------

def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[key.strip()] = value
    return out


def incus_install_plan(os_release: Mapping[str, str]) -> tuple[str, list[str]]:
    """(how, apt-get install arguments) for the distribution, or a CoiError."""
    distro, version = os_release.get("ID", ""), os_release.get("VERSION_ID", "")
    if distro == "debian" and version == "12":
        return "backports", ["-t", "bookworm-backports", "--no-install-recommends",
                             "incus-base", "incus-client", "dnsmasq-base"]
    if (distro, version) in (("debian", "13"), ("ubuntu", "24.04")) or (
            distro == "debian" and os_release.get("VERSION_CODENAME") in ("trixie", "forky", "sid")):
        return "distribution", ["--no-install-recommends", "incus-base", "incus-client", "dnsmasq-base"]
    raise CoiError(
        f"coi setup does not know how to install Incus on {os_release.get('PRETTY_NAME', distro or 'this system')}",
        "install Incus by hand (https://linuxcontainers.org/incus/docs/main/installing/), then run coi setup again",
    )


def backports_source(debian_sources: str) -> str:
    """A deb822 entry for bookworm-backports from the host's own Debian entry.

    Same mirror and keyring as the first entry carrying the ``bookworm`` suite.
    """
    for stanza in debian_sources.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#"):
                fields[key.strip()] = value.strip()
        if "bookworm" in fields.get("Suites", "").split():
            uris = fields.get("URIs", "http://deb.debian.org/debian")
            signed = fields.get("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg")
            break
    else:
        uris, signed = "http://deb.debian.org/debian", "/usr/share/keyrings/debian-archive-keyring.gpg"
    return (
        "# Added by coi setup: Incus for Debian 12 comes from bookworm-backports.\n"
        f"Types: deb\nURIs: {uris}\nSuites: bookworm-backports\nComponents: main\nSigned-By: {signed}\n"
    )


def used_networks(route_text: str, addr_text: str) -> list[ipaddress.IPv4Network]:
    """IPv4 networks in use, from ``ip -4 route show table all`` and ``ip -4 -o addr``."""
    nets: list[ipaddress.IPv4Network] = []
    for line in route_text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] in ("broadcast", "local", "unicast", "multicast", "blackhole", "unreachable",
                        "prohibit", "throw"):
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
    for base in (ipaddress.ip_network("10.195.0.0/16"), ipaddress.ip_network("10.0.0.0/8"),
                 ipaddress.ip_network("172.16.0.0/12"), ipaddress.ip_network("192.168.0.0/16")):
        for candidate in base.subnets(new_prefix=24):
            if not any(candidate.overlaps(n) for n in taken):
                return candidate
    raise CoiError("no free private IPv4 /24 subnet for the coi bridge",
                   "free one, or create the bridge by hand: incus network create coibr0 ipv4.address=...")


def root_maps_id(text: str, host_id: int) -> bool:
    """Whether a root entry in ``/etc/subuid`` (or subgid) covers ``host_id``."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0") and parts[1].isdigit() and parts[2].isdigit():
            if int(parts[1]) <= host_id < int(parts[1]) + int(parts[2]):
                return True
    return False


def root_subid_ok(text: str) -> bool:
    """Whether ``/etc/subuid`` (or subgid) gives root at least 65536 ids."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0") and parts[2].isdigit():
            if int(parts[2]) >= SUBID_MINIMUM:
                return True
    return False


# ---- the steps ---------------------------------------------------------------

def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, text=True, **kw)


def _apt(args: list[str], what: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = _run(["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise CoiError(f"{what} failed (apt-get exit {proc.returncode}):\n{tail}",
                       "check the package sources, then run 'sudo coi setup' again")


def _missing_commands(commands: Iterable[str]) -> list[str]:
    return [c for c in commands if shutil.which(c) is None]


def install_packages(report: Report, *, os_release_path: Path = Path("/etc/os-release")) -> None:
    os_release = parse_os_release(os_release_path.read_text())
    need_incus = not (os.path.exists(INCUSD) and shutil.which("incus"))
    # command -> package, for what coi needs beside Incus
    needed = {"tmux": "tmux", "btrfs": "btrfs-progs", "mmdebstrap": "mmdebstrap", "nft": "nftables",
              "ip": "iproute2", "newuidmap": "uidmap", "dnsmasq": "dnsmasq-base"}
    missing_pkgs = [needed[c] for c in _missing_commands(needed)]
    if not need_incus and not missing_pkgs:
        report(Step("packages", False, "Incus and host tools already installed"))
        return
    updated = False
    if need_incus:
        how, args = incus_install_plan(os_release)
        if how == "backports" and not BACKPORTS_SOURCES.exists():
            debian = Path("/etc/apt/sources.list.d/debian.sources")
            BACKPORTS_SOURCES.write_text(backports_source(debian.read_text() if debian.exists() else ""))
            report(Step("packages", True, f"added {BACKPORTS_SOURCES}"))
        _apt(["update"], "apt-get update")
        updated = True
        _apt(["install", *args], "installing Incus")
        report(Step("packages", True, f"installed Incus ({how})"))
    if missing_pkgs:
        if not updated:
            _apt(["update"], "apt-get update")
        _apt(["install", "--no-install-recommends", *missing_pkgs], "installing host tools")
        report(Step("packages", True, "installed " + " ".join(missing_pkgs)))


def ensure_subids(report: Report, *, user: str | None = None,
                  files: Iterable[Path] = (Path("/etc/subuid"), Path("/etc/subgid"))) -> bool:
    """Give root an id range for unprivileged containers and, for ``user``,
    the right to map that user's own uid/gid into containers (``raw.idmap``,
    which coi uses when the user's uid is not the container user's).

    Returns True when the big range had to be added (the daemon reads it at start).
    """
    import pwd

    ids = None
    if user and user != "root":
        pw = pwd.getpwnam(user)
        ids = (pw.pw_uid, pw.pw_gid)
    range_added = changed = False
    for index, path in enumerate(files):
        text = path.read_text() if path.exists() else ""
        lines = []
        if not root_subid_ok(text):
            lines.append(f"root:{SUBID_START}:{SUBID_COUNT}")
            range_added = True
            report(Step("id ranges", True, f"gave root {SUBID_COUNT} ids from {SUBID_START} in {path}"))
        if ids is not None and not root_maps_id(text, ids[index % 2]):
            lines.append(f"root:{ids[index % 2]}:1")
            report(Step("id ranges", True, f"let containers map {user}'s id {ids[index % 2]} ({path})"))
        if lines:
            changed = True
            with path.open("a") as fh:
                if text and not text.endswith("\n"):
                    fh.write("\n")
                fh.write("\n".join(lines) + "\n")
    if not changed:
        report(Step("id ranges", False, "root has subordinate uid and gid ranges"
                    + (f" and may map {user}'s ids" if ids else "")))
    return range_added


def _systemd_runs() -> bool:
    return Path("/run/systemd/system").is_dir()


def _answers(client: Incus) -> bool:
    try:
        client.server()
    except DaemonUnavailableError:
        return False
    return True


def start_daemon(client: Incus, report: Report, *, group: str, restart: bool = False) -> None:
    """Make the daemon answer: through systemd, or by starting incusd ourselves."""
    if _answers(client) and not restart:
        report(Step("daemon", False, "Incus daemon is running"))
        return
    if _systemd_runs():
        action = "restart" if restart else "start"
        _run(["systemctl", "enable", "incus.socket", "incus.service"], capture_output=True)
        proc = _run(["systemctl", action, "incus.service"], capture_output=True)
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
    wait_for(lambda: _answers(client), timeout=60, what="the Incus daemon to answer",
             hint=f"see {DAEMON_LOG}")
    report(Step("daemon", True, how))


def _stop_own_daemon(client: Incus) -> None:
    proc = _run(["pgrep", "-x", "incusd"], capture_output=True)
    pids = [int(p) for p in proc.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    wait_for(lambda: not _answers(client), timeout=60, what="the Incus daemon to stop")


def ensure_storage_pool(client: Incus, report: Report) -> str:
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


def ensure_network(client: Incus, report: Report, *, ipv6: bool) -> str:
    try:
        net = client.network(COI_NETWORK)
        report(Step("network", False,
                    f"bridge {COI_NETWORK} exists ({net['config'].get('ipv4.address', 'no IPv4')})"))
        return COI_NETWORK
    except NotFoundError:
        pass
    routes = _run(["ip", "-4", "route", "show", "table", "all"], capture_output=True).stdout
    addrs = _run(["ip", "-4", "-o", "addr", "show"], capture_output=True).stdout
    subnet = choose_subnet(used_networks(routes, addrs))
    gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    client.create_network(COI_NETWORK, {
        "ipv4.address": gateway, "ipv4.nat": "true",
        "ipv6.address": "auto" if ipv6 else "none",
    }, description="coi containers")
    report(Step("network", True, f"created bridge {COI_NETWORK} with {gateway}, NAT on, IPv6 "
                + ("on" if ipv6 else "off")))
    return COI_NETWORK


def ensure_profile(client: Incus, report: Report, *, pool: str, network: str) -> None:
    devices = {
        "root": {"type": "disk", "path": "/", "pool": pool},
        "eth0": {"type": "nic", "name": "eth0", "network": network},
    }
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


def ensure_group_member(user: str | None, group: str, report: Report) -> bool:
    """Add ``user`` to the Incus admin group; True when the user must log in again."""
    if not user or user == "root":
        report(Step("group", False, "no invoking user to add (run through sudo to add yours)"))
        return False
    import grp

    try:
        members = grp.getgrnam(group).gr_mem
    except KeyError:
        raise CoiError(f"group {group} does not exist", "reinstall Incus: sudo coi setup") from None
    if user in members:
        report(Step("group", False, f"{user} is in {group}"))
        return False
    proc = _run(["usermod", "-aG", group, user], capture_output=True)
    if proc.returncode != 0:
        raise CoiError(f"could not add {user} to {group}: {proc.stderr.strip()}")
    report(Step("group", True, f"added {user} to {group}"))
    return True


SYSTEM_CONFIG = Path("/etc/coi/config.toml")
SUDOERS_DIR = Path("/etc/sudoers.d")
# On systemd hosts the gate must exist before Incus autostarts containers after a reboot.
INCUS_DROPIN = Path("/etc/systemd/system/incus.service.d/coi-gate.conf")
# What earlier coi versions wrote to /etc/sudoers.d/coi-nft-NAME: nft with any arguments.
_LEGACY_GRANT = re.compile(r"(\S+) ALL=\(root\) NOPASSWD: (/\S*/nft)\n?")


def _helper_path() -> Path:
    from coi.network import HELPER

    return Path(HELPER)


def launcher_text(interpreter: str, import_root: str) -> str:
    """The helper's launcher: isolated Python (``-I``: no PYTHON* variables, user site or
    script directory), importing coi from the directory that was checked at install."""
    if not interpreter.startswith("/") or any(c.isspace() for c in interpreter) or len(interpreter) > 200:
        raise CoiError(f"cannot name the interpreter {interpreter!r} in a #! line")
    return (f"#!{interpreter} -I\n"
            "# coi's privileged nftables helper, written by 'coi setup' (see coi.nfthelper).\n"
            "import sys\n"
            f"sys.path.insert(0, {import_root!r})\n"
            "from coi.nfthelper import main\n"
            "sys.exit(main())\n")


def sudoers_rule(uid: int, helper: str) -> str:
    """The user (by uid) may run the helper as root with no arguments (``""``), nothing else."""
    return f'#{int(uid)} ALL=(root) NOPASSWD: {helper} ""\n'


def grant_path(uid: int, sudoers_dir: Path = SUDOERS_DIR) -> Path:
    """No '.' in the name: sudo ignores such files in /etc/sudoers.d (user names may have one)."""
    return sudoers_dir / f"coi-{int(uid)}"


def dropin_text(helper: str) -> str:
    return ("# Written by coi setup: load coi's bridge gate before Incus starts containers.\n"
            f"[Service]\nExecStartPre={helper} --gate\n")


def untrusted_paths(paths: Iterable[Path]) -> list[str]:
    """Each path (or parent directory) that someone but root could change, with why.

    A root-owned directory writable by others is fine only with the sticky bit (/tmp).
    """
    problems: list[str] = []
    seen: set[Path] = set()
    for path in paths:
        for p in (path, *path.parents):
            if p in seen:
                continue
            seen.add(p)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                problems.append(f"{p} is missing")
                continue
            if st.st_uid != 0:
                problems.append(f"{p} is owned by uid {st.st_uid}, not root")
            elif (st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)
                  and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX)):
                problems.append(f"{p} is writable by group or others")
    return problems


def helper_inputs(interpreter: Path, package: Path) -> list[Path]:
    """What the launcher runs as root: the interpreter (link and target), its venv config,
    every file of the coi package, and the .pth files Python runs from beside it."""
    paths = [interpreter, interpreter.resolve()]
    cfg = interpreter.parent.parent / "pyvenv.cfg"
    if cfg.exists():
        paths.append(cfg)
    paths.append(package)
    for root, dirs, files in os.walk(package):
        paths += [Path(root) / n for n in (*dirs, *files)]
    paths += sorted(package.parent.glob("*.pth"))
    return paths


def install_helper(report: Report, *, path: Path | None = None, interpreter: str | None = None,
                   package: Path | None = None) -> Path:
    """Write the helper's launcher (root:root 0755), after checking that only root can
    change what it runs: a user-writable coi would make the sudoers grant a root shell."""
    import coi

    path = path or _helper_path()
    interp = Path(interpreter or sys.executable)
    package = package or Path(coi.__file__).resolve().parent
    text = launcher_text(str(interp), str(package.parent))
    problems = untrusted_paths(helper_inputs(interp, package))
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    problems += untrusted_paths([path.parent])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CoiError(f"refusing to install {path}: {problems[0]}{more}",
                       "install coi where only root can change it (e.g. sudo python3 -m venv /opt/coi; "
                       "sudo /opt/coi/bin/pip install coi), then run 'sudo coi setup' again")
    try:
        st = os.lstat(path)
        if (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_gid == 0 and st.st_mode & 0o7777 == 0o755
                and path.read_text() == text):
            report(Step("helper", False, f"{path} is installed"))
            return path
    except FileNotFoundError:
        pass
    _write_root_file(path, text, 0o755)
    report(Step("helper", True, f"installed {path} (coi's nft helper; runs {interp} -I)"))
    return path


def _write_root_file(path: Path, text: str, mode: int, *, tmp: Path | None = None,
                     check: Callable[[Path], None] | None = None) -> None:
    """root:root ``mode``, written to ``tmp`` (checked), then renamed into place atomically."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install_grant(uid: int, helper: Path, *, sudoers_dir: Path = SUDOERS_DIR) -> tuple[Path, bool]:
    """``/etc/sudoers.d/coi-<uid>``: validated with ``visudo -cf`` under a name sudo ignores
    (it has a '.'), chmod 0440, then renamed into place. Returns (path, changed)."""
    target, rule = grant_path(uid, sudoers_dir), sudoers_rule(uid, str(helper))
    try:
        st = os.lstat(target)
        if (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_mode & 0o7777 == 0o440
                and target.read_text() == rule):
            return target, False
    except FileNotFoundError:
        pass

    def valid(tmp: Path) -> None:
        proc = _run(["visudo", "-cf", str(tmp)], capture_output=True)
        if proc.returncode != 0:
            raise CoiError(f"visudo refused the sudoers rule for uid {uid}", "check sudo's installation")

    _write_root_file(target, rule, 0o440, tmp=sudoers_dir / f".coi-{int(uid)}.tmp", check=valid)
    return target, True


def remove_legacy_grants(report: Report, *, sudoers_dir: Path = SUDOERS_DIR, helper: Path | None = None) -> None:
    """Replace the unlimited ``sudo nft`` grants earlier versions wrote (``coi-nft-NAME``)
    with the helper's grant for the same user, and delete them."""
    import pwd

    helper = helper or _helper_path()
    for old in sorted(sudoers_dir.glob("coi-nft-*")):
        try:
            match = _LEGACY_GRANT.fullmatch(old.read_text())
        except (OSError, UnicodeDecodeError):
            match = None
        if not match:
            report(Step("isolation", False, f"left {old} alone (not a grant coi wrote); check what it allows"))
            continue
        try:
            uid = pwd.getpwnam(match[1]).pw_uid
        except KeyError:
            uid = None
        if uid is not None and helper.is_file():
            install_grant(uid, helper, sudoers_dir=sudoers_dir)
        old.unlink()
        report(Step("isolation", True, f"removed the unlimited nft grant {old}"
                    + (f" ({match[1]} may run {helper} instead)" if uid is not None else "")))


def ensure_gate(report: Report, *, helper: Path | None = None, dropin: Path = INCUS_DROPIN,
                systemd: bool | None = None) -> None:
    """Load the bridge gate (containers coi has not opened get no network), and on systemd
    hosts make incus.service load it before the daemon starts (and autostarts containers)."""
    import json

    from coi import nfthelper

    helper = helper or _helper_path()
    try:
        loaded = json.loads(nfthelper.execute({"action": "list"})).get("gate")
        if not loaded:
            nfthelper.execute({"action": "gate"})
    except nfthelper.HelperError as exc:
        raise CoiError(f"could not load coi's bridge gate: {exc.message}",
                       "check that nftables works here ('nft list tables')") from None
    report(Step("gate", not loaded, "bridge gate loaded" if not loaded else "bridge gate is loaded"))
    if not (_systemd_runs() if systemd is None else systemd):
        return
    text = dropin_text(str(helper))
    if dropin.is_file() and dropin.read_text() == text:
        report(Step("gate", False, f"{dropin} loads it before Incus starts"))
        return
    dropin.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write_root_file(dropin, text, 0o644)
    _run(["systemctl", "daemon-reload"], capture_output=True)
    report(Step("gate", True, f"wrote {dropin}: the gate is loaded before Incus starts containers"))


def ensure_network_privileges(user: str | None, report: Report, *, helper: Path | None = None,
                              sudoers_dir: Path = SUDOERS_DIR, system_config: Path | None = None) -> None:
    """Let ``user`` run coi's nft helper (and nothing else) through ``sudo -n``, and tell
    coi to do so (``[network] privileged_command``). Needed on every kernel: host nftables
    filter where Incus ACLs cannot, and the bridge gate is opened through the helper."""
    if not user or user == "root":
        return
    import pwd

    helper = helper or _helper_path()
    system_config = system_config or SYSTEM_CONFIG
    if shutil.which("sudo") is None:
        _apt(["install", "--no-install-recommends", "sudo"], "installing sudo")
    if not helper.is_file():
        raise CoiError(f"coi's nft helper {helper} is not installed", "run 'sudo coi setup'")
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise CoiError(f"no user {user!r} on this host") from None
    sudoers, changed = install_grant(uid, helper, sudoers_dir=sudoers_dir)
    if changed:
        report(Step("isolation", True, f"{user} may run {helper} through sudo -n ({sudoers}), nothing else"))
    legacy = sudoers_dir / f"coi-nft-{user}"
    if legacy.is_file() and _LEGACY_GRANT.fullmatch(legacy.read_text()):
        legacy.unlink()
        changed = True
        report(Step("isolation", True, f"removed the unlimited nft grant {legacy}"))
    if not system_config.exists():
        system_config.parent.mkdir(parents=True, exist_ok=True)
        system_config.write_text('# Written by coi setup: how coi runs its nft helper for network isolation.\n'
                                 '[network]\nprivileged_command = ["sudo", "-n"]\n')
        changed = True
        report(Step("isolation", True, f"set [network] privileged_command in {system_config}"))
    elif "privileged_command" not in system_config.read_text():
        report(Step("isolation", False, f"add privileged_command = [\"sudo\", \"-n\"] to [network] in "
                                        f"{system_config} for isolated sessions"))
    if not changed:
        report(Step("isolation", False, f"{user} may run {helper} through sudo -n"))


def ensure_address_lock(group: str, report: Report, *, path: Path | None = None) -> None:
    """The lock every coi user takes to choose a new container's address (group-writable)."""
    import grp

    from coi.network import ADDRESS_LOCK

    path = path or ADDRESS_LOCK
    gid = grp.getgrnam(group).gr_gid
    if path.is_file() and not path.is_symlink():
        st = path.stat()
        if st.st_gid == gid and st.st_mode & 0o777 == 0o660:
            report(Step("locks", False, f"{path} is shared by group {group}"))
            return
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o660)
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, 0o660)
    finally:
        os.close(fd)
    report(Step("locks", True, f"made {path}, shared by group {group} (new containers' addresses)"))


def require_root() -> None:
    if os.geteuid() != 0:
        raise CoiError("coi setup must run as root: it installs packages and configures Incus",
                       "run 'sudo coi setup'")


def setup(*, report: Report, group: str, user: str | None, ipv6: bool = False,
          client: Incus | None = None) -> bool:
    """Run every step; returns whether anything changed."""
    require_root()
    changed: list[Step] = []

    def track(step: Step) -> None:
        if step.changed:
            changed.append(step)
        report(step)

    install_packages(track)
    subids_changed = ensure_subids(track, user=user)
    install_helper(track)
    ensure_gate(track)  # before incusd starts (and autostarts containers)
    client = client or Incus.from_environment()
    # incusd reads the id ranges at start: restart a running one we just gave ranges to.
    start_daemon(client, track, group=group, restart=subids_changed and _answers(client))
    pool = ensure_storage_pool(client, track)
    network = ensure_network(client, track, ipv6=ipv6)
    ensure_profile(client, track, pool=pool, network=network)
    ensure_group_member(user, group, track)
    ensure_address_lock(group, track)
    ensure_network_privileges(user, track)
    remove_legacy_grants(track)
    return bool(changed)

