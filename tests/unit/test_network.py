"""Network isolation without a daemon: the backend choice, apply/remove/clean, the
Backend protocol, the doctor's report and the watcher.

The backends come from ``Backends(nft=FakeNft)``: host nftables that record the
script coi's helper would run for each request (no nft, no sudo).
"""

from __future__ import annotations

import os
import time

import pytest

from coi import network
from coi.config import default_config
from coi.errors import CoiError, NotFoundError
from coi.network import backends, dns, service, watcher

from network_doubles import (ATT, REFUSED, FakeNft, apply, deleted, fake, net_config, quiet_watcher,  # noqa: F401
                             stub_incus, updates)


def test_rules_go_on_before_the_start_only_when_pinned_and_the_backend_is_known(tmp_path):
    pinned = {"name": "c", "expanded_devices": {"eth0": {"type": "nic", "network": "coibr0",
                                                         "ipv4.address": "10.9.0.4", "host_name": "coi1"}}}
    dhcp = {"name": "c", "expanded_devices": {"eth0": {"type": "nic", "network": "coibr0"}}}
    restricted = network.plan(default_config(env={}).network)
    # first session of this user: Incus takes ACLs on a stopped container and only
    # fails at the start where they cannot work, so the probe needs a running one
    assert not network.applies_before_start(pinned, restricted, tmp_path)
    network.Store(tmp_path).save_capability(network.AclBackend.name, False, "no bridge conntrack")
    assert network.applies_before_start(pinned, restricted, tmp_path)
    assert not network.applies_before_start(dhcp, restricted, tmp_path)
    assert network.applies_before_start(dhcp, network.plan(default_config(env={}).network, "open"), tmp_path)


# ---- the backends ----------------------------------------------------------------------------

def test_every_backend_is_a_backend(fake):
    for backend in (network.AclBackend(stub_incus()), fake(), network.OpenBackend()):
        assert isinstance(backend, network.Backend)


@pytest.mark.parametrize("name, kind", [
    ("incus-acl", network.AclBackend), ("open", network.OpenBackend),
    ("nftables", FakeNft), (None, FakeNft), ("unknown", FakeNft),  # no record: nft may still hold rules
])
def test_the_backend_a_record_names(fake, name, kind):
    assert isinstance(fake.backends.named(name, client=stub_incus()), kind)


def test_acl_removal_keeps_the_pinned_nic():
    nic = {"type": "nic", "network": "coibr0", "ipv4.address": "10.195.0.23", "host_name": "coi0123456789ab",
           "security.acls": ATT.container, "security.acls.default.egress.action": "allow",
           "security.ipv4_filtering": "true"}
    client = stub_incus(devices={"eth0": nic})
    network.AclBackend(client).remove(ATT.container)
    assert updates(client) == [{"eth0": {"type": "nic", "network": "coibr0", "ipv4.address": "10.195.0.23",
                                        "host_name": "coi0123456789ab", "security.ipv4_filtering": "true"}}]
    assert deleted(client) == [ATT.container]


def test_acl_containers_are_those_with_coi_s_description():
    client = stub_incus()
    client.acls = {"coi-a-1": {"description": network.ACL_DESCRIPTION + "coi-a-1"},
                   "theirs": {"description": "someone else's"}, "bare": {}}
    assert network.AclBackend(client).containers() == {"coi-a-1"}


# ---- the backend choice -----------------------------------------------------------------------------------

def test_refused_acls_fall_back_to_nftables_once_and_are_remembered(tmp_path, quiet_watcher, fake):
    client, lines = stub_incus(acl_error=REFUSED), []
    policy = network.plan(net_config(), None, env={})
    assert apply(client, policy, tmp_path, fake, lines.append) == "host nftables (inet + bridge)"
    assert client.acls == {} and len(updates(client)) == 1  # tried, refused, the ACL removed again
    assert "no bridge-family conntrack" in lines[0] and "falling back" in lines[0]
    assert len(fake.calls) == 1 and "add chain inet coi coi-abc12345-1.out" in fake.calls[0]
    lines.clear()
    apply(client, policy, tmp_path, fake, lines.append)
    assert lines == [] and len(updates(client)) == 1  # not tried again
    record = network.Store(tmp_path).record(ATT.container)
    assert (record["backend"], record["mode"], record["attachment"]["veth"]) == ("nftables", "restricted",
                                                                                "veth1234abcd")


