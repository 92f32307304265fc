"""Where a container is attached (coi.network.attach): its NIC and address, names that
may carry rules, pinned NICs, the choice of a free address and the address lock."""

from __future__ import annotations

import ipaddress

import pytest

from coi import network
from coi.errors import CoiError
from coi.network import attach

from network_doubles import ATT, NIC, stub_incus


# ---- where the container is attached ----------------------------------------------------

def test_find_attachment_of_a_running_container_waits_for_its_address():
    assert network.find_attachment(stub_incus(), ATT.container) == ATT


@pytest.mark.parametrize("devices, found", [
    ({"eth0": NIC}, ("eth0", "coibr0")),
    ({"eth1": NIC, "eth0": {"type": "nic", "nictype": "bridged", "parent": "br0"}}, ("eth0", "br0")),
    ({"eth2": NIC, "eth1": NIC}, ("eth1", "coibr0")),
    ({"eth0": {"type": "nic", "nictype": "p2p"}, "eth1": NIC}, ("eth1", "coibr0")),
])
def test_the_nic_to_filter(devices, found):
    assert attach.bridged_nic({"name": "c", "expanded_devices": devices}) == found


@pytest.mark.parametrize("devices", [{}, {"root": {"type": "disk"}}, {"eth0": {"type": "nic", "nictype": "p2p"}}])
def test_a_container_without_a_bridged_nic_cannot_be_isolated(devices):
    with pytest.raises(CoiError, match="no NIC on a bridge") as err:
        attach.bridged_nic({"name": "c", "expanded_devices": devices})
    assert "--network=open" in err.value.hint


@pytest.mark.parametrize("name", ["", "1abc", "coi-", "coi_x", "coi x", "a;b", "coi-" + "x" * 63, 'a"b', "a.b"])
def test_names_that_cannot_carry_rules_are_refused(name):
    with pytest.raises(CoiError, match="cannot carry network rules"):
        network.check_name(name)


@pytest.mark.parametrize("name", ["a", "coi-abc12345-1", "C0-x", "a" * 63])
def test_names_that_can_carry_rules(name):
    assert network.check_name(name) == name


# ---- pinned addresses --------------------------------------------------------------------

def pin_client(**changes):
    return stub_incus(**{"subnet": "10.9.0.1/24", **changes})


def counting(start: int):
    """A deterministic ``rand``: the first 4 bytes pick the start, the rest name the interface."""
    return lambda n: start.to_bytes(4, "big") if n == 4 else bytes(range(n))


@pytest.mark.parametrize("subnet, used, start, address", [
    ("10.9.0.1/24", [], 0, "10.9.0.2"),  # .1 is the bridge
    ("10.9.0.1/24", ["10.9.0.2", "10.9.0.3", "junk", ""], 0, "10.9.0.4"),
    ("10.9.0.1/24", [], 253, "10.9.0.254"),
    ("10.9.0.1/24", [], 254, "10.9.0.2"),  # wraps, past the bridge
    ("10.9.0.1/24", ["10.9.0.254"], 253, "10.9.0.2"),
    ("10.9.0.254/24", [], 253, "10.9.0.1"),  # the bridge at the top of its subnet
    ("10.9.0.1/30", [], 7, "10.9.0.2"),
])
def test_choose_address(subnet, used, start, address):
    assert network.choose_address(ipaddress.IPv4Interface(subnet), used, rand=counting(start)) == address


def test_choose_address_random_start_stays_in_the_subnet():
    subnet = ipaddress.IPv4Interface("10.9.0.1/29")
    seen = {network.choose_address(subnet, [], rand=counting(n)) for n in range(50)}
    assert seen == {f"10.9.0.{i}" for i in range(2, 7)}


def test_choose_address_when_the_subnet_is_full():
    subnet = ipaddress.IPv4Interface("10.9.0.1/30")  # hosts .1 (bridge) and .2
    with pytest.raises(CoiError, match=r"no free IPv4 address left in 10\.9\.0\.0/30"):
        network.choose_address(subnet, ["10.9.0.2"])


