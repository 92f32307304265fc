"""``[limits] disk`` against the real daemon: the container gets a root disk of its own,
the coi profile's with the size asked for, and Incus reports that size (and, on a pool
whose driver enforces it, writing past it fails)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

ENFORCING = ("zfs", "lvm")  # btrfs qgroups are accounted late: a write may pass (docs/security.md)


@pytest.fixture
def disk_user(session_user):
    config = session_user.home / ".config" / "coi" / "config.toml"
    original = config.read_text()
    config.write_text(original + '\n[limits]\ndisk = "2GiB"\n')
    yield session_user
    config.write_text(original)


def test_limits_disk_sets_the_size_of_the_containers_root_disk(disk_user, workspace, incus):
    name = disk_user.background(workspace, "--debug")["container"]
    inst = incus.instance(name)
    profile_root = incus.profile("coi")["devices"]["root"]
    assert inst["devices"]["root"] == {**profile_root, "size": "2GiB"}  # its own, on the profile's pool
    assert inst["expanded_devices"]["root"]["size"] == "2GiB"  # what Incus uses
    assert incus.profile("coi")["devices"]["root"].get("size") is None  # the profile is left alone
    driver = next(p["driver"] for p in incus.storage_pools() if p["name"] == profile_root["pool"])
    if driver in ENFORCING:
        # 2.5 GiB into a 2 GiB root disk (the image's files count too): refused by the pool.
        result = incus.exec(name, ["sh", "-c", "head -c 2560M /dev/zero > /var/tmp/fill; s=$?; sync; "
                                                "rm -f /var/tmp/fill; exit $s"])
        assert result.exit_code != 0, "writing past [limits] disk succeeded"  # (head's own words vary)
    listed = disk_user.run(["list", "--format", "json"], cwd=workspace).stdout
    assert '"disk": "2GiB"' in listed
    assert disk_user.run(["kill", name], cwd=workspace).returncode == 0