def test_working_acls_are_used(tmp_path, quiet_watcher, fake):
    client = stub_incus()
    policy = network.plan(net_config(), None, env={})
    assert apply(client, policy, tmp_path, fake) == "Incus network ACLs"
    assert fake.calls == []  # a veth not named like coi's pinned ones: the gate does not hold it
    assert updates(client)[0]["eth0"]["security.acls"] == ATT.container
    assert client.acls[ATT.container]["description"].startswith(network.ACL_DESCRIPTION)
    assert network.Store(tmp_path).record(ATT.container)["backend"] == "incus-acl"


def test_acls_on_a_pinned_interface_open_the_gate_and_removal_shuts_it(tmp_path, quiet_watcher, fake, monkeypatch):
    client = stub_incus()
    pinned = {"type": "nic", "network": "coibr0", "ipv4.address": "10.195.0.23", "host_name": "coi0123456789ab"}
    monkeypatch.setattr(client, "instance", lambda name: {"name": name, "status": "Running", "config": {},
                                                          "devices": {}, "expanded_devices": {"eth0": pinned}})
    apply(client, network.plan(net_config(), None, env={}), tmp_path, fake)
    assert fake.calls == [network.nft_open_script("coi0123456789ab")]
    network.remove(ATT.container, sessions_dir=tmp_path, client=client, backends=fake.backends)
    assert fake.calls[1:] == [network.nft_close_script("coi0123456789ab")]
    assert deleted(client) == [ATT.container] and network.Store(tmp_path).record(ATT.container) is None


