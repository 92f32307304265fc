"""Host set-up's pure helpers, the id-range step on temporary files, and doctor output."""

from __future__ import annotations

import ipaddress
import json
import random
import shutil

import pytest

from coi.cli.render import render_checks
from coi.cli.ui import UI
from coi.errors import CoiError
from coi.host import Check, Step, check_nftables
from coi.host.daemon import choose_subnet, used_networks
from coi.host.system import (
    SUBID_COUNT,
    SUBID_START,
    backports_source,
    ensure_subids,
    incus_install_plan,
    parse_os_release,
    root_subid_ok,
)

pytestmark = pytest.mark.unit

net = ipaddress.ip_network

# ---- /etc/os-release and the install plan ----------------------------------------

DEBIAN_12 = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""
DEBIAN_13 = DEBIAN_12.replace('"12', '"13').replace("bookworm", "trixie")
DEBIAN_TRIXIE_TESTING = """\
PRETTY_NAME="Debian GNU/Linux trixie/sid"
NAME="Debian GNU/Linux"
VERSION_CODENAME=trixie
ID=debian
"""
UBUNTU_2404 = """\
PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
"""
FEDORA_40 = """\
NAME="Fedora Linux"
VERSION="40 (Workstation Edition)"
ID=fedora
VERSION_ID=40
PRETTY_NAME="Fedora Linux 40 (Workstation Edition)"
"""

FROM_DISTRIBUTION = ["--no-install-recommends", "incus-base", "incus-client", "dnsmasq-base"]


@pytest.mark.parametrize(("text", "expected"), [
    (DEBIAN_12, {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "NAME": "Debian GNU/Linux",
                 "VERSION_ID": "12", "VERSION": "12 (bookworm)", "VERSION_CODENAME": "bookworm",
                 "ID": "debian", "HOME_URL": "https://www.debian.org/"}),
    ("\n  ID = ubuntu  \nnot a pair\nEMPTY=\n", {"ID": "ubuntu", "EMPTY": ""}),
    ("", {}),
])
def test_parse_os_release(text, expected):
    assert parse_os_release(text) == expected


def test_parse_os_release_single_quotes():
    assert parse_os_release("PRETTY_NAME='Some Linux 1.0'\n")["PRETTY_NAME"] == "Some Linux 1.0"


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(DEBIAN_12, ("backports", ["-t", "bookworm-backports", *FROM_DISTRIBUTION]), id="debian-12"),
    pytest.param(DEBIAN_13, ("distribution", FROM_DISTRIBUTION), id="debian-13"),
    pytest.param(DEBIAN_TRIXIE_TESTING, ("distribution", FROM_DISTRIBUTION), id="trixie-codename"),
    pytest.param(UBUNTU_2404, ("distribution", FROM_DISTRIBUTION), id="ubuntu-24.04"),
])
def test_incus_install_plan(text, expected):
    assert incus_install_plan(parse_os_release(text)) == expected


@pytest.mark.parametrize(("text", "named"), [
    (FEDORA_40, "Fedora Linux 40 (Workstation Edition)"),
    (UBUNTU_2404.replace("24.04", "22.04"), "Ubuntu 22.04.1 LTS"),
    ("", "this system"),
])
def test_incus_install_plan_refuses_unknown_systems(text, named):
    with pytest.raises(CoiError) as info:
        incus_install_plan(parse_os_release(text))
    assert info.value.message.endswith(f"on {named}")
    assert "install Incus by hand" in info.value.hint


# ---- bookworm-backports source ---------------------------------------------------

DEBIAN_SOURCES = """\
Types: deb
URIs: http://security.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-security.gpg

# Types: deb
# URIs: http://commented.example/debian
# Suites: bookworm

Types: deb deb-src
URIs: http://ftp.de.debian.org/debian
Suites: bookworm bookworm-updates
Components: main contrib non-free-firmware
Signed-By: /etc/apt/keyrings/mirror.gpg
"""


ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _backports(uris: str, signed_by: str = ARCHIVE_KEYRING) -> str:
    return ("# Added by coi setup: Incus for Debian 12 comes from bookworm-backports.\n"
            f"Types: deb\nURIs: {uris}\nSuites: bookworm-backports\nComponents: main\n"
            f"Signed-By: {signed_by}\n")


@pytest.mark.parametrize(("sources", "expected"), [
    pytest.param(DEBIAN_SOURCES,
                 _backports("http://ftp.de.debian.org/debian", "/etc/apt/keyrings/mirror.gpg"),
                 id="host-mirror"),
    pytest.param("", _backports("http://deb.debian.org/debian"), id="empty"),
])
def test_backports_source(sources, expected):
    assert backports_source(sources) == expected


