"""The network backend coi picks on this host, for tests that look at the rules.

coi tries Incus network ACLs first and falls back to host nftables where the
kernel refuses them (no bridge-family conntrack). A test that asserts on rules,
not only on traffic, asks ``coi_backend`` which backend that is here instead of
assuming one: the fixture runs coi's own choice once per test run
(``coi.network.apply`` on a fresh container, as a session start does, then
``Backends.named`` on what the container's record says, as ``remove`` and the
watcher do). Import the fixture into a test module to use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from coi import network

from conftest import TEST_PREFIX


@pytest.fixture(scope="session")
def coi_backend(incus, sandbox_image, tmp_path_factory) -> network.Backend:
    """The backend coi's session start lands on here (as root: nft in-process)."""
    sessions_dir = tmp_path_factory.mktemp("backend-choice")
    name = f"{TEST_PREFIX}choice-{uuid.uuid4().hex[:8]}"
    incus.create_instance(name, image=sandbox_image, profiles=["coi"])
    try:
        incus.start(name)
        network.apply(incus, name, network.NetworkPolicy(mode="restricted"), sessions_dir=sessions_dir,
                      log=lambda line: None)
        kind = network.Store(sessions_dir).record(name)["backend"]
        network.remove(name, sessions_dir=sessions_dir, client=incus)
    finally:
        subprocess.run(["incus", "delete", "--force", name], capture_output=True)
    return network.Backends().named(kind, client=incus)


def uses_nft(backend: network.Backend) -> bool:
    return backend.name == network.NftBackend.name


def ruled_anywhere(incus) -> set[str]:
    """Containers that have rules in any backend here: for checks that nothing is left."""
    found: set[str] = set()
    for backend in network.Backends().present(incus):
        found |= backend.containers()
    return found


def nft_table(family: str) -> str:
    return subprocess.run(["nft", "list", "table", family, network.TABLE], capture_output=True, text=True).stdout


def rules_text(backend: network.Backend, incus, name: str) -> str:
    """The policy ``backend`` holds for ``name``, as text to look for addresses in: coi's
    inet nft table (chains and allowlist sets), or the container's Incus ACL."""
    if uses_nft(backend):
        return nft_table("inet")
    return json.dumps([acl for acl in incus.network_acls() if acl["name"] == name])


def acl_on_nic(incus, name: str, nic: str = "eth0") -> bool:
    """Whether the container's NIC carries its Incus ACL (the ACL backend's key)."""
    return (incus.instance(name).get("devices") or {}).get(nic, {}).get("security.acls") == name


def user_proxies(state_dir) -> list[int]:
    """The pids of coi's egress proxies serving the coi state directory ``state_dir``."""
    from coi.detached import argv_of

    mine = str(Path(state_dir) / "network").encode()  # the proxy's first argument
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and b"coi.network.proxy" in argv_of(int(p)) and mine in argv_of(int(p))]