def test_fail_closed_without_any_backend(tmp_path, quiet_watcher, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    client = stub_incus(acl_error=REFUSED)
    with pytest.raises(CoiError) as err:
        network.apply(client, ATT.container, network.plan(net_config(), None, env={}), sessions_dir=tmp_path,
                      log=print)
    assert "cannot enforce network mode restricted" in err.value.message
    assert "no bridge-family conntrack" in err.value.message and "privileged_command" in err.value.message
    assert "--network=open" in err.value.hint
    assert network.Store(tmp_path).record(ATT.container) is None


def test_open_mode_removes_earlier_rules(tmp_path, quiet_watcher, fake):
    client = stub_incus(acl_error=REFUSED)
    apply(client, network.plan(net_config(), None, env={}), tmp_path, fake)
    fake.calls.clear()
    assert apply(client, network.plan(net_config(), "open", env={}), tmp_path, fake) == "open (no filtering)"
    assert fake.calls == [network.nft_remove_script(ATT.container)]
    assert network.Store(tmp_path).record(ATT.container) is None  # not pinned: nothing to open in the gate


def test_allowlist_with_no_resolvable_name_fails_closed(tmp_path, quiet_watcher, fake, monkeypatch):
    def nothing(name, server, timeout=2.0):
        raise network.ResolveError(f"{name}: no such name")
    monkeypatch.setattr(dns, "dns_query_a", nothing)
    policy = network.plan(net_config(allowed_domains=("gone.example",)), "allowlist", env={})
    with pytest.raises(CoiError, match="none of the allowed names resolved") as err:
        apply(stub_incus(acl_error=REFUSED), policy, tmp_path, fake)
    assert "--network=open" in err.value.hint
    assert fake.calls == []


def test_stale_rules_for_the_same_address_are_removed(tmp_path, quiet_watcher, fake):
    store = network.Store(tmp_path)
    store.save_record("coi-old-1", {"backend": "nftables", "attachment": {"ipv4": ATT.ipv4}, "policy": {"mode": "restricted"}})
    apply(stub_incus(acl_error=REFUSED), network.plan(net_config(), None, env={}), tmp_path, fake)
    assert network.nft_remove_script("coi-old-1") in fake.calls
    assert store.record("coi-old-1") is None


@pytest.mark.parametrize("record, raises", [
    ({"backend": "nftables"}, True),  # coi put nft rules on and cannot take them off: say so
    (None, False),  # no record: nothing coi knows of to take off
    ({"backend": "incus-acl", "attachment": {"veth": "coi0123456789ab"}}, False),  # the gate is best effort
])
def test_remove_when_nft_cannot_be_run(tmp_path, monkeypatch, record, raises):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    if record:
        network.Store(tmp_path).save_record(ATT.container, record)
    try:
        network.remove(ATT.container, sessions_dir=tmp_path, client=stub_incus())
    except CoiError as exc:
        assert raises and "could not remove the network rules" in exc.message
    else:
        assert not raises
        assert network.Store(tmp_path).record(ATT.container) is None


def test_clean_removes_rules_of_containers_that_are_gone_in_every_backend(tmp_path, fake):
    store = network.Store(tmp_path)
    for name in ("coi-gone-1", "coi-live-1"):
        store.save_record(name, {"backend": "nftables", "attachment": {"ipv4": "10.195.0.9"}})
    fake.listed = {"containers": ["coi-other-1", "coi-live-1", "bad name"], "gate": True}
    client = stub_incus()
    client.acls = {"coi-acl-1": {"description": network.ACL_DESCRIPTION + "coi-acl-1"},
                   "coi-live-1": {"description": network.ACL_DESCRIPTION + "coi-live-1"}}
    gone = network.clean_orphans({"coi-live-1"}, sessions_dir=tmp_path, client=client, backends=fake.backends)
    assert gone == ["coi-acl-1", "coi-gone-1", "coi-other-1"]
    assert fake.calls == [network.nft_remove_script("coi-gone-1"), network.nft_remove_script("coi-other-1")]
    assert list(client.acls) == ["coi-live-1"] and store.record("coi-live-1") is not None


def test_orphans_are_what_clean_would_remove_and_nothing_is_removed(tmp_path, fake):
    store = network.Store(tmp_path)
    for name in ("coi-gone-1", "coi-live-1"):
        store.save_record(name, {"backend": "nftables", "attachment": {"ipv4": "10.195.0.9"}})
    fake.listed = {"containers": ["coi-other-1", "coi-live-1", "bad name"], "gate": True}
    client = stub_incus()
    client.acls = {"coi-acl-1": {"description": network.ACL_DESCRIPTION + "coi-acl-1"}}
    assert network.orphans({"coi-live-1"}, sessions_dir=tmp_path, client=client, backends=fake.backends) == [
        "coi-acl-1", "coi-gone-1", "coi-other-1"]
    assert fake.calls == [] and list(client.acls) == ["coi-acl-1"] and store.record("coi-gone-1") is not None
    assert network.clean_orphans({"coi-live-1"}, sessions_dir=tmp_path, client=client,
                                 backends=fake.backends) == ["coi-acl-1", "coi-gone-1", "coi-other-1"]


def test_orphans_in_a_backend_that_cannot_be_read_are_not_reported(tmp_path, fake):
    class Unreadable(fake):
        def request(self, request, what):
            raise network.BackendUnavailable("sudo: a password is required")
    assert network.orphans(set(), sessions_dir=tmp_path, client=None,
                           backends=network.Backends(nft=Unreadable)) == []


def test_capabilities_learnt_on_another_kernel_are_probed_again(tmp_path, monkeypatch):
    store = network.Store(tmp_path)
    store.save_capability("incus-acl", False, "refused")
    assert store.capability("incus-acl")["usable"] is False
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "9.9.9", "#1", "x86_64")))
    assert store.capability("incus-acl") is None


