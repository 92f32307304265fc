"""coi's rules as text (coi.network.nft, coi.network.acl) and what coi reads back from
nft: every line of a container's rule set, the gate, Incus ACL rules, ruleset
listings and trace lines. Pure, table-driven where a table says more."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coi.config import default_config
from coi.errors import CoiError
from coi.network import acl, backends, nft
from coi.network.attach import Attachment
from coi.network.policy import METADATA_RANGES as META, PRIVATE_RANGES as PRIVATE, NetworkPolicy, plan

ATT = Attachment(container="coi-abc12345-1", nic="eth0", bridge="coibr0", veth="veth1234abcd",
                 ipv4="10.195.0.23", gateway="10.195.0.1", subnet="10.195.0.0/24")


def net_config(**changes):
    return replace(default_config(env={"HOME": "/home/u"}).network, **changes)


# ---- nftables rules ----------------------------------------------------------------------------


def rules(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("add rule")]


GATE_RULES = ["add rule bridge coi gate iifname @open accept", 'add rule bridge coi gate iifname "coi*" drop']


def test_restricted_ruleset():
    script = nft.nft_apply_script(ATT, plan(net_config(), None, env={}))
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
    policy = plan(net_config(block_private_networks=False, block_metadata_endpoint=False), None, env={})
    out = [r for r in rules(nft.nft_apply_script(ATT, policy)) if ".out " in r]
    assert out == [f"add rule inet coi {ATT.container}.out ip saddr 10.195.0.0/24 ip daddr 10.195.0.23 goto {ATT.container}.deny",
                   f"add rule inet coi {ATT.container}.out ip saddr 10.195.0.23 ip daddr 10.195.0.0/24 goto {ATT.container}.deny"]


def test_allowlist_ruleset_uses_a_set_of_collapsed_addresses():
    policy = plan(net_config(allowed_domains=("a.example",)), "allowlist", env={})
    script = nft.nft_apply_script(ATT, policy, ["192.0.2.9", "192.0.2.9", "198.51.100.0/24", "198.51.100.7"])
    c = ATT.container
    assert f"add set inet coi {c}.allow {{ type ipv4_addr; flags interval; }}" in script
    assert f"add element inet coi {c}.allow {{ 192.0.2.9, 198.51.100.0/24 }}" in script
    out = [r for r in rules(script) if ".out " in r]
    assert out[1:] == [f"add rule inet coi {c}.out ip saddr 10.195.0.23 ip daddr @{c}.allow accept",
                       f"add rule inet coi {c}.out ip saddr 10.195.0.23 goto {c}.deny"]


def test_logging_marks_refused_packets_for_the_trace_monitor():
    policy = replace(plan(net_config(), None, env={}), log_blocked=True)
    assert rules(nft.nft_apply_script(ATT, policy))[len(GATE_RULES)] == \
        f"add rule inet coi {ATT.container}.deny meta nftrace set 1"


def test_bridge_rules_use_only_what_the_bridge_family_supports_here():
    for mode, domains in (("restricted", ()), ("allowlist", ("a.example",))):
        policy = replace(plan(net_config(allowed_domains=domains), mode, env={}), log_blocked=True)
        script = nft.nft_apply_script(ATT, policy, ["192.0.2.1"])
        bridge = [r for r in rules(script) if " bridge " in r and " gate " not in r]
        assert bridge and all(r.endswith(" drop") and " ct " not in r and "reject" not in r for r in bridge)
        assert [r for r in rules(script) if " gate " in r] == GATE_RULES


def test_apply_script_replaces_earlier_rules_in_the_same_transaction():
    script = nft.nft_apply_script(ATT, plan(net_config(), None, env={}))
    assert script.startswith(nft.nft_gate_script() + nft.nft_remove_script(ATT.container))
    assert script.endswith('add element bridge coi open { "veth1234abcd" }\n')  # opened with its rules
    assert ".fwd" not in script  # 'fwd' is an nft keyword


def test_remove_script_works_whether_or_not_the_objects_exist():
    c = ATT.container
    lines = nft.nft_remove_script(c).splitlines()
    for family, parts in (("inet", ("out", "host", "deny")), ("bridge", ("spoof", "ports"))):
        for part in parts:
            add, flush, delete = (lines.index(f"{verb} chain {family} coi {c}.{part}")
                                  for verb in ("add", "flush", "delete"))
            assert add < flush < delete
    assert lines.index(f"delete set inet coi {c}.allow") > lines.index(f"flush chain inet coi {c}.out")


@pytest.mark.parametrize("name", ["", "1abc", "coi-", "coi_x", "coi x", "a;b", "coi-" + "x" * 63, 'a"b'])
def test_names_that_cannot_be_nft_identifiers_are_refused(name):
    with pytest.raises(CoiError):
        nft.nft_remove_script(name)


def test_interface_names_are_checked():
    with pytest.raises(CoiError):
        nft.nft_apply_script(replace(ATT, veth='x" accept; drop'), plan(net_config(), None, env={}))


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
    assert nft.containers_in_ruleset(ruleset) == {"coi-a-1", "coi-b-2", "coi-c-3"}


# ---- Incus ACL rules ------------------------------------------------------------------------------

def test_acl_spec_restricted():
    egress, ingress, nic = acl.acl_spec(ATT, plan(net_config(), None, env={}))
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
    policy = plan(net_config(), None, env={})
    egress, _, _ = acl.acl_spec(ATT, policy, host_addresses=["203.0.113.7", "10.195.0.1", "192.0.2.9"])
    assert ("reject", "192.0.2.9,203.0.113.7") in [(r["action"], r["destination"]) for r in egress]


def test_acl_spec_allowlist():
    policy = plan(net_config(allowed_domains=("a.example",)), "allowlist", env={})
    egress, _, nic = acl.acl_spec(ATT, policy, ["192.0.2.5", "192.0.2.5", "198.51.100.0/24"])
    assert [(r["action"], r["destination"]) for r in egress] == [("allow", "192.0.2.5,198.51.100.0/24")]
    assert nic["security.acls.default.egress.action"] == "reject"


@pytest.mark.parametrize("subnet, gateway, ranges", [
    ("10.195.0.0/24", "10.195.0.1", "10.195.0.2-10.195.0.254"),
    ("10.195.0.0/24", "10.195.0.254", "10.195.0.1-10.195.0.253"),
    ("10.195.0.0/24", "10.195.0.100", "10.195.0.1-10.195.0.99,10.195.0.101-10.195.0.254"),
    ("10.9.0.0/30", "10.9.0.1", "10.9.0.2"),
])
def test_acl_ranges_leave_out_the_gateway(subnet, gateway, ranges):
    assert acl.range_without(subnet, gateway) == ranges



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
    assert nft.parse_trace(line) == parsed



@pytest.mark.parametrize("name", ["eth0", "veth1234abcd", "coi0123456789ab", "br-x.10", "a" * 15])
def test_plain_interface_names_pass(name):
    assert nft.check_iface(name) == name


@pytest.mark.parametrize("name", ["", "a" * 16, "-f", ".x", 'x"y', "x y", "x{", "eth0;drop", 7, None])
def test_other_interface_names_are_refused(name):
    with pytest.raises(CoiError):
        nft.check_iface(name)


@pytest.mark.parametrize("addresses, added", [
    ([], ""),
    (["192.0.2.2", "192.0.2.1"], "add element inet coi coi-x-1.allow { 192.0.2.1, 192.0.2.2 }\n"),
    (["192.0.2.0/24", "192.0.2.7"], "add element inet coi coi-x-1.allow { 192.0.2.0/24 }\n"),
])
def test_set_script_swaps_the_addresses_atomically(addresses, added):
    assert nft.nft_set_script("coi-x-1", addresses) == "flush set inet coi coi-x-1.allow\n" + added


@pytest.mark.parametrize("mode", ["open", "closed", ""])
def test_only_filtered_modes_have_rules(mode):
    with pytest.raises(ValueError):
        nft.nft_apply_script(ATT, NetworkPolicy(mode=mode))
    with pytest.raises(ValueError):
        acl.acl_spec(ATT, NetworkPolicy(mode=mode))


@pytest.mark.parametrize("field, value", [("ipv4", "10.195.0.300"), ("gateway", "gw"), ("subnet", "10.195.0.1/24")])
def test_addresses_are_checked_before_they_reach_a_rule(field, value):
    with pytest.raises(ValueError):
        nft.nft_apply_script(replace(ATT, **{field: value}), NetworkPolicy(mode="restricted"))


@pytest.mark.parametrize("family, rule, script", [
    ("inet", "ip daddr 10.0.0.0/8 reject",
     "table inet coi_doctor_probe {\n chain c {\n  type filter hook forward priority 0; policy accept;\n"
     "  ip daddr 10.0.0.0/8 reject\n }\n}\n"),
    ("bridge", "ct state established accept",
     "table bridge coi_doctor_probe {\n chain c {\n  type filter hook forward priority 0; policy accept;\n"
     "  ct state established accept\n }\n}\n"),
])
def test_nft_probe(family, rule, script):
    assert nft.nft_probe(family, rule) == script


@pytest.mark.parametrize("listing, interfaces", [
    ({}, []),
    ({"nftables": [{"rule": {"expr": [{"match": {"left": {"meta": {"key": "iifname"}}, "right": "coi1"}},
                                      {"match": {"left": {"meta": {"key": "oifname"}}, "right": "coi1"}},
                                      {"match": {"left": {"meta": {"key": "oifname"}}, "right": "coi2"}}]}}]},
     ["coi1", "coi2"]),
    ({"nftables": [{"rule": {"expr": [{"match": {"left": {"meta": {"key": "iif"}}, "right": "coi1"}},
                                      {"match": {"left": {"meta": {"key": "iifname"}}, "right": {"set": ["x"]}}},
                                      {"match": {"left": {"meta": {"key": "iifname"}}, "right": 'bad" name'}}]}}]},
     []),
])
def test_interfaces_in_chain(listing, interfaces):
    assert nft.interfaces_in_chain(listing) == interfaces


@pytest.mark.parametrize("listing, gate", [
    ({}, False),
    ({"nftables": [{"chain": {"name": "gate", "hook": "prerouting"}}]}, True),
    ({"nftables": [{"chain": {"name": "gate", "hook": "forward"}}]}, False),
    ({"nftables": [{"chain": {"name": "coi-a-1.spoof", "hook": "prerouting"}}, "junk"]}, False),
])
def test_gate_in_ruleset(listing, gate):
    assert nft.gate_in_ruleset(listing) is gate


# ---- Incus ACLs: names and refusals -------------------------------------------------------------

@pytest.mark.parametrize("message, reason", [
    ('Failed adding bridge filter rules ... Error: Could not process rule: Protocol error',
     "Incus cannot apply network ACLs to bridge NICs on this kernel (no bridge-family conntrack)"),
    ("nft: ct state established,related accept: not supported",
     "Incus cannot apply network ACLs to bridge NICs on this kernel (no bridge-family conntrack)"),
    ("\n  Device validation failed\nmore detail\n", "Incus refused network ACLs on the NIC: Device validation failed"),
    ("", "Incus refused network ACLs on the NIC: no output"),
    ("x" * 400, "Incus refused network ACLs on the NIC: " + "x" * 300),
])
def test_acl_refusal_reasons(message, reason):
    assert acl.refusal_reason(message) == reason


@pytest.mark.parametrize("name", ["coi-abc12345-1", "a"])
def test_acl_names_are_the_container_names(name):
    assert acl.acl_name(name) == name


@pytest.mark.parametrize("name", ["", "coi-", "a b", "coi_x"])
def test_acl_names_are_checked(name):
    with pytest.raises(CoiError):
        acl.acl_name(name)


# ---- the helper's request --------------------------------------------------------------------

@pytest.mark.parametrize("policy, addresses, extra", [
    (NetworkPolicy(mode="restricted", blocked=("10.0.0.0/8",)), [], {"blocked": ["10.0.0.0/8"], "log": False}),
    (NetworkPolicy(mode="allowlist", log_blocked=True), ["192.0.2.1"], {"allowed": ["192.0.2.1"], "log": True}),
])
def test_apply_request_carries_the_values_the_helper_checks(policy, addresses, extra):
    assert backends.apply_request(ATT, policy, addresses) == {
        "action": "apply", "container": ATT.container, "ipv4": ATT.ipv4, "veth": ATT.veth,
        "gateway": ATT.gateway, "subnet": ATT.subnet, "mode": policy.mode,
        "blocked": [], "allowed": [], "log": False, **extra}


@pytest.mark.parametrize("policy, hosts, egress", [
    (NetworkPolicy(mode="restricted"), [], [("reject", "10.195.0.0/24"), ("reject", "::/0")]),
    (NetworkPolicy(mode="restricted", blocked=("10.0.0.0/8",)), ["10.195.0.1"],
     [("reject", "10.195.0.0/24"), ("reject", "10.0.0.0/8"), ("reject", "::/0")]),  # the bridge's own: in the subnet
    (NetworkPolicy(mode="restricted", blocked=("10.0.0.0/8",)), ["203.0.113.7"],
     [("reject", "10.195.0.0/24"), ("reject", "203.0.113.7"), ("reject", "10.0.0.0/8"), ("reject", "::/0")]),
    (NetworkPolicy(mode="allowlist"), ["203.0.113.7"], []),  # nothing resolved: the default refuses all
])
def test_acl_egress_rules(policy, hosts, egress):
    rules, _, nic = acl.acl_spec(ATT, policy, host_addresses=hosts)
    assert [(r["action"], r["destination"]) for r in rules] == egress
    assert nic["security.acls.default.egress.action"] == ("allow" if policy.mode == "restricted" else "reject")


@pytest.mark.parametrize("text, n, first", [
    ("", 4, "no output"),
    ("\n\n", 1, "no output"),
    ("Error: one\n\n two \nthree", 2, "Error: one /  two "),
    ("a\nb\nc\nd\ne", 4, "a / b / c / d"),
])
def test_first_lines_of_a_tool_s_error(text, n, first):
    assert backends._first_lines(text, n) == first
