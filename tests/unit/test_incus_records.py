"""Reading Incus's records (coi.incus.records): the one place an instance's IPv4 is read."""

from __future__ import annotations

import pytest

from coi.incus.records import ipv4_address, ipv4_addresses

pytestmark = pytest.mark.unit


def nic(*addresses, name="eth0"):
    return {name: {"addresses": [dict(family=f, scope=s, address=a) for f, s, a in addresses]}}


STATE = {"network": {**nic(("inet6", "global", "fd00::2"), ("inet", "link", "169.254.0.2"),
                           ("inet", "global", "10.9.0.4"), ("inet", "global", "10.9.0.5")),
                     **nic(("inet", "global", "10.8.0.1"), name="eth1"),
                     **nic(("inet", "host", "127.0.0.1"), name="lo")}}


@pytest.mark.parametrize("state, name, address", [
    (STATE, "eth0", "10.9.0.4"), (STATE, "eth1", "10.8.0.1"), (STATE, "eth2", None),
    ({"network": nic(("inet6", "global", "fd42::1"))}, "eth0", None),
    ({"network": {"eth0": {"addresses": None}}}, "eth0", None),
    ({"network": {"eth0": {"addresses": ["junk", {"family": "inet", "scope": "global"}]}}}, "eth0", None),
    ({"network": None}, "eth0", None), ({}, "eth0", None), (None, "eth0", None),
])
def test_the_first_global_address_of_a_nic(state, name, address):
    assert ipv4_address(state, name) == address


@pytest.mark.parametrize("kw, found", [
    ({}, ["10.9.0.4", "10.9.0.5", "10.8.0.1"]),
    ({"global_only": False}, ["169.254.0.2", "10.9.0.4", "10.9.0.5", "10.8.0.1"]),
    ({"nic": "eth1"}, ["10.8.0.1"]),
    ({"nic": "lo", "global_only": False}, ["127.0.0.1"]),
])
def test_every_address_but_loopback(kw, found):
    assert ipv4_addresses(STATE, **kw) == found
