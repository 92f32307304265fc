"""coi doctor: each check against the fake daemon (through the client it is given), the
pure version check, --fix's repairs against the in-memory FakeIncus, the statuses and
exit codes, and the rendering of the report as text and JSON."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

import coi.host
from coi.cli.main import main
from coi.cli.render import render_health
from coi.cli.ui import UI
from coi.config import Config, load_config
from coi.errors import CoiError, DaemonUnavailableError
from coi.host import Check, Fix, Health, Step, check_nftables, daemon, diagnose, doctor, run_checks
from coi.host.daemon import COI_NETWORK, COI_PROFILE, profile_devices
from coi.host.doctor import REPAIRS, Repair, check_address_lock, check_network  # the real ones (patched below)
from coi.incus import DEFAULT_SOCKET, Incus
from fake_incus import FakeDaemon, FakeIncus, error, sync

pytestmark = pytest.mark.unit

COI_DEVICES = {"root": {"type": "disk", "path": "/", "pool": "coi"},
               "eth0": {"type": "nic", "name": "eth0", "network": COI_NETWORK}}
SESSION = {"name": "coi-1a2b3c4d-1", "config": {"user.coi.workspace": "/w", "boot.autostart": "false"}}


@pytest.fixture
def fake(daemon: FakeDaemon) -> FakeDaemon:
    """A daemon that has everything coi setup gives it, and a built coi image."""
    daemon.on("GET", "/1.0", sync({"environment": {"server_version": "6.0.3",
                                                   "kernel_features": {"idmapped_mounts": "true"}}}))
    daemon.on("GET", "/1.0/storage-pools", sync([{"name": "default", "driver": "dir"},
                                                 {"name": "coi", "driver": "btrfs"}]))
    daemon.on("GET", f"/1.0/profiles/{COI_PROFILE}", sync({"config": {}, "devices": COI_DEVICES}))
    daemon.on("GET", f"/1.0/networks/{COI_NETWORK}",
              sync({"config": {"ipv4.address": "10.195.0.1/24", "ipv4.nat": "true"}}))
    daemon.on("GET", "/1.0/images/aliases/coi", sync({"name": "coi", "target": "f1"}))
    daemon.on("GET", "/1.0/images/f1", sync({"properties": {"coi.kind": "coi", "coi.node": "v22.12.0"}}))
    daemon.on("GET", "/1.0/instances", sync([SESSION]))
    return daemon


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(workspace=None, env={"HOME": str(tmp_path)}, system_file=tmp_path / "none.toml").config


@pytest.fixture(autouse=True)
def host_checks(monkeypatch):
    """The host's own nftables, network backend, address lock, rules and egress proxy are
    not what these tests are about (and no test here runs nft or connects anywhere)."""
    monkeypatch.delenv("COI_CONTAINER_PREFIX", raising=False)
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # coi doctor narrows it; restored after the test
    monkeypatch.setattr(doctor, "check_nftables", lambda: Check("nftables", "ok", "x"))
    monkeypatch.setattr(doctor, "check_network", lambda config: Check("network isolation", "ok", "x"))
    monkeypatch.setattr(doctor, "check_address_lock", lambda config: Check("address lock", "ok", "x"))
    monkeypatch.setattr(doctor, "orphaned_rules", lambda client, config: [])
    from coi.network import proxy
    monkeypatch.setattr(proxy, "status", lambda network_dir, listen: (True, False, None))


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# ---- the checks ---------------------------------------------------------------------------------

def test_a_daemon_with_everything_passes(client, config, fake):
    checks = by_name(run_checks(client, config))
    assert checks["daemon"] == Check("daemon", "ok", f"Incus 6.0.3 answers on {fake.path}")
    names = ("storage", "bridge", "profile", "idmapped mounts", "image", "autostart", "egress proxy", "network rules")
    assert {name: checks[name].status for name in names} == dict.fromkeys(names, "ok")
    assert checks["storage"].message == "pool coi (btrfs): fast clones"  # the profile's pool, not the first
    assert checks["image"].message == "image coi present (Node.js v22.12.0)"
    assert list(checks)[-1] == "tmux"


def test_a_daemon_out_of_reach_skips_the_incus_checks(tmp_path, config):
    checks = run_checks(Incus(str(tmp_path / "none.socket")), config)
    names = [c.name for c in checks]
    assert by_name(checks)["daemon"].status == "error" and "storage, bridge, profile, image" in names
    assert not {"storage", "bridge", "profile", "image", "autostart", "network rules"} & set(names)
    assert by_name(checks)["daemon"].repair is None  # not the daemon's own socket: --fix cannot start it


def test_a_failing_probe_is_one_failed_check(client, config, fake):
    fake.on("GET", f"/1.0/networks/{COI_NETWORK}", error("on fire", 500))
    bridge = by_name(run_checks(client, config))["bridge"]
    assert (bridge.status, bridge.message, bridge.repair) == ("error", f"network {COI_NETWORK}: on fire", None)


@pytest.mark.parametrize(("route", "reply", "name", "status", "message"), [
    pytest.param("/1.0/storage-pools", sync([]), "storage", "error", "no storage pool", id="no-pool"),
    pytest.param("/1.0/storage-pools", sync([{"name": "coi", "driver": "dir"}]), "storage", "warning",
                 "pool coi (dir): every launch unpacks the image again", id="dir-pool"),
    pytest.param(f"/1.0/profiles/{COI_PROFILE}", error("not found", 404), "storage", "warning",
                 "pool default (dir): every launch unpacks the image again", id="no-profile-first-pool"),
    pytest.param(f"/1.0/networks/{COI_NETWORK}", error("not found", 404), "bridge", "error",
                 f"bridge {COI_NETWORK} does not exist", id="no-bridge"),
    pytest.param(f"/1.0/networks/{COI_NETWORK}", sync({"config": {"ipv4.address": "none"}}), "bridge", "error",
                 f"bridge {COI_NETWORK} has no IPv4 subnet", id="bridge-without-ipv4"),
    pytest.param(f"/1.0/networks/{COI_NETWORK}", sync({"config": {"ipv4.address": "10.1.0.1/24"}}), "bridge",
                 "warning", f"bridge {COI_NETWORK} 10.1.0.1/24, NAT off", id="bridge-without-nat"),
    pytest.param(f"/1.0/profiles/{COI_PROFILE}", error("not found", 404), "profile", "error",
                 f"profile {COI_PROFILE} does not exist", id="no-profile"),
    pytest.param(f"/1.0/profiles/{COI_PROFILE}", sync({"devices": {"root": {"pool": "coi"}}}), "profile",
                 "error", f"profile {COI_PROFILE} lacks eth0", id="profile-without-nic"),
    pytest.param("/1.0", sync({"environment": {"kernel_features": {}}}), "idmapped mounts", "warning",
                 "no idmapped mounts: workspaces fall back to raw.idmap", id="no-idmapped-mounts"),
    pytest.param("/1.0/images/aliases/coi", error("not found", 404), "image", "warning", "image coi not built yet",
                 id="no-image"),
    pytest.param("/1.0/images/f1", sync({"properties": {"coi.kind": "coi", "coi.node": "v20.1.0"}}), "image",
                 "warning", "image coi has Node.js v20.1.0; the agents need 22 or newer", id="old-node"),
    pytest.param("/1.0/images/f1", sync({"properties": {"coi.kind": "coi"}}), "image", "warning",
                 "image coi has Node.js of an older build; the agents need 22 or newer", id="no-node-recorded"),
    pytest.param("/1.0/images/f1", sync({"properties": {}}), "image", "ok", "image coi present",
                 id="not-coi-s-own-image"),
    pytest.param("/1.0/instances", sync([{**SESSION, "config": {"user.coi.workspace": "/w"}},
                                         {"name": "coi-other", "config": {}}]), "autostart", "warning",
                 "1 coi container(s) start again after a host reboot: coi-1a2b3c4d-1", id="autostart"),
])
def test_each_incus_check(client, config, fake, route, reply, name, status, message):
    fake.on("GET", route, reply)
    check = by_name(run_checks(client, config))[name]
    assert (check.status, check.message) == (status, message)
    assert check.fix if status != "ok" else check.fix is None


@pytest.mark.parametrize(("pools", "pool"), [
    pytest.param([{"name": "default", "driver": "dir"}], "coi", id="a-new-coi-pool"),
    pytest.param([{"name": "coi", "driver": "dir"}], "coi-btrfs", id="coi-is-taken"),
])
def test_a_dir_pool_says_how_to_get_a_fast_one(client, config, fake, pools, pool):
    fake.on("GET", "/1.0/storage-pools", sync(pools))
    fake.on("GET", f"/1.0/profiles/{COI_PROFILE}", sync({"devices": {"root": {"pool": pools[0]["name"]}}}))
    storage = by_name(run_checks(client, config))["storage"]
    assert storage.status == "warning" and storage.repair is None  # --fix leaves storage alone
    assert f"incus storage create {pool} btrfs" in storage.fix
    assert f"incus profile device set {COI_PROFILE} root pool={pool}" in storage.fix


@pytest.mark.parametrize(("route", "name", "repair"), [
    ("/1.0/storage-pools", "storage", "incus"),
    (f"/1.0/networks/{COI_NETWORK}", "bridge", "incus"),
    (f"/1.0/profiles/{COI_PROFILE}", "profile", "incus"),
])
def test_what_is_missing_in_incus_names_its_repair(client, config, fake, route, name, repair):
    fake.on("GET", route, sync([]) if name == "storage" else error("not found", 404))
    assert by_name(run_checks(client, config))[name].repair == repair


def test_rules_of_vanished_containers(client, config, fake, monkeypatch):
    monkeypatch.setattr(doctor, "orphaned_rules", lambda client, config: ["coi-gone-1", "coi-gone-2"])
    rules = by_name(run_checks(client, config))["network rules"]
    assert rules == Check("network rules", "warning", "rules of 2 container(s) that no longer exist: "
                          "coi-gone-1, coi-gone-2", "run 'coi clean'", "network rules")


def test_rules_are_not_read_from_a_state_directory_that_is_not_yours(client, config, fake, monkeypatch):
    monkeypatch.setattr(doctor, "check_state_dir", lambda config: Check("state directory", "error", "x"))
    monkeypatch.setattr(doctor, "orphaned_rules", lambda client, config: pytest.fail("records read"))
    assert by_name(run_checks(client, config))["network rules"].status == "skip"


@pytest.mark.parametrize(("version", "ok"), [
    ("v22.12.0", True), ("22.0.0", True), ("v23", True), ("v100.1.2", True),
    ("v21.9.9", False), ("20.1.0", False), ("", False), ("vx.1", False), ("node", False),
])
def test_node_ok(version, ok):
    assert doctor.node_ok(version) is ok


def test_check_nftables_without_nft(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    assert check_nftables() == Check("nftables", "warning", "nft is not installed (needed for network isolation)",
                                     "run 'sudo coi setup'")


@pytest.mark.parametrize(("report", "status"), [("ok", "ok"), ("warn", "warning"), ("fail", "error")])
def test_network_isolation_that_cannot_be_enforced_is_an_error(monkeypatch, config, report, status):
    from coi import network

    monkeypatch.setattr(network, "backend_report",
                        lambda cfg, sessions_dir: network.BackendReport(report, "none", "d", "h"))
    assert check_network(config) == Check("network isolation", status, "none: d", "h")


@pytest.mark.parametrize(("mode", "mine", "status", "repair"), [
    pytest.param(0o700, True, "ok", None, id="private"),
    pytest.param(0o755, True, "warning", "state directory", id="readable-by-others"),
    pytest.param(0o700, False, "error", None, id="someone-else-s"),
    pytest.param(None, True, "ok", None, id="not-made-yet"),
])
def test_the_state_directory(tmp_path, monkeypatch, mode, mine, status, repair):
    path = tmp_path / "state"
    if mode is not None:
        path.mkdir()
        path.chmod(mode)
    owner = os.stat(tmp_path).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner if mine else owner + 1)
    config = load_config(workspace=None, env={"HOME": str(tmp_path), "COI_SESSIONS_DIR": str(path)},
                         system_file=tmp_path / "none.toml").config
    check = doctor.check_state_dir(config)
    assert (check.status, check.repair) == (status, repair)


def _own_group(config: Config) -> tuple[Config, int]:
    gid = os.getgid()
    return replace(config, incus=replace(config.incus, group=grp.getgrgid(gid).gr_name)), gid


@pytest.mark.parametrize(("make", "status", "repair"), [
    pytest.param(lambda p, gid: (p.touch(0o660), os.chown(p, -1, gid), p.chmod(0o660)), "ok", None, id="shared"),
    pytest.param(lambda p, gid: None, "warning", "address lock", id="missing"),
    pytest.param(lambda p, gid: (p.touch(), p.chmod(0o600)), "warning", "address lock", id="private"),
    pytest.param(lambda p, gid: p.symlink_to("/etc/passwd"), "warning", "address lock", id="a-link"),
    pytest.param(lambda p, gid: p.mkdir(), "warning", "address lock", id="a-directory"),
])
def test_the_address_lock(tmp_path, monkeypatch, config, make, status, repair):
    config, gid = _own_group(config)
    lock = tmp_path / "addresses.lock"
    make(lock, gid)
    check = check_address_lock(config, path=lock)
    assert (check.status, check.repair) == (status, repair)
    assert check.fix == (None if status == "ok" else "run 'sudo coi doctor --fix' (or 'sudo coi setup')")


def test_the_address_lock_of_a_group_that_does_not_exist(tmp_path, monkeypatch, config):
    config = replace(config, incus=replace(config.incus, group="no-such-group-here"))
    check = check_address_lock(config, path=tmp_path / "addresses.lock")
    assert (check.status, check.repair) == ("warning", None) and "does not exist" in check.message


# ---- --fix ------------------------------------------------------------------------------------------

def healthy() -> FakeIncus:
    """An in-memory Incus with everything coi setup gives it, a coi image and one session."""
    fake = FakeIncus()
    fake.server_info = {"environment": {"server_version": "6.0.4", "kernel_features": {"idmapped_mounts": "true"}}}
    fake.pools["coi"] = {"name": "coi", "driver": "btrfs"}
    fake.networks_by_name[COI_NETWORK] = {"name": COI_NETWORK, "config": {"ipv4.address": "10.195.0.1/24",
                                                                          "ipv4.nat": "true"}}
    fake.profiles[COI_PROFILE] = {"name": COI_PROFILE, "config": {}, "devices": profile_devices("coi", COI_NETWORK)}
    fake.add_image(["coi"], properties={"coi.kind": "coi", "coi.node": "v22.12.0"})
    fake.instances_by_name[SESSION["name"]] = {**SESSION, "config": dict(SESSION["config"]), "status": "Running"}
    return fake


@pytest.fixture
def no_ip(monkeypatch):
    """ensure_network reads the host's routes with ``ip``: none here."""
    monkeypatch.setattr(daemon, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 0, ""))


