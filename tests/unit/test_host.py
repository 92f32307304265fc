"""coi setup: the pure helpers (table-driven), the steps on temporary files, the Incus-side
steps against the fake daemon, and the order of the steps."""

from __future__ import annotations

import grp
import ipaddress
import os
import random
import subprocess

import pytest

import coi.host
from coi.errors import CoiError
from coi.host import Step, daemon
from coi.host.daemon import COI_NETWORK, COI_PROFILE, choose_subnet, profile_devices, used_networks
from coi.host.system import (
    SUBID_COUNT,
    SUBID_START,
    backports_source,
    ensure_subids,
    incus_install_plan,
    parse_os_release,
    root_maps_id,
    root_subid_ok,
)
from coi.incus import Incus
from fake_incus import FakeDaemon, error, sync

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


@pytest.mark.parametrize(("text", "host_id", "mapped"), [
    pytest.param("root:1000:1\n", 1000, True, id="exactly-that-id"),
    pytest.param("root:1000:1\n", 1001, False, id="one-past"),
    pytest.param("root:1000000:1000000000\n", 1000, False, id="big-range-above"),
    pytest.param("root:0:2000\n", 1999, True, id="range-covers-it"),
    pytest.param("0:1000:1\n", 1000, True, id="numeric-uid-0"),
    pytest.param("alice:1000:1\n", 1000, False, id="someone-else"),
    pytest.param("root:x:1\nroot:1000\n", 1000, False, id="malformed"),
    pytest.param("  root:1000:1  \n", 1000, True, id="spaces-around"),
    pytest.param("", 1000, False, id="empty"),
])
def test_root_maps_id(text, host_id, mapped):
    assert root_maps_id(text, host_id) is mapped


def test_ensure_subids_lets_containers_map_the_user_s_ids(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    for path in (subuid, subgid):
        path.write_text(f"root:{SUBID_START}:{SUBID_COUNT}\n")
    steps: list[Step] = []
    assert ensure_subids(steps.append, user="nobody", files=(subuid, subgid)) is False  # no new big range
    assert subuid.read_text().splitlines()[-1] == f"root:{nobody.pw_uid}:1"
    assert subgid.read_text().splitlines()[-1] == f"root:{nobody.pw_gid}:1"
    steps.clear()
    ensure_subids(steps.append, user="nobody", files=(subuid, subgid))
    assert steps == [Step("id ranges", False, "root has subordinate uid and gid ranges and may map nobody's ids")]


def test_ensure_address_lock_is_shared_by_the_group(tmp_path):
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


# ---- the Incus side, against the fake daemon -----------------------------------------------

@pytest.fixture
def fake(daemon: FakeDaemon) -> FakeDaemon:
    """The shared fake daemon (``daemon`` here names coi.host.daemon)."""
    return daemon


def test_a_running_daemon_is_left_alone(fake, client):
    fake.on("GET", "/1.0", sync({"environment": {}}))
    steps: list[Step] = []
    daemon.start_daemon(client, steps.append, group="incus-admin")
    assert steps == [Step("daemon", False, "Incus daemon is running")]


def test_a_missing_socket_does_not_answer(tmp_path):
    assert daemon.answers(Incus(str(tmp_path / "none.socket"))) is False


@pytest.mark.parametrize(("pools", "chosen"), [
    pytest.param([{"name": "x", "driver": "dir"}, {"name": "coi", "driver": "btrfs"}], "coi", id="coi-first"),
    pytest.param([{"name": "x", "driver": "dir"}, {"name": "default", "driver": "zfs"}], "default",
                 id="then-default"),
    pytest.param([{"name": "x", "driver": "dir"}, {"name": "y", "driver": "dir"}], "x", id="then-the-first"),
])
def test_an_existing_storage_pool_is_kept(fake, client, pools, chosen):
    fake.on("GET", "/1.0/storage-pools", sync(pools))
    steps: list[Step] = []
    assert daemon.ensure_storage_pool(client, steps.append) == chosen
    assert not fake.requests_to("POST", "/1.0/storage-pools") and not steps[0].changed


def test_a_new_storage_pool_is_btrfs_or_else_dir(fake, client):
    fake.on("GET", "/1.0/storage-pools", sync([]))
    fake.on("POST", "/1.0/storage-pools", error("no btrfs here", 500), sync())
    steps: list[Step] = []
    assert daemon.ensure_storage_pool(client, steps.append) == "coi"
    assert [(r.json()["driver"], r.json()["config"]) for r in fake.requests_to("POST", "/1.0/storage-pools")] == [
        ("btrfs", {"size": "30GiB"}), ("dir", {})]
    assert steps[0].changed and "btrfs failed: storage pool coi: no btrfs here" in steps[0].detail


@pytest.mark.parametrize(("ipv6", "ipv6_address"), [(False, "none"), (True, "auto")])
def test_the_bridge_gets_a_free_subnet(fake, client, monkeypatch, ipv6, ipv6_address):
    fake.on("GET", f"/1.0/networks/{COI_NETWORK}", error("not found", 404))
    fake.on("POST", "/1.0/networks", sync())
    outputs = {"route": ROUTES, "-o": ADDRS}
    monkeypatch.setattr(daemon, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 0, outputs[argv[2]]))
    steps: list[Step] = []
    assert daemon.ensure_network(client, steps.append, ipv6=ipv6) == COI_NETWORK
    [created] = fake.requests_to("POST", "/1.0/networks")
    assert created.json()["config"] == {"ipv4.address": "10.195.1.1/24", "ipv4.nat": "true",
                                        "ipv6.address": ipv6_address}  # 10.195.0.7 is routed here
    assert steps[0].changed


