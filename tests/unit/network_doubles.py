"""Test doubles for coi.network's unit tests: a stub of the Incus client calls the
package makes, and host nftables that record the scripts coi's helper would run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from coi import network
from coi.config import default_config
from coi.errors import NotFoundError, OperationFailedError
from coi.network import helper, service

ATT = network.Attachment(container="coi-abc12345-1", nic="eth0", bridge="coibr0", veth="veth1234abcd",
                         ipv4="10.195.0.23", gateway="10.195.0.1", subnet="10.195.0.0/24")
NIC = {"type": "nic", "network": "coibr0", "name": "eth0"}


def net_config(**changes):
    return replace(default_config(env={"HOME": "/home/u"}).network, **changes)


class StubIncus:
    """Just the Incus client calls coi.network makes: one running container on coibr0
    (``devices``: its own NIC settings), the coi profile, the bridge and its leases, ACLs."""

    project = "default"
    path = "/nonexistent/unix.socket"

    def __init__(self, *, acl_error: str | None = None, devices=None, profile_nic=NIC,
                 subnet: str = "10.195.0.1/24", leases=()) -> None:
        self.acl_error, self.devices = acl_error, devices or {}
        self.profile_nic, self.subnet, self.leases = profile_nic, subnet, list(leases)
        self.acls: dict[str, dict] = {}
        self.updates: list[dict] = []
        self.deleted: list[str] = []

    def instance(self, name):
        return {"name": name, "status": "Running", "config": {"volatile.eth0.host_name": "veth1234abcd"},
                "devices": self.devices, "expanded_devices": {"eth0": dict(NIC)}}

    def instance_state(self, name):
        return {"status": "Running", "network": {"eth0": {"host_name": "veth1234abcd", "addresses": [
            {"family": "inet", "address": "10.195.0.23", "scope": "global"}]}}}

    def profile(self, name):
        return {"devices": {"root": {"type": "disk", "path": "/", "pool": "coi"},
                            **({"eth0": self.profile_nic} if self.profile_nic else {})}}

    def network(self, name):
        return {"config": {"ipv4.address": self.subnet}}

    def network_leases(self, name):
        return [{"address": a, "type": "dynamic"} for a in self.leases]

    def network_acls(self):
        return [{"name": name, **body} for name, body in self.acls.items()]

    def put_network_acl(self, name, **body):
        if name not in self.acls:
            raise NotFoundError(name)
        self.acls[name] = body

    def create_network_acl(self, name, **body):
        self.acls[name] = body

    def delete_network_acl(self, name):
        self.deleted.append(name)
        self.acls.pop(name, None)

    def update_instance(self, name, *, devices=None, config=None):
        self.updates.append(devices)
        if self.acl_error:
            raise OperationFailedError(self.acl_error)


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