def statuses(health: Health, *names: str) -> dict[str, str]:
    return {c.name: c.status for c in health.checks if c.name in names}


def test_without_fix_nothing_is_repaired(config):
    fake = healthy()
    del fake.profiles[COI_PROFILE]
    health = diagnose(fake, config, repairs={"incus": Repair("x", lambda *a: pytest.fail("repaired"))})
    assert health.fixes == [] and statuses(health, "profile") == {"profile": "error"}


def test_fix_runs_the_repairs_of_what_is_broken_and_checks_again(config, monkeypatch, no_ip, tmp_path):
    """As a normal user: coi's bridge and profile made again, orphaned rules removed, the
    state directory narrowed, autostart turned off; the address lock needs root."""
    fake = healthy()
    del fake.networks_by_name[COI_NETWORK], fake.profiles[COI_PROFILE]
    fake.instances_by_name[SESSION["name"]]["config"].pop("boot.autostart")
    state = Path(config.paths.sessions_dir)
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    monkeypatch.setattr(doctor, "check_address_lock",
                        lambda config: Check("address lock", "warning", "missing", "x", "address lock"))
    monkeypatch.setattr(doctor, "ensure_address_lock", lambda *a, **kw: pytest.fail("root's repair ran"))
    orphans = ["coi-gone-1"]
    monkeypatch.setattr(doctor, "orphaned_rules", lambda client, config: list(orphans))
    cleaned = []

    def clean_orphans(existing, **kw):
        cleaned.append((existing, kw))
        orphans.clear()
        return ["coi-gone-1"]
    import coi.network
    monkeypatch.setattr(coi.network, "clean_orphans", clean_orphans)

    health = diagnose(fake, config, fix=True, root=False)

    assert [(f.checks, f.status) for f in health.fixes] == [
        (("bridge", "profile"), "fixed"), (("address lock",), "needs_root"), (("network rules",), "fixed"),
        (("state directory",), "fixed"), (("autostart",), "fixed")]
    fixes = {f.checks[0]: f for f in health.fixes}
    assert fixes["bridge"].message.startswith(f"created bridge {COI_NETWORK} with 10.195.0.1/24")
    assert f"created profile {COI_PROFILE} (pool coi, bridge {COI_NETWORK})" in fixes["bridge"].message
    assert fake.profiles[COI_PROFILE]["devices"] == profile_devices("coi", COI_NETWORK)
    assert fixes["address lock"].message == "needs root: run 'sudo coi doctor --fix' (or 'sudo coi setup')"
    assert fixes["network rules"].message == "removed the rules of coi-gone-1"
    [(existing, kw)] = cleaned
    assert existing == {SESSION["name"]} and kw["sessions_dir"] == config.paths.sessions_dir
    assert kw["privileged_command"] == config.network.privileged_command and kw["client"] is fake
    assert state.stat().st_mode & 0o777 == 0o700
    assert fake.instances_by_name[SESSION["name"]]["config"]["boot.autostart"] == "false"
    assert statuses(health, "bridge", "profile", "network rules", "state directory", "autostart",
                    "address lock") == {"bridge": "ok", "profile": "ok", "network rules": "ok",
                                        "state directory": "ok", "autostart": "ok", "address lock": "warning"}


