"""Test doubles for coi.network's unit tests: the shared FakeIncus set up as the
package sees it, and host nftables that record the scripts coi's helper would run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from coi import network
from coi.config import default_config
from coi.errors import OperationFailedError
from coi.network import helper, service
from fake_incus import FakeIncus

ATT = network.Attachment(container="coi-abc12345-1", nic="eth0", bridge="coibr0", veth="veth1234abcd",
                         ipv4="10.195.0.23", gateway="10.195.0.1", subnet="10.195.0.0/24")
NIC = {"type": "nic", "network": "coibr0", "name": "eth0"}


def net_config(**changes):
    """``[network]`` with ``changes``; allowlists by address unless asked (the proxy has tests of its own)."""
    changes.setdefault("allowlist_by", "address")
    return replace(default_config(env={"HOME": "/home/u"}).network, **changes)


def stub_incus(*, acl_error: str | None = None, devices=None, profile_nic=NIC, subnet: str = "10.195.0.1/24",
               leases=()) -> FakeIncus:
    """The shared FakeIncus as coi.network sees it: one running container on coibr0
    (``devices``: its own NIC settings), the coi profile, the bridge and its leases; an
    ``acl_error`` makes putting an ACL on the NIC fail as this kernel does."""
    fake = FakeIncus()
    fake.instances_by_name[ATT.container] = {
        "name": ATT.container, "status": "Running", "config": {"volatile.eth0.host_name": "veth1234abcd"},
        "devices": dict(devices or {}), "expanded_devices": {"eth0": dict(NIC)}, "profiles": ["coi"]}
    fake.states[ATT.container] = {"status": "Running", "network": {"eth0": {"host_name": "veth1234abcd", "addresses": [
        {"family": "inet", "address": "10.195.0.23", "scope": "global"}]}}}
    fake.profiles["coi"] = {"name": "coi", "config": {}, "devices": {
        "root": {"type": "disk", "path": "/", "pool": "coi"}, **({"eth0": profile_nic} if profile_nic else {})}}
    fake.networks_by_name["coibr0"] = {"name": "coibr0", "config": {"ipv4.address": subnet}}
    fake.leases["coibr0"] = [{"address": a, "type": "dynamic"} for a in leases]
    if acl_error:
        def refuse(name, **kw):
            raise OperationFailedError(acl_error)
        fake.on("update_instance", refuse)
    return fake


def updates(fake: FakeIncus) -> list:
    """The device changes coi asked for, in order."""
    return [c.kwargs.get("devices") for c in fake.called("update_instance")]


def deleted(fake: FakeIncus) -> list[str]:
    """The ACLs coi deleted, in order."""
    return [c[1] for c in fake.called("delete_network_acl")]


REFUSED = ('Failed to update device "eth0": Failed adding bridge filter rules ... Error: Could not process rule: '
           'Protocol error\n\tct state established,related accept')


class FakeNft(network.NftBackend):
    """Host nftables that record the script the helper would run for each request."""

    calls: list[str]  # set per test by the fixture
    listed: dict = {}

    def __init__(self, privileged_command=()):
        self.argv, self.via = [], ""

    def request(self, request, what):
        if request["action"] == "list":
            return json.dumps(self.listed)
        self.calls.append(helper.script_for(helper.validate(request)))
        return ""


@pytest.fixture
def fake():
    """``fake.backends`` for the service and the watcher, ``fake.calls`` for what nft got."""
    class Fake(FakeNft):
        calls: list[str] = []
        listed: dict = {"containers": [], "gate": True}

    Fake.backends = network.Backends(nft=Fake)
    return Fake


@pytest.fixture
def quiet_watcher(monkeypatch):
    monkeypatch.setattr(service, "_start_watcher", lambda *a, **k: None)


def apply(client, policy, tmp_path, fake, log=print):
    return network.apply(client, ATT.container, policy, sessions_dir=tmp_path, log=log, backends=fake.backends)