def test_backend_report_without_privileges(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(backends.shutil, "which", lambda name: "/usr/sbin/nft")
    report = network.backend_report(net_config(), sessions_dir=tmp_path)
    assert report.status == "warn" and "privileged_command" in report.detail
    network.Store(tmp_path).save_capability("incus-acl", False, "no bridge-family conntrack")
    report = network.backend_report(net_config(), sessions_dir=tmp_path)
    assert report.status == "fail" and "--network=open" in report.hint


@pytest.mark.parametrize("capability, listed, status, backend", [
    ((True, ""), {"gate": False}, "ok", "Incus network ACLs"),
    ((False, "no conntrack"), {"gate": True}, "ok", "host nftables"),
    ((False, "no conntrack"), {"gate": False}, "warn", "host nftables"),
])
def test_backend_report(tmp_path, fake, capability, listed, status, backend):
    network.Store(tmp_path).save_capability("incus-acl", *capability)
    fake.listed = listed
    report = network.backend_report(net_config(), sessions_dir=tmp_path, backends=fake.backends)
    assert (report.status, report.backend) == (status, backend)


# ---- the watcher ----------------------------------------------------------------------------------------------

def test_the_watcher_runs_isolated_from_its_new_module():
    argv = network.watcher_argv("coi-test-abc-1", "/home/u/.coi")
    assert argv[1:] == ["-I", "-m", "coi.network.watcher", "coi-test-abc-1", "/home/u/.coi"]


def watched(tmp_path, monkeypatch, fake, *, mode="allowlist"):
    """A container with applied rules and a watcher over a stub client (no process, no daemon)."""
    monkeypatch.setattr(service, "_start_watcher", lambda *a, **k: None)
    answers = {"a.example": ["192.0.2.1"]}

    def query(name, server, timeout=2.0):
        if name in answers:
            return answers[name]
        raise network.ResolveError(f"{name}: no such name")
    monkeypatch.setattr(dns, "dns_query_a", query)
    client = stub_incus(acl_error=REFUSED)
    policy = network.plan(net_config(allowed_domains=("a.example",)), mode, env={})
    apply(client, policy, tmp_path, fake)
    fake.calls.clear()
    return watcher.Watcher(ATT.container, tmp_path, client, backends=fake.backends), client, answers


def test_watcher_refresh_swaps_addresses_and_keeps_them_when_lookups_fail(tmp_path, monkeypatch, fake):
    watch, _, answers = watched(tmp_path, monkeypatch, fake)
    policy = network.NetworkPolicy.from_json(watch.record()["policy"])
    watch._refresh(policy)
    assert fake.calls == []  # nothing changed
    answers["a.example"] = ["192.0.2.2", "192.0.2.2"]
    watch._refresh(policy)
    assert fake.calls == [network.nft_set_script(ATT.container, ["192.0.2.2"])]
    answers.clear()
    watch._refresh(policy)
    assert len(fake.calls) == 1 and watch.record()["addresses"] == ["192.0.2.2"]


def test_watcher_refresh_of_acls_replaces_the_acl(tmp_path, monkeypatch, fake):
    watch, client, answers = watched(tmp_path, monkeypatch, fake)
    record = watch.record()
    record["backend"] = "incus-acl"
    watch.store.save_record(ATT.container, record)
    client.acls[ATT.container] = {}
    answers["a.example"] = ["192.0.2.7"]
    watch._refresh(network.NetworkPolicy.from_json(record["policy"]))
    assert fake.calls == []
    assert client.acls[ATT.container]["egress"][0]["destination"] == "192.0.2.7"


def test_watcher_follows_a_restart_and_removes_rules_of_a_deleted_container(tmp_path, monkeypatch, fake):
    watch, client, _ = watched(tmp_path, monkeypatch, fake, mode="restricted")
    inst = client.instance(ATT.container)
    inst["config"]["volatile.eth0.host_name"] = "veth9999new0"
    state = client.instance_state(ATT.container)
    state["network"]["eth0"]["host_name"] = "veth9999new0"
    monkeypatch.setattr(client, "instance_state", lambda name: state)
    monkeypatch.setattr(client, "instance", lambda name: inst)
    record = watch.record()
    watch._follow_restart(record, network.NetworkPolicy.from_json(record["policy"]), inst)
    assert '"veth9999new0"' in fake.calls[-1] and watch.record()["attachment"]["veth"] == "veth9999new0"

    def gone(name):
        raise NotFoundError(name)
    monkeypatch.setattr(client, "instance", gone)
    assert watch.run() == 0
    assert fake.calls[-1] == network.nft_remove_script(ATT.container)
    assert watch.record() is None


def test_watcher_follows_a_restart_of_an_acl_container_without_new_rules(tmp_path, monkeypatch, fake):
    watch, client, _ = watched(tmp_path, monkeypatch, fake, mode="restricted")
    record = watch.record()
    record["backend"] = "incus-acl"
    inst = client.instance(ATT.container)
    inst["config"]["volatile.eth0.host_name"] = "veth9999new0"
    state = client.instance_state(ATT.container)
    state["network"]["eth0"]["host_name"] = "veth9999new0"
    monkeypatch.setattr(client, "instance_state", lambda name: state)
    watch._follow_restart(record, network.NetworkPolicy.from_json(record["policy"]), inst)
    assert fake.calls == []  # the ACL stays on the NIC across the restart
    assert watch.record()["attachment"]["veth"] == "veth9999new0"


def test_watcher_waits_out_a_reboot_before_removing_rules(tmp_path, monkeypatch, fake):
    watch, client, _ = watched(tmp_path, monkeypatch, fake, mode="restricted")
    monkeypatch.setattr(watcher, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(watcher, "STOPPED_GRACE", 0.2)
    running = client.instance(ATT.container)
    seen = []

    def stopped(name):
        seen.append(network.Store(tmp_path).record(ATT.container) is not None)
        return running if len(seen) == 1 else {"status": "Stopped", "config": {}}
    monkeypatch.setattr(client, "instance", stopped)
    assert watch.run() == 0
    assert len(seen) > 3 and all(seen)  # the rules stayed while the grace lasted
    assert fake.calls == [network.nft_remove_script(ATT.container)]


def test_watcher_gives_a_container_not_started_yet_longer(tmp_path, monkeypatch, fake):
    """Rules go on before the start: "Stopped" then means "not started yet" for a while."""
    watch, client, _ = watched(tmp_path, monkeypatch, fake, mode="restricted")
    monkeypatch.setattr(watcher, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(watcher, "STOPPED_GRACE", 0.01)
    monkeypatch.setattr(watcher, "START_GRACE", 0.3)
    polled = []
    monkeypatch.setattr(client, "instance", lambda name: polled.append(time.monotonic()) or
                        {"status": "Stopped", "config": {}})
    assert watch.run() == 0
    assert polled[-1] - polled[0] >= 0.3  # not removed after the short grace of a seen reboot
    assert fake.calls == [network.nft_remove_script(ATT.container)]


def test_the_watcher_process_starts_with_the_users_config_and_a_real_client(tmp_path, monkeypatch):
    """``python -I -m coi.network.watcher CONTAINER SESSIONS_DIR``: its main, up to the loop."""
    from coi.incus import Incus
    from coi.network import watcher
    from fake_incus import FakeIncus

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    made: list[FakeIncus] = []
    monkeypatch.setattr(Incus, "from_environment", classmethod(lambda cls, project: made.append(FakeIncus()) or made[0]))
    monkeypatch.setattr(watcher.Watcher, "run", lambda self: 7)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert watcher.main([ATT.container, str(state)]) == 7
    assert made and made[0].called("close")
    assert watcher.main(["only-one"]) == 2