@pytest.fixture
def fixed_checks(monkeypatch):
    """``run_checks`` answers from a list the test's repairs change."""
    checks: dict[str, Check] = {}
    monkeypatch.setattr(doctor, "run_checks", lambda client, config: list(checks.values()))
    return checks


def test_the_fixes_run_in_the_order_of_the_repairs_each_once(config, fixed_checks):
    order = []
    repairs = {key: Repair(key, lambda c, cfg, report, key=key: order.append(key)) for key in ("b", "a")}
    fixed_checks.update({"one": Check("one", "warning", "x", None, "a"), "two": Check("two", "error", "y", None, "b")})
    health = diagnose(FakeIncus(), config, fix=True, root=True, repairs=repairs)
    assert order == ["b", "a"]  # each once, though their checks still fail
    assert [(f.action, f.status) for f in health.fixes] == [("b", "failed"), ("a", "failed")]


def test_a_failing_fix_is_reported_and_the_next_still_runs(config, fixed_checks):
    fixed_checks.update({"one": Check("one", "error", "broken", "x", "first"),
                         "two": Check("two", "warning", "loose", "y", "second")})

    def boom(client, cfg, report):
        raise CoiError("disk on fire", "call the fire brigade")

    def works(client, cfg, report):
        fixed_checks["two"] = Check("two", "ok", "fine")
        report(Step("two", True, "tightened it"))

    def oserror(client, cfg, report):
        raise PermissionError(13, "Permission denied", "/var/lib/coi/addresses.lock")

    repairs = {"first": Repair("do one", boom), "second": Repair("do two", works), "third": Repair("do 3", oserror)}
    fixed_checks["three"] = Check("three", "warning", "x", None, "third")
    health = diagnose(FakeIncus(), config, fix=True, root=True, repairs=repairs)
    assert [f.to_json() for f in health.fixes] == [
        {"action": "do one", "checks": ["one"], "status": "failed",
         "message": "disk on fire (call the fire brigade)"},
        {"action": "do two", "checks": ["two"], "status": "fixed", "message": "tightened it"},
        {"action": "do 3", "checks": ["three"], "status": "failed",
         "message": "/var/lib/coi/addresses.lock: Permission denied"},
    ]
    assert health.status == "error"


