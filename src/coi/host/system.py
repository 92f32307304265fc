"""The host's own side of ``coi setup``: packages (Incus and the tools coi runs beside
it), root's subordinate id ranges, the Incus admin group and the shared address lock.

The pure parts (os-release, the install plan, the backports source, id-range checks)
are table-tested; each step checks first and changes only what is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from coi.errors import CoiError
from coi.host.daemon import INCUSD
from coi.host.steps import Report, Step, apt, run

BACKPORTS_SOURCES = Path("/etc/apt/sources.list.d/coi-bookworm-backports.sources")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# command -> package, for what coi needs beside Incus
HOST_TOOLS = {"tmux": "tmux", "btrfs": "btrfs-progs", "mmdebstrap": "mmdebstrap", "nft": "nftables",
              "ip": "iproute2", "newuidmap": "uidmap", "dnsmasq": "dnsmasq-base",
              "git": "git"}  # git: branch sessions (coi.branches) copy and review on the host
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
# Unprivileged containers need root to own a large id range; this is the
# range Debian's incus package itself adds.
SUBID_START, SUBID_COUNT, SUBID_MINIMUM = 1000000, 1000000000, 65536


# ---- pure helpers (table-tested) -------------------------------------------

def parse_os_release(text: str) -> dict[str, str]:
    """``/etc/os-release``'s ``KEY=value`` lines, quotes taken off the values."""
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
    uris, signed = DEBIAN_MIRROR, DEBIAN_KEYRING
    for stanza in debian_sources.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#"):
                fields[key.strip()] = value.strip()
        if "bookworm" in fields.get("Suites", "").split():
            uris, signed = fields.get("URIs", DEBIAN_MIRROR), fields.get("Signed-By", DEBIAN_KEYRING)
            break
    return (
        "# Added by coi setup: Incus for Debian 12 comes from bookworm-backports.\n"
        f"Types: deb\nURIs: {uris}\nSuites: bookworm-backports\nComponents: main\nSigned-By: {signed}\n"
    )


def _root_ranges(text: str) -> Iterator[tuple[str, str]]:
    """(start, count) of each root entry in ``/etc/subuid`` (or subgid), as written."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0"):
            yield parts[1], parts[2]


def root_maps_id(text: str, host_id: int) -> bool:
    """Whether a root entry in ``/etc/subuid`` (or subgid) covers ``host_id``."""
    return any(start.isdigit() and count.isdigit() and int(start) <= host_id < int(start) + int(count)
               for start, count in _root_ranges(text))


def root_subid_ok(text: str) -> bool:
    """Whether ``/etc/subuid`` (or subgid) gives root at least 65536 ids."""
    return any(count.isdigit() and int(count) >= SUBID_MINIMUM for _, count in _root_ranges(text))


# ---- the steps ---------------------------------------------------------------

def install_packages(report: Report, *, os_release_path: Path = Path("/etc/os-release")) -> None:
    """Incus (from the distribution, or Debian 12's backports) and the host tools coi runs."""
    os_release = parse_os_release(os_release_path.read_text())
    need_incus = not (os.path.exists(INCUSD) and shutil.which("incus"))
    missing_pkgs = [package for command, package in HOST_TOOLS.items() if shutil.which(command) is None]
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
        apt(["update"], "apt-get update")
        updated = True
        apt(["install", *args], "installing Incus")
        report(Step("packages", True, f"installed Incus ({how})"))
    if missing_pkgs:
        if not updated:
            apt(["update"], "apt-get update")
        apt(["install", "--no-install-recommends", *missing_pkgs], "installing host tools")
        report(Step("packages", True, "installed " + " ".join(missing_pkgs)))


def ensure_subids(report: Report, *, user: str | None = None, files: Iterable[Path] = SUBID_FILES) -> bool:
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
    proc = run(["usermod", "-aG", group, user], capture_output=True)
    if proc.returncode != 0:
        raise CoiError(f"could not add {user} to {group}: {proc.stderr.strip()}")
    report(Step("group", True, f"added {user} to {group}"))
    return True


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