def test_pin_nic_avoids_leases_and_other_containers_addresses():
    others = [{"expanded_devices": {"eth0": {"type": "nic", "network": "coibr0", "ipv4.address": "10.9.0.3"}}},
              {"expanded_devices": {"eth0": {"type": "nic", "network": "other", "ipv4.address": "10.9.0.4"}}},
              {"expanded_devices": {"root": {"type": "disk"}}}]
    pin = network.pin_nic(pin_client(leases=["10.9.0.2"]), others, rand=counting(0))
    assert pin.devices == {"eth0": {"type": "nic", "network": "coibr0", "name": "eth0",
                                    "ipv4.address": "10.9.0.4", "host_name": "coi000102030405"}}
    assert len(pin.devices["eth0"]["host_name"]) <= 15  # Linux interface names
    # LXC sets the same address and the route inside before init; DNS goes to the bridge
    assert pin.config == {"raw.lxc": "lxc.net.0.ipv4.address = 10.9.0.4/24 10.9.0.255\n"
                                     "lxc.net.0.ipv4.gateway = 10.9.0.1\n"}
    assert pin.files == {"/etc/resolv.conf": b"nameserver 10.9.0.1\n"}
    inst = {"name": "c", "expanded_devices": pin.devices}
    assert network.is_pinned(inst) and attach.pinned(inst, "eth0") == ("coi000102030405", "10.9.0.4")


@pytest.mark.parametrize("client", [pin_client(profile_nic={}),  # no NIC in the profile
                                    pin_client(profile_nic={"type": "nic", "nictype": "bridged", "parent": "br0"}),
                                    pin_client(subnet="none")])
def test_pin_nic_leaves_unmanaged_or_addressless_bridges_to_dhcp(client):
    assert network.pin_nic(client, []) is None


def test_pin_nic_only_with_one_nic():
    client = pin_client()
    profile = client.profile("coi")
    profile["devices"]["eth1"] = {"type": "nic", "network": "coibr0", "name": "eth1"}
    client.profile = lambda name: profile
    assert network.pin_nic(client, []) is None  # which one LXC calls lxc.net.0 is not ours to guess


@pytest.mark.parametrize("devices, pinned", [
    ({"eth0": NIC}, False),
    ({"eth0": {**NIC, "ipv4.address": "10.9.0.5"}}, False),
    ({"eth0": {**NIC, "host_name": "coi1"}}, False),
    ({"eth0": {**NIC, "ipv4.address": "10.9.0.5", "host_name": "coi1"}}, True),
    ({}, False),
])
def test_is_pinned_needs_both_address_and_interface_name(devices, pinned):
    assert network.is_pinned({"name": "c", "expanded_devices": devices}) is pinned


def test_address_lock_falls_back_to_a_per_user_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(attach, "ADDRESS_LOCK", tmp_path / "missing" / "addresses.lock")
    with network.address_lock(tmp_path / "locks"):
        assert (tmp_path / "locks" / "addresses.lock").exists()


@pytest.mark.parametrize("leases, instances, used", [
    ([], [], set()),
    (["10.9.0.2"], [], {"10.9.0.2"}),
    ([], [{"expanded_devices": {"eth0": {**NIC, "ipv4.address": "10.9.0.3"}}}], {"10.9.0.3"}),
    ([], [{"expanded_devices": {"eth0": {**NIC, "network": "other", "ipv4.address": "10.9.0.3"}}}], set()),
    ([], [{"expanded_devices": {"eth0": NIC}}], {""}),  # unpinned: nothing taken ("" is no address)
    ([], [{"expanded_devices": {"root": {"type": "disk", "network": "coibr0", "ipv4.address": "10.9.0.5"}}}], set()),
])
def test_used_addresses(leases, instances, used):
    assert attach.used_addresses(stub_incus(leases=leases), "coibr0", instances) == used