def test_a_fix_whose_check_still_fails_did_not_work(config, fixed_checks):
    fixed_checks["one"] = Check("one", "warning", "still loose", None, "r")
    repairs = {"r": Repair("tighten", lambda c, cfg, report: report(Step("r", True, "tightened")))}
    [fix] = diagnose(FakeIncus(), config, fix=True, root=True, repairs=repairs).fixes
    assert (fix.status, fix.message) == ("failed", "tightened; still: one: still loose")


def test_root_s_repairs_are_not_tried_by_a_normal_user(config, fixed_checks):
    fixed_checks["lock"] = Check("address lock", "warning", "missing", None, "lock")
    ran = []
    repairs = {"lock": Repair("make the lock", lambda c, cfg, report: ran.append(1), root=True)}
    [fix] = diagnose(FakeIncus(), config, fix=True, root=False, repairs=repairs).fixes
    assert ran == [] and fix == Fix("make the lock", ("address lock",), "needs_root",
                                    "needs root: run 'sudo coi doctor --fix' (or 'sudo coi setup')")
    assert diagnose(FakeIncus(), config, fix=True, root=True, repairs=repairs).fixes[0].status != "needs_root"
    assert ran == [1]


def _stopped_daemon(monkeypatch, fake: FakeIncus) -> list:
    """``fake`` on the daemon's own socket, not answering until ``start_daemon`` ran."""
    fake.path = DEFAULT_SOCKET
    up = []

    def server():
        if not up:
            raise DaemonUnavailableError(f"the Incus daemon is not running (no socket at {DEFAULT_SOCKET})", "x")
        return fake.server_info
    fake.on("server", server)
    monkeypatch.setattr(doctor, "incus_installed", lambda: True)

    def start_daemon(client, report, *, group):
        up.append(group)
        report(Step("daemon", True, "started incusd"))
    monkeypatch.setattr(doctor, "start_daemon", start_daemon)
    return up