def test_an_existing_bridge_is_kept(fake, client):
    fake.on("GET", f"/1.0/networks/{COI_NETWORK}", sync({"config": {"ipv4.address": "10.9.9.1/24"}}))
    steps: list[Step] = []
    assert daemon.ensure_network(client, steps.append, ipv6=False) == COI_NETWORK
    assert steps == [Step("network", False, f"bridge {COI_NETWORK} exists (10.9.9.1/24)")]


@pytest.mark.parametrize(("current", "method", "changed"), [
    pytest.param(None, "POST", True, id="missing"),
    pytest.param({"config": {}, "devices": profile_devices("coi", COI_NETWORK)}, None, False, id="up-to-date"),
    pytest.param({"config": {"limits.cpu": "2"}, "description": "mine", "devices": profile_devices("old", "br1")},
                 "PUT", True, id="other-devices"),
])
def test_the_profile(fake, client, current, method, changed):
    fake.on("GET", f"/1.0/profiles/{COI_PROFILE}", sync(current) if current else error("not found", 404))
    fake.on("POST", "/1.0/profiles", sync())
    fake.on("PUT", f"/1.0/profiles/{COI_PROFILE}", sync())
    steps: list[Step] = []
    daemon.ensure_profile(client, steps.append, pool="coi", network=COI_NETWORK)
    writes = [r for r in fake.requests if r.method in ("POST", "PUT")]
    assert [r.method for r in writes] == ([method] if method else []) and steps[0].changed is changed
    if writes:
        assert writes[0].json()["devices"] == profile_devices("coi", COI_NETWORK)
    if method == "PUT":  # the rest of a profile someone edited is kept
        assert (writes[0].json()["config"], writes[0].json()["description"]) == ({"limits.cpu": "2"}, "mine")


# ---- the order of the steps ------------------------------------------------------------------

STEPS = ("install_packages", "ensure_subids", "install_helper", "ensure_gate", "start_daemon",
         "ensure_storage_pool", "ensure_network", "ensure_profile", "ensure_group_member",
         "ensure_address_lock", "ensure_network_privileges", "remove_legacy_grants")


@pytest.mark.parametrize(("ranges_added", "answering", "restart"), [
    (False, True, False), (True, False, False), (True, True, True),  # restart only a running daemon
])
def test_setup_runs_every_step_in_order_with_the_client_given(monkeypatch, ranges_added, answering, restart):
    calls: dict[str, tuple[tuple, dict]] = {}
    client = object()

    def step(name):
        def run(*args, **kw):
            calls[name] = (args, kw)
            return {"ensure_subids": ranges_added, "ensure_storage_pool": "pool", "ensure_network": "net"}.get(name)
        return run
    for name in ("require_root", *STEPS):
        monkeypatch.setattr(coi.host, name, step(name))
    monkeypatch.setattr(coi.host, "answers", lambda c: answering)
    assert coi.host.setup(client, report=lambda s: None, group="g", user="u") is False
    assert list(calls) == ["require_root", *STEPS]
    assert [name for name, (args, kw) in calls.items() if client in args] == [
        "start_daemon", "ensure_storage_pool", "ensure_network", "ensure_profile"]
    assert calls["start_daemon"][1] == {"group": "g", "restart": restart}
    assert calls["ensure_profile"][1] == {"pool": "pool", "network": "net"}


def test_setup_says_whether_anything_changed(monkeypatch):
    for name in STEPS:
        monkeypatch.setattr(coi.host, name, lambda *a, **kw: None)
    monkeypatch.setattr(coi.host, "require_root", lambda: None)
    monkeypatch.setattr(coi.host, "answers", lambda c: True)
    monkeypatch.setattr(coi.host, "ensure_group_member", lambda user, group, report: report(Step("group", True, "x")))
    seen: list[Step] = []
    assert coi.host.setup(object(), report=seen.append, group="g", user="u") is True
    assert seen == [Step("group", True, "x")]


def test_setup_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CoiError) as info:
        coi.host.setup(object(), report=lambda s: None, group="g", user=None)
    assert info.value.hint == "run 'sudo coi setup'"
