"""coi doctor: each check against the fake daemon (through the client it is given), the
pure version check, and the rendering of the report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from coi.cli.render import render_checks
from coi.cli.ui import UI
from coi.config import Config, load_config
from coi.host import Check, check_nftables, doctor, run_checks
from coi.host.daemon import COI_NETWORK, COI_PROFILE
from coi.incus import Incus
from fake_incus import FakeDaemon, error, sync

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
    """The host's own nftables and network backend are not what these tests are about."""
    monkeypatch.setattr(doctor, "check_nftables", lambda: Check("nftables", "ok", "x", blocking=False))
    monkeypatch.setattr(doctor, "check_network", lambda config: Check("network isolation", "ok", "x"))


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_daemon_with_everything_passes(client, config, fake):
    checks = by_name(run_checks(client, config))
    assert checks["daemon"] == Check("daemon", "ok", f"Incus 6.0.3 answers on {fake.path}")
    assert {name: checks[name].status for name in (
        "storage", "bridge", "profile", "idmapped mounts", "image", "autostart")} == dict.fromkeys((
            "storage", "bridge", "profile", "idmapped mounts", "image", "autostart"), "ok")
    assert checks["storage"].detail == "pool coi (btrfs): fast clones"  # the profile's pool, not the first
    assert checks["image"].detail == "image coi present (Node.js v22.12.0)"
    assert list(checks)[-1] == "tmux"


def test_a_daemon_out_of_reach_skips_the_incus_checks(tmp_path, config):
    checks = run_checks(Incus(str(tmp_path / "none.socket")), config)
    names = [c.name for c in checks]
    assert by_name(checks)["daemon"].status == "fail" and "storage, bridge, profile, image" in names
    assert not {"storage", "bridge", "profile", "image", "autostart"} & set(names)


def test_a_failing_probe_is_one_failed_check(client, config, fake):
    fake.on("GET", f"/1.0/networks/{COI_NETWORK}", error("not found", 404))
    assert by_name(run_checks(client, config))["bridge"] == Check(
        "bridge", "fail", f"network {COI_NETWORK}: not found", None)


@pytest.mark.parametrize(("route", "reply", "name", "status", "detail"), [
    pytest.param("/1.0/storage-pools", sync([]), "storage", "fail", "no storage pool", id="no-pool"),
    pytest.param("/1.0/storage-pools", sync([{"name": "coi", "driver": "dir"}]), "storage", "warn",
                 "pool coi (dir): every container start unpacks the image", id="dir-pool"),
    pytest.param(f"/1.0/profiles/{COI_PROFILE}", error("not found", 404), "storage", "warn",
                 "pool default (dir): every container start unpacks the image", id="no-profile-first-pool"),
    pytest.param(f"/1.0/networks/{COI_NETWORK}", sync({"config": {"ipv4.address": "none"}}), "bridge", "fail",
                 f"bridge {COI_NETWORK} has no IPv4 subnet", id="bridge-without-ipv4"),
    pytest.param(f"/1.0/networks/{COI_NETWORK}", sync({"config": {"ipv4.address": "10.1.0.1/24"}}), "bridge",
                 "warn", f"bridge {COI_NETWORK} 10.1.0.1/24, NAT off", id="bridge-without-nat"),
    pytest.param(f"/1.0/profiles/{COI_PROFILE}", sync({"devices": {"root": {"pool": "coi"}}}), "profile",
                 "fail", f"profile {COI_PROFILE} lacks eth0", id="profile-without-nic"),
    pytest.param("/1.0", sync({"environment": {"kernel_features": {}}}), "idmapped mounts", "warn",
                 "no idmapped mounts: workspaces fall back to raw.idmap", id="no-idmapped-mounts"),
    pytest.param("/1.0/images/aliases/coi", error("not found", 404), "image", "warn", "image coi not built yet",
                 id="no-image"),
    pytest.param("/1.0/images/f1", sync({"properties": {"coi.kind": "coi", "coi.node": "v20.1.0"}}), "image",
                 "warn", "image coi has Node.js v20.1.0; the agents need 22 or newer", id="old-node"),
    pytest.param("/1.0/images/f1", sync({"properties": {"coi.kind": "coi"}}), "image", "warn",
                 "image coi has Node.js of an older build; the agents need 22 or newer", id="no-node-recorded"),
    pytest.param("/1.0/images/f1", sync({"properties": {}}), "image", "ok", "image coi present",
                 id="not-coi-s-own-image"),
    pytest.param("/1.0/instances", sync([{**SESSION, "config": {"user.coi.workspace": "/w"}},
                                         {"name": "coi-other", "config": {}}]), "autostart", "warn",
                 "1 coi container(s) start again after a host reboot: coi-1a2b3c4d-1", id="autostart"),
])
def test_each_incus_check(client, config, fake, route, reply, name, status, detail):
    fake.on("GET", route, reply)
    check = by_name(run_checks(client, config))[name]
    assert (check.status, check.detail) == (status, detail)
    assert check.hint if status != "ok" else check.hint is None


@pytest.mark.parametrize(("version", "ok"), [
    ("v22.12.0", True), ("22.0.0", True), ("v23", True), ("v100.1.2", True),
    ("v21.9.9", False), ("20.1.0", False), ("", False), ("vx.1", False), ("node", False),
])
def test_node_ok(version, ok):
    assert doctor.node_ok(version) is ok


def test_check_nftables_without_nft(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    assert check_nftables() == Check("nftables", "warn",
                                     "nft is not installed (needed for network isolation)",
                                     "run 'sudo coi setup'", blocking=False)


@pytest.mark.parametrize(("mode", "mine", "status"), [
    pytest.param(0o700, True, "ok", id="private"),
    pytest.param(0o755, True, "warn", id="readable-by-others"),
    pytest.param(0o700, False, "fail", id="someone-else-s"),
    pytest.param(None, True, "ok", id="not-made-yet"),
])
def test_the_state_directory(tmp_path, monkeypatch, mode, mine, status):
    path = tmp_path / "state"
    if mode is not None:
        path.mkdir()
        path.chmod(mode)
    owner = os.stat(tmp_path).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner if mine else owner + 1)
    config = load_config(workspace=None, env={"HOME": str(tmp_path), "COI_SESSIONS_DIR": str(path)},
                         system_file=tmp_path / "none.toml").config
    assert doctor.check_state_dir(config).status == status


# ---- the report as text and JSON --------------------------------------------------------------

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