def test_a_started_daemon_lets_the_incus_repairs_run_next(config, monkeypatch, no_ip):
    fake = healthy()
    del fake.profiles[COI_PROFILE]
    up = _stopped_daemon(monkeypatch, fake)
    health = diagnose(fake, config, fix=True, root=True)
    assert up == [config.incus.group]
    assert [(f.checks, f.status) for f in health.fixes] == [(("daemon",), "fixed"), (("profile",), "fixed")]
    assert statuses(health, "daemon", "profile") == {"daemon": "ok", "profile": "ok"}


def test_a_stopped_daemon_needs_root(config, monkeypatch):
    fake = healthy()
    up = _stopped_daemon(monkeypatch, fake)
    health = diagnose(fake, config, fix=True, root=False)
    assert up == []
    assert [(f.checks, f.status) for f in health.fixes] == [(("daemon",), "needs_root")]
    assert health.status == "error"


def test_the_profile_keeps_the_pool_it_names(config, no_ip):
    fake = healthy()
    fake.pools["fast"] = {"name": "fast", "driver": "zfs"}
    fake.profiles[COI_PROFILE]["devices"] = {"root": {"type": "disk", "path": "/", "pool": "fast"}}
    diagnose(fake, config, fix=True, root=False)
    assert fake.profiles[COI_PROFILE]["devices"] == profile_devices("fast", COI_NETWORK)