# ---- subnets for the coi bridge ---------------------------------------------------

ROUTES = """\
default via 192.168.1.1 dev wlp2s0 proto dhcp src 192.168.1.23 metric 600
default via 10.8.0.1 dev tun0 table 51820
169.254.0.0/16 dev wlp2s0 scope link metric 1000
172.17.0.0/16 dev docker0 proto kernel scope link src 172.17.0.1 linkdown
192.168.1.0/24 dev wlp2s0 proto kernel scope link src 192.168.1.23 metric 600
10.195.0.7 via 192.168.1.1 dev wlp2s0
blackhole 10.99.0.0/16 proto bird
local 127.0.0.0/8 dev lo table local proto kernel scope host src 127.0.0.1
local 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1
broadcast 127.255.255.255 dev lo table local proto kernel scope link src 127.0.0.1
local 192.168.1.23 dev wlp2s0 table local proto kernel scope host src 192.168.1.23
broadcast 192.168.1.255 dev wlp2s0 table local proto kernel scope link src 192.168.1.23
"""
ADDRS = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
3: wlp2s0    inet 192.168.1.23/24 brd 192.168.1.255 scope global dynamic noprefixroute wlp2s0\\       \
valid_lft 85304sec preferred_lft 85304sec
7: tun0    inet 10.8.0.6 peer 10.8.0.5/32 scope global tun0\\       valid_lft forever preferred_lft forever
"""


def test_used_networks_from_routes_and_addresses():
    assert set(used_networks(ROUTES, ADDRS)) == {net(n) for n in (
        "169.254.0.0/16", "172.17.0.0/16", "192.168.1.0/24", "10.195.0.7/32", "10.99.0.0/16",
        "127.0.0.0/8", "127.0.0.1/32", "127.255.255.255/32", "192.168.1.23/32", "192.168.1.255/32",
        "10.8.0.6/32")}


@pytest.mark.parametrize(("routes", "addrs"), [("", ""), ("default via 10.0.0.1 dev eth0\n\n", "")])
def test_used_networks_ignores_default_routes(routes, addrs):
    assert used_networks(routes, addrs) == []


@pytest.mark.parametrize(("used", "expected"), [
    pytest.param([], "10.195.0.0/24", id="nothing-used"),
    pytest.param(["10.195.0.0/24"], "10.195.1.0/24", id="first-taken"),
    pytest.param(["10.195.0.7/32"], "10.195.1.0/24", id="host-route"),
    pytest.param(["10.195.0.0/17"], "10.195.128.0/24", id="half-taken"),
    pytest.param(["10.195.0.0/16"], "10.0.0.0/24", id="falls-through-to-10/8"),
    pytest.param(["10.0.0.0/8"], "172.16.0.0/24", id="falls-through-to-172.16/12"),
    pytest.param(["10.0.0.0/8", "172.16.0.0/12"], "192.168.0.0/24", id="falls-through-to-192.168/16"),
    pytest.param(["127.0.0.0/8", "127.0.0.1/32"], "10.195.0.0/24", id="loopback-ignored"),
])
def test_choose_subnet(used, expected):
    assert choose_subnet([net(n) for n in used]) == net(expected)


def test_choose_subnet_with_every_private_range_taken():
    with pytest.raises(CoiError) as info:
        choose_subnet([net("10.0.0.0/8"), net("172.16.0.0/12"), net("192.168.0.0/16")])
    assert "coibr0" in info.value.hint


def _random_used(rng: random.Random) -> list[ipaddress.IPv4Network]:
    """Up to 30 networks from /16 to /32, mostly inside and around coi's first choices."""
    around = [net("10.195.0.0/16"), net("10.0.0.0/16"), net("172.16.0.0/16"), net("192.168.0.0/16")]
    nets = []
    for _ in range(rng.randint(0, 30)):
        base = rng.choices(around, weights=[6, 2, 1, 1])[0]
        address = int(base.network_address) + rng.randrange(base.num_addresses)
        nets.append(ipaddress.ip_network((address, rng.randint(16, 32)), strict=False))
    return nets


@pytest.mark.parametrize("seed", range(10))
def test_choose_subnet_never_overlaps_a_used_network(seed):
    rng = random.Random(seed)
    for used in [_random_used(rng) for _ in range(20)] + [used_networks(ROUTES, ADDRS)]:
        chosen = choose_subnet(used)
        assert chosen.prefixlen == 24 and chosen.is_private
        assert not [n for n in used if chosen.overlaps(n)], (chosen, used)


