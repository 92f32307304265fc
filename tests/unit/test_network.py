"""Network isolation: policies, rule generation, DNS parsing and the backend choice, without a daemon."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from coi import network
from coi.config import default_config
from coi.errors import CoiError, NotFoundError, OperationFailedError

ATT = network.Attachment(container="coi-abc12345-1", nic="eth0", bridge="coibr0", veth="veth1234abcd",
                         ipv4="10.195.0.23", gateway="10.195.0.1", subnet="10.195.0.0/24")


def net_config(**changes):
    return replace(default_config(env={"HOME": "/home/u"}).network, **changes)


# ---- plan -----------------------------------------------------------------------------------

PRIVATE = network.PRIVATE_RANGES
META = network.METADATA_RANGES


@pytest.mark.parametrize("changes, override, mode, blocked", [
    ({}, None, "restricted", PRIVATE + META),
    ({"mode": "open"}, None, "open", ()),
    ({"mode": "open"}, "restricted", "restricted", PRIVATE + META),
    ({"allow_local_network_access": True}, None, "restricted", META),
    ({"block_private_networks": False}, None, "restricted", META),
    ({"block_metadata_endpoint": False}, None, "restricted", PRIVATE),
    ({"block_private_networks": False, "block_metadata_endpoint": False}, None, "restricted", ()),
    ({"allowed_domains": ("a.example",)}, "allowlist", "allowlist", ()),
])
def test_plan_modes_and_blocks(changes, override, mode, blocked):
    policy = network.plan(net_config(**changes), override, env={})
    assert (policy.mode, policy.blocked) == (mode, blocked)


def test_plan_allowlist_entries_are_checked_normalised_and_deduplicated():
    policy = network.plan(net_config(allowed_domains=("Deb.Debian.org.", "deb.debian.org", "192.0.2.7",
                                                      "198.51.100.9/24", "_srv.example")), "allowlist", env={})
    assert policy.allowed == ("deb.debian.org", "192.0.2.7/32", "198.51.100.0/24", "_srv.example")


@pytest.mark.parametrize("entry, message", [
    ("*.example.com", "wildcards are not supported"),
    ("exa mple.com", "not a domain name or an IPv4 address"),
    ("300.1.2.3", "not a domain name or an IPv4 address"),
    ("2001:db8::1", "not a domain name or an IPv4 address"),
    ("-bad.example", "not a domain name or an IPv4 address"),
    ("a" * 64 + ".example", "not a domain name or an IPv4 address"),
])
def test_plan_refuses_bad_allowlist_entries(entry, message):
    with pytest.raises(CoiError, match=message):
        network.plan(net_config(allowed_domains=(entry,)), "allowlist", env={})


def test_plan_allowlist_needs_entries_and_unknown_modes_are_refused():
    with pytest.raises(CoiError, match="needs at least one entry"):
        network.plan(net_config(), "allowlist", env={})
    with pytest.raises(CoiError, match="unknown network mode"):
        network.plan(net_config(), "closed", env={})


@pytest.mark.parametrize("env, refresh, resolver", [
    ({}, 30 * 60, None),
    ({"COI_NETWORK_REFRESH_SECONDS": "2"}, 2, None),
    ({"COI_NETWORK_REFRESH_SECONDS": "0"}, 1, None),
    ({"COI_NETWORK_RESOLVER": "127.0.0.1:5353"}, 30 * 60, "127.0.0.1:5353"),
    ({"COI_NETWORK_RESOLVER": "10.0.0.53"}, 30 * 60, "10.0.0.53:53"),
])
def test_plan_refresh_interval_and_resolver_from_the_environment(env, refresh, resolver):
    policy = network.plan(net_config(allowed_domains=("a.example",)), "allowlist", env=env)
    assert (policy.refresh_seconds, policy.resolver) == (refresh, resolver)


@pytest.mark.parametrize("env, message", [
    ({"COI_NETWORK_REFRESH_SECONDS": "soon"}, "not a whole number"),
    ({"COI_NETWORK_RESOLVER": "dns.example:53"}, "is not IPV4"),
])
def test_plan_refuses_bad_environment_values(env, message):
    with pytest.raises(CoiError, match=message):
        network.plan(net_config(), None, env=env)


def test_plan_carries_privileged_command_and_logging_and_round_trips():
    cfg = net_config(privileged_command=("sudo", "-n"),
                     logging=replace(net_config().logging, enabled=True, path=Path("/tmp/n.log")))
    policy = network.plan(cfg, None, env={})
    assert policy.privileged_command == ("sudo", "-n")
    assert (policy.log_blocked, policy.log_path) == (True, "/tmp/n.log")
    # The record never carries the privileged command: it comes from trusted config when used.
    assert "privileged_command" not in policy.to_json()
    assert network.NetworkPolicy.from_json(policy.to_json()) == replace(policy, privileged_command=())
    assert network.NetworkPolicy.from_json(policy.to_json(), privileged_command=("sudo", "-n")) == policy
    planted = {**policy.to_json(), "privileged_command": ["sh", "-c", "touch /tmp/pwned"]}
    assert network.NetworkPolicy.from_json(planted).privileged_command == ()
    assert network.plan(cfg, "open", env={}).log_blocked is False


# ---- nftables rules ----------------------------------------------------------------------------


def rules(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("add rule")]


GATE_RULES = ["add rule bridge coi gate iifname @open accept", 'add rule bridge coi gate iifname "coi*" drop']


def test_restricted_ruleset():
    script = network.nft_apply_script(ATT, network.plan(net_config(), None, env={}))
    t, c = "coi", ATT.container
    assert rules(script) == [
        *GATE_RULES,
        f"add rule inet {t} {c}.deny meta l4proto tcp reject with tcp reset",
        f"add rule inet {t} {c}.deny reject with icmpx admin-prohibited",
        f"add rule inet {t} {c}.host ip saddr 10.195.0.23 ct state established,related accept",
        f"add rule inet {t} {c}.host ip saddr 10.195.0.23 udp dport 67 accept",
        f"add rule inet {t} {c}.host ip saddr 10.195.0.23 ip daddr 10.195.0.1 meta l4proto {{ tcp, udp }} th dport 53 accept",
        f"add rule inet {t} {c}.host ip saddr 10.195.0.23 goto {c}.deny",
        f"add rule inet {t} {c}.out ip saddr 10.195.0.0/24 ip daddr 10.195.0.23 goto {c}.deny",
        f"add rule inet {t} {c}.out ip saddr 10.195.0.23 ip daddr 10.195.0.0/24 goto {c}.deny",
        f"add rule inet {t} {c}.out ip saddr 10.195.0.23 ip daddr {{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, "
        f"100.64.0.0/10, 169.254.0.0/16 }} goto {c}.deny",
        f'add rule bridge {t} {c}.spoof iifname "veth1234abcd" ether type != {{ ip, arp }} drop',
        f'add rule bridge {t} {c}.spoof iifname "veth1234abcd" ether type ip ip saddr != {{ 10.195.0.23, 0.0.0.0 }} drop',
        f'add rule bridge {t} {c}.spoof iifname "veth1234abcd" ether type arp arp saddr ip != {{ 10.195.0.23, 0.0.0.0 }} drop',
        f'add rule bridge {t} {c}.ports iifname "veth1234abcd" ether type != arp drop',
        f'add rule bridge {t} {c}.ports oifname "veth1234abcd" ether type != arp drop',
    ]
    assert f"add chain inet {t} {c}.host {{ type filter hook input priority filter; policy accept; }}" in script
    assert f"add chain inet {t} {c}.out {{ type filter hook forward priority filter; policy accept; }}" in script
    # br_netfilter runs at bridge priority 0: the bridge backstop comes after the inet refusal
    assert f"add chain bridge {t} {c}.ports {{ type filter hook forward priority 100; policy accept; }}" in script


def test_restricted_without_blocks_still_isolates_host_and_bridge():
    policy = network.plan(net_config(block_private_networks=False, block_metadata_endpoint=False), None, env={})
    out = [r for r in rules(network.nft_apply_script(ATT, policy)) if ".out " in r]
    assert out == [f"add rule inet coi {ATT.container}.out ip saddr 10.195.0.0/24 ip daddr 10.195.0.23 goto {ATT.container}.deny",
                   f"add rule inet coi {ATT.container}.out ip saddr 10.195.0.23 ip daddr 10.195.0.0/24 goto {ATT.container}.deny"]


def test_allowlist_ruleset_uses_a_set_of_collapsed_addresses():
    policy = network.plan(net_config(allowed_domains=("a.example",)), "allowlist", env={})
    script = network.nft_apply_script(ATT, policy, ["192.0.2.9", "192.0.2.9", "198.51.100.0/24", "198.51.100.7"])
    c = ATT.container
    assert f"add set inet coi {c}.allow {{ type ipv4_addr; flags interval; }}" in script
    assert f"add element inet coi {c}.allow {{ 192.0.2.9, 198.51.100.0/24 }}" in script
    out = [r for r in rules(script) if ".out " in r]
    assert out[1:] == [f"add rule inet coi {c}.out ip saddr 10.195.0.23 ip daddr @{c}.allow accept",
                       f"add rule inet coi {c}.out ip saddr 10.195.0.23 goto {c}.deny"]


def test_logging_marks_refused_packets_for_the_trace_monitor():
    policy = replace(network.plan(net_config(), None, env={}), log_blocked=True)
    assert rules(network.nft_apply_script(ATT, policy))[len(GATE_RULES)] == \
        f"add rule inet coi {ATT.container}.deny meta nftrace set 1"


def test_bridge_rules_use_only_what_the_bridge_family_supports_here():
    for mode, domains in (("restricted", ()), ("allowlist", ("a.example",))):
        policy = replace(network.plan(net_config(allowed_domains=domains), mode, env={}), log_blocked=True)
        script = network.nft_apply_script(ATT, policy, ["192.0.2.1"])
        bridge = [r for r in rules(script) if " bridge " in r and " gate " not in r]
        assert bridge and all(r.endswith(" drop") and " ct " not in r and "reject" not in r for r in bridge)
        assert [r for r in rules(script) if " gate " in r] == GATE_RULES


def test_apply_script_replaces_earlier_rules_in_the_same_transaction():
    script = network.nft_apply_script(ATT, network.plan(net_config(), None, env={}))
    assert script.startswith(network.nft_gate_script() + network.nft_remove_script(ATT.container))
    assert script.endswith('add element bridge coi open { "veth1234abcd" }\n')  # opened with its rules
    assert ".fwd" not in script  # 'fwd' is an nft keyword


def test_remove_script_works_whether_or_not_the_objects_exist():
    c = ATT.container
    lines = network.nft_remove_script(c).splitlines()
    for family, parts in (("inet", ("out", "host", "deny")), ("bridge", ("spoof", "ports"))):
        for part in parts:
            add, flush, delete = (lines.index(f"{verb} chain {family} coi {c}.{part}")
                                  for verb in ("add", "flush", "delete"))
            assert add < flush < delete
    assert lines.index(f"delete set inet coi {c}.allow") > lines.index(f"flush chain inet coi {c}.out")


def test_set_script_swaps_the_addresses_atomically():
    assert network.nft_set_script("coi-x-1", ["192.0.2.2", "192.0.2.1"]) == (
        "flush set inet coi coi-x-1.allow\nadd element inet coi coi-x-1.allow { 192.0.2.1, 192.0.2.2 }\n")
    assert network.nft_set_script("coi-x-1", []) == "flush set inet coi coi-x-1.allow\n"


@pytest.mark.parametrize("name", ["", "1abc", "coi-", "coi_x", "coi x", "a;b", "coi-" + "x" * 63, 'a"b'])
def test_names_that_cannot_be_nft_identifiers_are_refused(name):
    with pytest.raises(CoiError):
        network.nft_remove_script(name)


def test_interface_names_are_checked():
    with pytest.raises(CoiError):
        network.nft_apply_script(replace(ATT, veth='x" accept; drop'), network.plan(net_config(), None, env={}))


def test_containers_in_ruleset():
    ruleset = {"nftables": [
        {"metainfo": {}},
        {"table": {"family": "inet", "name": "coi"}},
        {"chain": {"family": "inet", "table": "coi", "name": "coi-a-1.out"}},
        {"set": {"family": "inet", "table": "coi", "name": "coi-b-2.allow"}},
        {"chain": {"family": "bridge", "table": "coi", "name": "coi-c-3.ports"}},
        {"chain": {"family": "inet", "table": "coi", "name": "coi-d-4.other"}},
        {"chain": {"family": "inet", "table": "incus", "name": "coi-e-5.out"}},
        {"rule": {"family": "inet", "table": "coi", "chain": "coi-f-6.out"}},
    ]}
    assert network.containers_in_ruleset(ruleset) == {"coi-a-1", "coi-b-2", "coi-c-3"}


# ---- Incus ACL rules ------------------------------------------------------------------------------

def test_acl_spec_restricted():
    egress, ingress, nic = network.acl_spec(ATT, network.plan(net_config(), None, env={}))
    assert [(r["action"], r["destination"]) for r in egress] == [
        ("reject", "10.195.0.0/24"),
        ("reject", ",".join(PRIVATE + META)),
        ("reject", "::/0"),
    ]
    assert ingress == [{"action": "drop", "state": "enabled", "source": "10.195.0.2-10.195.0.254",
                        "description": "no connections from other containers on the bridge"}]
    assert nic == {"security.acls": ATT.container, "security.acls.default.egress.action": "allow",
                   "security.acls.default.ingress.action": "allow",
                   "security.ipv4_filtering": "true", "security.mac_filtering": "true"}


def test_acl_spec_restricted_refuses_the_hosts_own_addresses():
    policy = network.plan(net_config(), None, env={})
    egress, _, _ = network.acl_spec(ATT, policy, host_addresses=["203.0.113.7", "10.195.0.1", "192.0.2.9"])
    assert ("reject", "192.0.2.9,203.0.113.7") in [(r["action"], r["destination"]) for r in egress]


class _AclIncus:
    """Just what AclBackend.remove reads and writes."""

    def __init__(self, devices):
        self.devices = devices
        self.patched, self.deleted = [], []

    def instance(self, name):
        return {"name": name, "devices": self.devices}

    def update_instance(self, name, *, devices):
        self.patched.append(devices)

    def delete_network_acl(self, name):
        self.deleted.append(name)


def test_acl_removal_keeps_the_pinned_nic():
    nic = {"type": "nic", "network": "coibr0", "ipv4.address": "10.195.0.23", "host_name": "coi0123456789ab",
           "security.acls": ATT.container, "security.acls.default.egress.action": "allow",
           "security.ipv4_filtering": "true"}
    fake = _AclIncus({"eth0": nic})
    network.AclBackend(fake).remove(ATT.container)
    assert fake.patched == [{"eth0": {"type": "nic", "network": "coibr0", "ipv4.address": "10.195.0.23",
                                      "host_name": "coi0123456789ab", "security.ipv4_filtering": "true"}}]
    assert fake.deleted == [ATT.container]


def test_acl_spec_allowlist():
    policy = network.plan(net_config(allowed_domains=("a.example",)), "allowlist", env={})
    egress, _, nic = network.acl_spec(ATT, policy, ["192.0.2.5", "192.0.2.5", "198.51.100.0/24"])
    assert [(r["action"], r["destination"]) for r in egress] == [("allow", "192.0.2.5,198.51.100.0/24")]
    assert nic["security.acls.default.egress.action"] == "reject"


@pytest.mark.parametrize("subnet, gateway, ranges", [
    ("10.195.0.0/24", "10.195.0.1", "10.195.0.2-10.195.0.254"),
    ("10.195.0.0/24", "10.195.0.254", "10.195.0.1-10.195.0.253"),
    ("10.195.0.0/24", "10.195.0.100", "10.195.0.1-10.195.0.99,10.195.0.101-10.195.0.254"),
    ("10.9.0.0/30", "10.9.0.1", "10.9.0.2"),
])
def test_acl_ranges_leave_out_the_gateway(subnet, gateway, ranges):
    assert network._range_without(subnet, gateway) == ranges


# ---- DNS ----------------------------------------------------------------------------------------------

def dns_reply(qid=7, rcode=0, answers=(), name=b"\x01a\x07example\x00"):
    head = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, len(answers), 0, 0)
    body = b"".join(answers)
    return head + name + b"\x00\x01\x00\x01" + body


def a_record(ip: str) -> bytes:
    return b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)


def cname_record(target: bytes) -> bytes:
    return b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, len(target)) + target


@pytest.mark.parametrize("data, addresses", [
    (dns_reply(answers=[a_record("192.0.2.1")]), ["192.0.2.1"]),
    (dns_reply(answers=[cname_record(b"\x01b\xc0\x0e"), a_record("192.0.2.2"), a_record("192.0.2.3")]),
     ["192.0.2.2", "192.0.2.3"]),
    (dns_reply(), []),
])
def test_parse_dns_answers(data, addresses):
    assert network.parse_dns_answer(data, "a.example") == addresses


@pytest.mark.parametrize("data, message", [
    (dns_reply(rcode=3), "no such name"),
    (dns_reply(rcode=2), "DNS error code 2"),
    (dns_reply(answers=[a_record("192.0.2.1")])[:-2], "truncated|malformed"),
    (b"\x00\x07", "malformed"),
])
def test_parse_dns_errors(data, message):
    with pytest.raises(network.ResolveError, match=message):
        network.parse_dns_answer(data, "a.example")


def test_dns_query_against_a_local_server():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        import threading

        def answer():
            data, peer = server.recvfrom(512)
            qid = data[:2]
            server.sendto(b"\x99\x99" + dns_reply()[2:], peer)  # a stray answer with another id is ignored
            server.sendto(qid + dns_reply(answers=[a_record("192.0.2.44")])[2:], peer)
        thread = threading.Thread(target=answer)
        thread.start()
        assert network.dns_query_a("a.example", server.getsockname(), timeout=2) == ["192.0.2.44"]
        thread.join()


def test_dns_query_timeout_is_a_resolve_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(network.ResolveError, match="no answer"):
            network.dns_query_a("a.example", silent.getsockname(), timeout=0.1)


def test_resolve_keeps_cached_addresses_reports_failures_and_merges_duplicates():
    answers = {"up.example": ["192.0.2.1", "192.0.2.1"], "same.example": ["192.0.2.1"]}

    def query(name, server):
        if name in answers:
            return answers[name]
        raise network.ResolveError(f"{name}: no such name")

    cache = {"flaky.example": {"addresses": ["198.51.100.7"]}}
    result = network.resolve_allowed(["up.example", "same.example", "flaky.example", "never.example", "203.0.113.0/24"],
                                     server=("127.0.0.1", 53), cache=cache, query=query)
    assert result.addresses == ["192.0.2.1", "198.51.100.7", "203.0.113.0/24"]
    assert result.stale == ["flaky.example"]
    assert list(result.failed) == ["never.example"]
    assert cache["up.example"]["addresses"] == ["192.0.2.1"]


def test_resolver_defaults_to_the_bridge_dns():
    policy = network.plan(net_config(allowed_domains=("a.example",)), "allowlist", env={})
    assert network.resolver_for(policy, ATT) == ("10.195.0.1", 53)
    assert network.resolver_for(replace(policy, resolver="127.0.0.1:5353"), ATT) == ("127.0.0.1", 5353)


# ---- the log ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, parsed", [
    ('trace id 1f2e inet coi coi-a-1.deny packet: iif "coibr0" ether saddr 00:16:3e:00:00:01 ip saddr 10.195.0.5 '
     'ip daddr 192.168.250.2 ip dscp cs0 ip protocol tcp tcp sport 40000 tcp dport 8000 tcp flags == syn',
     ("coi-a-1", "tcp 10.195.0.5 -> 192.168.250.2:8000")),
    ('trace id 1f2e inet coi coi-a-1.deny packet: iif "coibr0" ip saddr 10.195.0.5 ip daddr 198.51.100.54 '
     'ip protocol udp udp sport 5000 udp dport 53',
     ("coi-a-1", "udp 10.195.0.5 -> 198.51.100.54:53")),
    ('trace id 1f2e inet coi coi-a-1.deny rule meta l4proto tcp reject with tcp reset (verdict drop)', None),
    ('trace id 1f2e inet incus fwd.coibr0 packet: iif "coibr0"', None),
])
def test_parse_trace(line, parsed):
    assert network.parse_trace(line) == parsed


# ---- the backend choice -----------------------------------------------------------------------------------

class StubIncus:
    """Just enough of the Incus client for apply(): one running container on coibr0."""

    project = "default"
    path = "/nonexistent/unix.socket"

    def __init__(self, *, acl_error: str | None = None) -> None:
        self.acl_error = acl_error
        self.acls: dict[str, dict] = {}
        self.updates: list[dict] = []

    def instance(self, name):
        return {"name": name, "status": "Running", "config": {"volatile.eth0.host_name": "veth1234abcd"},
                "devices": {}, "expanded_devices": {"eth0": {"type": "nic", "network": "coibr0", "name": "eth0"}}}

    def network(self, name):
        return {"config": {"ipv4.address": "10.195.0.1/24"}}

    def instance_state(self, name):
        return {"status": "Running", "network": {"eth0": {"host_name": "veth1234abcd", "addresses": [
            {"family": "inet", "address": "10.195.0.23", "scope": "global"}]}}}

    def put_network_acl(self, name, **body):
        if name not in self.acls:
            raise NotFoundError(name)
        self.acls[name] = body

    def create_network_acl(self, name, **body):
        self.acls[name] = body

    def delete_network_acl(self, name):
        self.acls.pop(name, None)

    def update_instance(self, name, *, devices=None, config=None):
        self.updates.append(devices)
        if self.acl_error:
            raise OperationFailedError(self.acl_error)


@pytest.fixture
def quiet_watcher(monkeypatch):
    monkeypatch.setattr(network, "_start_watcher", lambda *a, **k: None)


@pytest.fixture
def nft_calls(monkeypatch):
    calls: list[str] = []

    class FakeNft(network.NftBackend):
        """Records the script the helper would run for each request (no nft, no sudo)."""

        def __init__(self, privileged_command=()):
            self.argv, self.via = [], ""

        def request(self, request, what):
            from coi import nfthelper

            calls.append(nfthelper.script_for(nfthelper.validate(request)))
            return ""

    monkeypatch.setattr(network, "NftBackend", FakeNft)
    return calls


REFUSED = ('Failed to update device "eth0": Failed adding bridge filter rules ... Error: Could not process rule: '
           'Protocol error\n\tct state established,related accept')


def test_refused_acls_fall_back_to_nftables_once_and_are_remembered(tmp_path, quiet_watcher, nft_calls):
    client, lines = StubIncus(acl_error=REFUSED), []
    policy = network.plan(net_config(), None, env={})
    assert network.apply(client, ATT.container, policy, sessions_dir=tmp_path, log=lines.append) == \
        "host nftables (inet + bridge)"
    assert client.acls == {} and len(client.updates) == 1  # tried, refused, the ACL removed again
    assert "no bridge-family conntrack" in lines[0] and "falling back" in lines[0]
    assert len(nft_calls) == 1 and "add chain inet coi coi-abc12345-1.out" in nft_calls[0]
    lines.clear()
    network.apply(client, ATT.container, policy, sessions_dir=tmp_path, log=lines.append)
    assert lines == [] and len(client.updates) == 1  # not tried again
    record = network.Store(tmp_path).record(ATT.container)
    assert (record["backend"], record["mode"], record["attachment"]["veth"]) == ("nftables", "restricted",
                                                                                "veth1234abcd")


def test_working_acls_are_used(tmp_path, quiet_watcher, nft_calls):
    client = StubIncus()
    policy = network.plan(net_config(), None, env={})
    assert network.apply(client, ATT.container, policy, sessions_dir=tmp_path, log=print) == "Incus network ACLs"
    assert nft_calls == []
    assert client.updates[0]["eth0"]["security.acls"] == ATT.container
    assert client.acls[ATT.container]["description"].startswith(network.ACL_DESCRIPTION)


def test_fail_closed_without_any_backend(tmp_path, quiet_watcher, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    client = StubIncus(acl_error=REFUSED)
    with pytest.raises(CoiError) as err:
        network.apply(client, ATT.container, network.plan(net_config(), None, env={}), sessions_dir=tmp_path,
                      log=print)
    assert "cannot enforce network mode restricted" in err.value.message
    assert "no bridge-family conntrack" in err.value.message and "privileged_command" in err.value.message
    assert "--network=open" in err.value.hint
    assert network.Store(tmp_path).record(ATT.container) is None


def test_open_mode_removes_earlier_rules(tmp_path, quiet_watcher, nft_calls):
    client = StubIncus(acl_error=REFUSED)
    network.apply(client, ATT.container, network.plan(net_config(), None, env={}), sessions_dir=tmp_path, log=print)
    nft_calls.clear()
    assert network.apply(client, ATT.container, network.plan(net_config(), "open", env={}), sessions_dir=tmp_path,
                         log=print) == "open (no filtering)"
    assert nft_calls == [network.nft_remove_script(ATT.container)]
    assert network.Store(tmp_path).record(ATT.container) is None


def test_allowlist_with_no_resolvable_name_fails_closed(tmp_path, quiet_watcher, nft_calls, monkeypatch):
    def nothing(name, server, timeout=2.0):
        raise network.ResolveError(f"{name}: no such name")
    monkeypatch.setattr(network, "dns_query_a", nothing)
    policy = network.plan(net_config(allowed_domains=("gone.example",)), "allowlist", env={})
    with pytest.raises(CoiError, match="none of the allowed names resolved") as err:
        network.apply(StubIncus(acl_error=REFUSED), ATT.container, policy, sessions_dir=tmp_path, log=print)
    assert "--network=open" in err.value.hint
    assert nft_calls == []


def test_stale_rules_for_the_same_address_are_removed(tmp_path, quiet_watcher, nft_calls):
    store = network.Store(tmp_path)
    store.save_record("coi-old-1", {"backend": "nftables", "attachment": {"ipv4": ATT.ipv4}, "policy": {"mode": "restricted"}})
    network.apply(StubIncus(acl_error=REFUSED), ATT.container, network.plan(net_config(), None, env={}),
                  sessions_dir=tmp_path, log=print)
    assert network.nft_remove_script("coi-old-1") in nft_calls
    assert store.record("coi-old-1") is None


def test_capabilities_learnt_on_another_kernel_are_probed_again(tmp_path, monkeypatch):
    store = network.Store(tmp_path)
    store.save_capability("incus-acl", False, "refused")
    assert store.capability("incus-acl")["usable"] is False
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "9.9.9", "#1", "x86_64")))
    assert store.capability("incus-acl") is None


def test_backend_report_without_privileges(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(network.shutil, "which", lambda name: "/usr/sbin/nft")
    report = network.backend_report(net_config(), sessions_dir=tmp_path)
    assert report.status == "warn" and "privileged_command" in report.detail
    network.Store(tmp_path).save_capability("incus-acl", False, "no bridge-family conntrack")
    report = network.backend_report(net_config(), sessions_dir=tmp_path)
    assert report.status == "fail" and "--network=open" in report.hint


# ---- the watcher ----------------------------------------------------------------------------------------------

def watched(tmp_path, monkeypatch, nft_calls, *, mode="allowlist"):
    """A container with applied rules and a watcher over a stub client (no process, no daemon)."""
    from coi import netwatch

    monkeypatch.setattr(network, "_start_watcher", lambda *a, **k: None)
    answers = {"a.example": ["192.0.2.1"]}

    def query(name, server, timeout=2.0):
        if name in answers:
            return answers[name]
        raise network.ResolveError(f"{name}: no such name")
    monkeypatch.setattr(network, "dns_query_a", query)
    client = StubIncus(acl_error=REFUSED)
    policy = network.plan(net_config(allowed_domains=("a.example",)), mode, env={})
    network.apply(client, ATT.container, policy, sessions_dir=tmp_path, log=print)
    nft_calls.clear()
    return netwatch.Watcher(ATT.container, tmp_path, client), client, answers


def test_watcher_refresh_swaps_addresses_and_keeps_them_when_lookups_fail(tmp_path, monkeypatch, nft_calls):
    watcher, _, answers = watched(tmp_path, monkeypatch, nft_calls)
    policy = network.NetworkPolicy.from_json(watcher.record()["policy"])
    watcher._refresh(policy)
    assert nft_calls == []  # nothing changed
    answers["a.example"] = ["192.0.2.2", "192.0.2.2"]
    watcher._refresh(policy)
    assert nft_calls == [network.nft_set_script(ATT.container, ["192.0.2.2"])]
    answers.clear()
    watcher._refresh(policy)
    assert len(nft_calls) == 1 and watcher.record()["addresses"] == ["192.0.2.2"]


def test_watcher_follows_a_restart_and_removes_rules_of_a_deleted_container(tmp_path, monkeypatch, nft_calls):
    watcher, client, _ = watched(tmp_path, monkeypatch, nft_calls, mode="restricted")
    inst = client.instance(ATT.container)
    inst["config"]["volatile.eth0.host_name"] = "veth9999new0"
    state = client.instance_state(ATT.container)
    state["network"]["eth0"]["host_name"] = "veth9999new0"
    monkeypatch.setattr(client, "instance_state", lambda name: state)
    monkeypatch.setattr(client, "instance", lambda name: inst)
    record = watcher.record()
    watcher._follow_restart(record, network.NetworkPolicy.from_json(record["policy"]), inst)
    assert '"veth9999new0"' in nft_calls[-1] and watcher.record()["attachment"]["veth"] == "veth9999new0"

    def gone(name):
        raise NotFoundError(name)
    monkeypatch.setattr(client, "instance", gone)
    assert watcher.run() == 0
    assert nft_calls[-1] == network.nft_remove_script(ATT.container)
    assert watcher.record() is None


def test_watcher_waits_out_a_reboot_before_removing_rules(tmp_path, monkeypatch, nft_calls):
    from coi import netwatch

    watcher, client, _ = watched(tmp_path, monkeypatch, nft_calls, mode="restricted")
    monkeypatch.setattr(netwatch, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(netwatch, "STOPPED_GRACE", 0.2)
    running = client.instance(ATT.container)
    seen = []

    def stopped(name):
        seen.append(network.Store(tmp_path).record(ATT.container) is not None)
        return running if len(seen) == 1 else {"status": "Stopped", "config": {}}
    monkeypatch.setattr(client, "instance", stopped)
    assert watcher.run() == 0
    assert len(seen) > 3 and all(seen)  # the rules stayed while the grace lasted
    assert nft_calls == [network.nft_remove_script(ATT.container)]


def test_watcher_gives_a_container_not_started_yet_longer(tmp_path, monkeypatch, nft_calls):
    """Rules go on before the start: "Stopped" then means "not started yet" for a while."""
    from coi import netwatch

    watcher, client, _ = watched(tmp_path, monkeypatch, nft_calls, mode="restricted")
    monkeypatch.setattr(netwatch, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(netwatch, "STOPPED_GRACE", 0.01)
    monkeypatch.setattr(netwatch, "START_GRACE", 0.3)
    polled = []
    monkeypatch.setattr(client, "instance", lambda name: polled.append(time.monotonic()) or
                        {"status": "Stopped", "config": {}})
    assert watcher.run() == 0
    assert polled[-1] - polled[0] >= 0.3  # not removed after the short grace of a seen reboot
    assert nft_calls == [network.nft_remove_script(ATT.container)]


# ---- pinned addresses --------------------------------------------------------------------

class PinClient:
    """Just what ``pin_nic`` reads: the profile, the bridge and its leases."""

    def __init__(self, *, nic=None, subnet="10.9.0.1/24", leases=()):
        self.nic = {"type": "nic", "network": "coibr0", "name": "eth0"} if nic is None else nic
        self.subnet, self.leases = subnet, list(leases)

    def profile(self, name):
        return {"devices": {"root": {"type": "disk", "path": "/", "pool": "coi"},
                            **({"eth0": self.nic} if self.nic else {})}}

    def network(self, name):
        return {"config": {"ipv4.address": self.subnet}}

    def network_leases(self, name):
        return [{"address": a, "type": "dynamic"} for a in self.leases]


def counting(start: int):
    """A deterministic ``rand``: the first 4 bytes pick the start, the rest name the interface."""
    return lambda n: start.to_bytes(4, "big") if n == 4 else bytes(range(n))


def test_choose_address_skips_the_bridge_and_used_ones():
    subnet = ipaddress.IPv4Interface("10.9.0.1/24")
    assert network.choose_address(subnet, [], rand=counting(0)) == "10.9.0.2"  # .1 is the bridge
    assert network.choose_address(subnet, ["10.9.0.2", "10.9.0.3", "junk", ""], rand=counting(0)) == "10.9.0.4"
    assert network.choose_address(subnet, [], rand=counting(253)) == "10.9.0.254"
    assert network.choose_address(subnet, [], rand=counting(254)) == "10.9.0.2"  # wraps, past the bridge
    assert network.choose_address(subnet, ["10.9.0.254"], rand=counting(253)) == "10.9.0.2"


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
    pin = network.pin_nic(PinClient(leases=["10.9.0.2"]), others, rand=counting(0))
    assert pin.devices == {"eth0": {"type": "nic", "network": "coibr0", "name": "eth0",
                                    "ipv4.address": "10.9.0.4", "host_name": "coi000102030405"}}
    assert len(pin.devices["eth0"]["host_name"]) <= 15  # Linux interface names
    # LXC sets the same address and the route inside before init; DNS goes to the bridge
    assert pin.config == {"raw.lxc": "lxc.net.0.ipv4.address = 10.9.0.4/24 10.9.0.255\n"
                                     "lxc.net.0.ipv4.gateway = 10.9.0.1\n"}
    assert pin.files == {"/etc/resolv.conf": b"nameserver 10.9.0.1\n"}
    inst = {"name": "c", "expanded_devices": pin.devices}
    assert network.is_pinned(inst) and network._pinned(inst, "eth0") == ("coi000102030405", "10.9.0.4")


@pytest.mark.parametrize("client", [PinClient(nic={}),  # no NIC in the profile
                                    PinClient(nic={"type": "nic", "nictype": "bridged", "parent": "br0"}),
                                    PinClient(subnet="none")])
def test_pin_nic_leaves_unmanaged_or_addressless_bridges_to_dhcp(client):
    assert network.pin_nic(client, []) is None


def test_pin_nic_only_with_one_nic():
    client = PinClient()
    profile = client.profile("coi")
    profile["devices"]["eth1"] = {"type": "nic", "network": "coibr0", "name": "eth1"}
    client.profile = lambda name: profile
    assert network.pin_nic(client, []) is None  # which one LXC calls lxc.net.0 is not ours to guess


def test_is_pinned_needs_both_address_and_interface_name():
    nic = {"type": "nic", "network": "coibr0"}
    assert not network.is_pinned({"name": "c", "expanded_devices": {"eth0": nic}})
    assert not network.is_pinned({"name": "c", "expanded_devices": {"eth0": {**nic, "ipv4.address": "10.9.0.5"}}})
    assert not network.is_pinned({"name": "c", "expanded_devices": {}})


def test_address_lock_falls_back_to_a_per_user_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(network, "ADDRESS_LOCK", tmp_path / "missing" / "addresses.lock")
    with network.address_lock(tmp_path / "locks"):
        assert (tmp_path / "locks" / "addresses.lock").exists()


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