def test_only_the_daemon_and_the_address_lock_need_root():
    assert [key for key, r in REPAIRS.items() if r.root] == ["daemon", "address lock"]
    assert list(REPAIRS)[0] == "daemon"  # first: the Incus checks need it


# ---- statuses, exit codes and the report --------------------------------------------------------

@pytest.mark.parametrize(("checks", "status"), [
    ([Check("a", "ok", "x"), Check("b", "skip", "y")], "ok"),
    ([Check("a", "ok", "x"), Check("b", "warning", "y")], "warning"),
    ([Check("a", "error", "x"), Check("b", "warning", "y")], "error"),
    ([], "ok"),
])
def test_the_report_s_status_is_its_worst_check_s(checks, status):
    assert Health(checks).status == status


@pytest.mark.parametrize(("status", "code"), [("ok", 0), ("warning", 1), ("error", 2)])
@pytest.mark.parametrize("fix", [False, True])
def test_exit_codes(monkeypatch, capsys, tmp_path, status, code, fix):
    seen = {}

    def fake_diagnose(client, config, *, fix):
        seen["fix"] = fix
        return Health([Check("a", "ok", "x"), Check("b", status, "y", "z")])
    monkeypatch.setattr(coi.host, "diagnose", fake_diagnose)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["doctor", "--format", "json", *(["--fix"] if fix else [])]) == code
    assert seen == {"fix": fix}
    assert json.loads(capsys.readouterr().out)["status"] == status