# ---- subordinate id ranges ----------------------------------------------------------

@pytest.mark.parametrize(("text", "ok"), [
    pytest.param("root:1000000:1000000000\n", True, id="debian-range"),
    pytest.param("alice:100000:65536\nroot:100000:65536\n", True, id="exactly-enough"),
    pytest.param("root:100000:65535\n", False, id="too-small"),
    pytest.param("alice:100000:65536\n", False, id="missing"),
    pytest.param("0:100000:65536", True, id="numeric-uid-0"),
    pytest.param("root:100000\nroot:x:y:z\n", False, id="malformed"),
    pytest.param("", False, id="empty"),
])
def test_root_subid_ok(text, ok):
    assert root_subid_ok(text) is ok


def test_ensure_subids_appends_a_root_range_once(tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536")  # no final newline
    steps: list[Step] = []
    root_line = f"root:{SUBID_START}:{SUBID_COUNT}\n"

    assert ensure_subids(steps.append, files=(subuid, subgid)) is True
    assert subuid.read_text() == "alice:100000:65536\n" + root_line
    assert subgid.read_text() == root_line
    assert [(s.changed, str(subuid) in s.detail or str(subgid) in s.detail) for s in steps] == [
        (True, True), (True, True)]

    steps.clear()
    assert ensure_subids(steps.append, files=(subuid, subgid)) is False
    assert (subuid.read_text(), subgid.read_text()) == ("alice:100000:65536\n" + root_line, root_line)
    assert [s.changed for s in steps] == [False]


# ---- doctor ---------------------------------------------------------------------------

def test_check_nftables_without_nft(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    assert check_nftables() == Check("nftables", "warn",
                                     "nft is not installed (needed for network isolation)",
                                     "run 'sudo coi setup'", blocking=False)


CHECKS = [
    Check("daemon", "ok", "Incus 6.0.3 answers on /var/lib/incus/unix.socket"),
    Check("storage", "warn", "pool default (dir): every container start unpacks the image",
          "a btrfs or zfs pool makes session start near-instant", blocking=False),
    Check("id ranges", "fail", "root has no subordinate id range in /etc/subuid", "run 'sudo coi setup'"),
    Check("tmux", "fail", "tmux is not installed on the host", "run 'sudo coi setup'", blocking=False),
    Check("image", "skip", "daemon not reachable", blocking=False),
]


def test_render_checks_text(capsys):
    render_checks(UI(), CHECKS, format="text")
    assert capsys.readouterr().out.splitlines() == [
        "[ ok ] daemon: Incus 6.0.3 answers on /var/lib/incus/unix.socket",
        "[warn] storage: pool default (dir): every container start unpacks the image",
        "       fix: a btrfs or zfs pool makes session start near-instant",
        "[FAIL] id ranges: root has no subordinate id range in /etc/subuid",
        "       fix: run 'sudo coi setup'",
        "[FAIL] tmux: tmux is not installed on the host",
        "       fix: run 'sudo coi setup'",
        "[skip] image: daemon not reachable",
        "1 required check(s) failed: id ranges",
    ]


@pytest.mark.parametrize(("checks", "ok"), [
    (CHECKS, False),
    ([c for c in CHECKS if c.name != "id ranges"], True),  # a non-blocking failure does not count
])
def test_render_checks_json(capsys, checks, ok):
    render_checks(UI(), checks, format="json")
    data = json.loads(capsys.readouterr().out)
    assert data == {"ok": ok, "checks": [c.to_json() for c in checks]}


def test_render_checks_text_all_passed(capsys):
    render_checks(UI(), CHECKS[:2], format="text")
    assert capsys.readouterr().out.splitlines()[-1] == "All required checks passed."


def test_ensure_address_lock_is_shared_by_the_group(tmp_path):
    import grp
    import os

    from coi.host.system import ensure_address_lock

    group = grp.getgrgid(os.getgid()).gr_name
    path = tmp_path / "coi" / "addresses.lock"
    steps = []
    ensure_address_lock(group, steps.append, path=path)
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, os.getgid()) and steps[-1].changed
    ensure_address_lock(group, steps.append, path=path)
    assert not steps[-1].changed
    path.chmod(0o600)
    ensure_address_lock(group, steps.append, path=path)
    assert steps[-1].changed and path.stat().st_mode & 0o777 == 0o660