def test_a_broken_config_is_an_error_and_nothing_is_repaired(monkeypatch, capsys, tmp_path):
    (tmp_path / ".config" / "coi").mkdir(parents=True)
    (tmp_path / ".config" / "coi" / "config.toml").write_text("[defaults\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    seen = {}

    def fake_diagnose(client, config, *, fix):
        seen["fix"] = fix
        return Health([Check("daemon", "ok", "x")])
    monkeypatch.setattr(coi.host, "diagnose", fake_diagnose)
    assert main(["doctor", "--fix", "--format", "json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert seen == {"fix": False}
    assert report["checks"][0]["name"] == "config" and report["checks"][0]["status"] == "error"
    assert "invalid TOML" in report["checks"][0]["message"]


CHECKS = [
    Check("daemon", "ok", "Incus 6.0.3 answers on /var/lib/incus/unix.socket"),
    Check("storage", "warning", "pool default (dir): every launch unpacks the image again",
          "a btrfs pool makes launches clone it"),
    Check("id ranges", "error", "root has no subordinate id range in /etc/subuid", "run 'sudo coi setup'"),
    Check("address lock", "warning", "/var/lib/coi/addresses.lock is missing", "sudo", "address lock"),
    Check("image", "skip", "daemon not reachable"),
]
FIXES = [
    Fix("create coi's storage pool, bridge and profile", ("bridge", "profile"), "fixed", "created bridge coibr0"),
    Fix("make the address lock that coi users share", ("address lock",), "needs_root", "needs root: sudo"),
    Fix("remove the network rules of containers that no longer exist", ("network rules",), "failed", "no nft"),
]


def test_the_report_as_text(capsys):
    render_health(UI(), Health(CHECKS, FIXES), format="text")
    assert capsys.readouterr().out.splitlines() == [
        "fixed: bridge, profile (create coi's storage pool, bridge and profile): created bridge coibr0",
        "not fixed: address lock (make the address lock that coi users share): needs root: sudo",
        "could not fix: network rules (remove the network rules of containers that no longer exist): no nft",
        "",
        "[ ok ] daemon: Incus 6.0.3 answers on /var/lib/incus/unix.socket",
        "[warn] storage: pool default (dir): every launch unpacks the image again",
        "       fix: a btrfs pool makes launches clone it",
        "[FAIL] id ranges: root has no subordinate id range in /etc/subuid",
        "       fix: run 'sudo coi setup'",
        "[warn] address lock: /var/lib/coi/addresses.lock is missing",
        "       fix: sudo",
        "[skip] image: daemon not reachable",
        "1 required check(s) failed: id ranges",
    ]


@pytest.mark.parametrize(("checks", "last"), [
    (CHECKS[:1], "All checks passed."),
    (CHECKS[:2], "All required checks passed; 1 warning(s): storage"),
])
def test_the_text_report_s_last_line(capsys, checks, last):
    render_health(UI(), Health(checks), format="text")
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == last and out[0].startswith("[ ok ]")  # no fixes: no fix lines


def test_the_report_as_json(capsys):
    render_health(UI(), Health(CHECKS, FIXES), format="json")
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["status", "checks", "fixes"] and data["status"] == "error"
    assert data["checks"][1] == {"name": "storage", "status": "warning",
                                 "message": "pool default (dir): every launch unpacks the image again",
                                 "fix": "a btrfs pool makes launches clone it"}
    assert data["checks"][4] == {"name": "image", "status": "skip", "message": "daemon not reachable", "fix": None}
    assert data["fixes"][1] == {"action": "make the address lock that coi users share", "checks": ["address lock"],
                                "status": "needs_root", "message": "needs root: sudo"}
    assert {c["status"] for c in data["checks"]} <= {"ok", "warning", "error", "skip"}
    assert {f["status"] for f in data["fixes"]} <= {"fixed", "failed", "needs_root"}


def test_fix_is_a_flag_of_doctor_and_offered_by_completion():
    from coi.cli.completion import command_table
    from coi.cli.parser import build_parser

    assert {"--fix", "--format"} <= set(command_table(build_parser())["doctor"]["flags"].split())
    text = build_parser(only="doctor").parse_args(["doctor", "--fix"])
    assert text.fix is True and text.format == "text"
