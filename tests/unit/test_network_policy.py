"""The network policy of a session (coi.network.policy): modes, ranges, allowlist
entries, environment knobs and the record's copy. Pure, table-driven."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from coi.config import NETWORK_MODES, default_config
from coi.errors import CoiError
from coi.network import policy as pol
from coi.network.policy import METADATA_RANGES as META, PRIVATE_RANGES as PRIVATE, NetworkPolicy, plan


def net_config(**changes):
    return replace(default_config(env={"HOME": "/home/u"}).network, **changes)


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
    policy = plan(net_config(**changes), override, env={})
    assert (policy.mode, policy.blocked) == (mode, blocked)


@pytest.mark.parametrize("mode, allowed", [
    ("restricted", ()),  # the list is kept only where it is used
    ("open", ()),
    ("allowlist", ("a.example",)),
])
def test_plan_keeps_the_allowlist_only_in_allowlist_mode(mode, allowed):
    assert plan(net_config(allowed_domains=("a.example",)), mode, env={}).allowed == allowed


def test_plan_allowlist_entries_are_checked_normalised_and_deduplicated():
    policy = plan(net_config(allowed_domains=("Deb.Debian.org.", "deb.debian.org", "192.0.2.7",
                                              "198.51.100.9/24", "_srv.example")), "allowlist", env={})
    assert policy.allowed == ("deb.debian.org", "192.0.2.7/32", "198.51.100.0/24", "_srv.example")


@pytest.mark.parametrize("entry, message", [
    ("*.192.0.2.1", "a wildcard needs a domain name"),
    ("exa mple.com", "not a domain name or an IPv4 address"),
    ("300.1.2.3", "not a domain name or an IPv4 address"),
    ("2001:db8::1", "not a domain name or an IPv4 address"),
    ("-bad.example", "not a domain name or an IPv4 address"),
    ("a" * 64 + ".example", "not a domain name or an IPv4 address"),
])
def test_plan_refuses_bad_allowlist_entries(entry, message):
    with pytest.raises(CoiError, match=message):
        plan(net_config(allowed_domains=(entry,)), "allowlist", env={})


def test_the_allowlist_by_name_goes_through_the_proxy_and_takes_wildcards():
    policy = plan(net_config(allowed_domains=("*.Example.com", "a.org", "192.0.2.7"), allowlist_by="name"),
                  "allowlist", env={})
    assert policy.proxy and policy.allowed == ("*.example.com", "a.org", "192.0.2.7/32")
    assert not plan(net_config(allowed_domains=("a.org",), allowlist_by="name"), "restricted", env={}).proxy
    assert not plan(net_config(allowed_domains=("a.org",), allowlist_by="address"), "allowlist", env={}).proxy
    with pytest.raises(CoiError, match="wildcards need the allowlist by name"):
        plan(net_config(allowed_domains=("*.a.org",), allowlist_by="address"), "allowlist", env={})


def test_plan_allowlist_needs_entries_and_unknown_modes_are_refused():
    with pytest.raises(CoiError, match="needs at least one entry"):
        plan(net_config(), "allowlist", env={})
    with pytest.raises(CoiError, match="unknown network mode") as err:
        plan(net_config(), "closed", env={})
    assert err.value.hint == "use restricted, allowlist or open"


def test_the_modes_are_the_configs():
    assert NETWORK_MODES == ("restricted", "allowlist", "open")
    assert not hasattr(pol, "MODES")  # one definition, in coi.config


@pytest.mark.parametrize("env, refresh, resolver", [
    ({}, 30 * 60, None),
    ({"COI_NETWORK_REFRESH_SECONDS": "2"}, 2, None),
    ({"COI_NETWORK_REFRESH_SECONDS": "0"}, 1, None),
    ({"COI_NETWORK_REFRESH_SECONDS": ""}, 30 * 60, None),
    ({"COI_NETWORK_RESOLVER": "127.0.0.1:5353"}, 30 * 60, "127.0.0.1:5353"),
    ({"COI_NETWORK_RESOLVER": "10.0.0.53"}, 30 * 60, "10.0.0.53:53"),
])
def test_plan_refresh_interval_and_resolver_from_the_environment(env, refresh, resolver):
    policy = plan(net_config(allowed_domains=("a.example",)), "allowlist", env=env)
    assert (policy.refresh_seconds, policy.resolver) == (refresh, resolver)


@pytest.mark.parametrize("env, message", [
    ({"COI_NETWORK_REFRESH_SECONDS": "soon"}, "not a whole number"),
    ({"COI_NETWORK_RESOLVER": "dns.example:53"}, "is not IPV4"),
    ({"COI_NETWORK_RESOLVER": "10.0.0.53:dns"}, "is not IPV4"),
])
def test_plan_refuses_bad_environment_values(env, message):
    with pytest.raises(CoiError, match=message):
        plan(net_config(), None, env=env)


def test_plan_carries_privileged_command_and_logging_and_round_trips():
    cfg = net_config(privileged_command=("sudo", "-n"),
                     logging=replace(net_config().logging, enabled=True, path=Path("/tmp/n.log")))
    policy = plan(cfg, None, env={})
    assert policy.privileged_command == ("sudo", "-n")
    assert (policy.log_blocked, policy.log_path) == (True, "/tmp/n.log")
    # The record never carries the privileged command: it comes from trusted config when used.
    assert "privileged_command" not in policy.to_json()
    assert NetworkPolicy.from_json(policy.to_json()) == replace(policy, privileged_command=())
    assert NetworkPolicy.from_json(policy.to_json(), privileged_command=("sudo", "-n")) == policy
    planted = {**policy.to_json(), "privileged_command": ["sh", "-c", "touch /tmp/pwned"]}
    assert NetworkPolicy.from_json(planted).privileged_command == ()
    assert plan(cfg, "open", env={}).log_blocked is False


@pytest.mark.parametrize("data, policy", [
    ({"mode": "open"}, NetworkPolicy(mode="open")),
    ({"mode": "restricted", "blocked": ["10.0.0.0/8"], "unknown": 1}, NetworkPolicy("restricted", ("10.0.0.0/8",))),
    ({"mode": "allowlist", "allowed": ["a.example"], "refresh_seconds": 5},
     NetworkPolicy("allowlist", allowed=("a.example",), refresh_seconds=5)),
])
def test_policy_from_a_record(data, policy):
    assert NetworkPolicy.from_json(data) == policy


@pytest.mark.parametrize("entry, checked", [
    ("example.com", "example.com"),
    (" Example.COM. ", "example.com"),
    ("_dmarc.example.com", "_dmarc.example.com"),
    ("192.0.2.7", "192.0.2.7/32"),
    ("198.51.100.9/24", "198.51.100.0/24"),
    ("localhost", "localhost"),
])
def test_check_entry(entry, checked):
    assert pol.check_entry(entry) == checked


@pytest.mark.parametrize("text, ipv4", [
    ("192.0.2.1", True), ("192.0.2.0/24", True), ("192.0.2.1/24", True),
    ("2001:db8::1", False), ("example.com", False), ("300.1.1.1", False), ("", False),
])
def test_is_ipv4(text, ipv4):
    assert pol.is_ipv4(text) is ipv4


@pytest.mark.parametrize("text, address", [
    ("", None), ("10.0.0.53", "10.0.0.53:53"), ("127.0.0.1:5353", "127.0.0.1:5353"), ("127.0.0.1:", "127.0.0.1:53"),
])
def test_resolver_address(text, address):
    assert pol.resolver_address(text) == address


@pytest.mark.parametrize("addresses, collapsed", [
    ([], []),
    (["192.0.2.9", "192.0.2.9"], ["192.0.2.9"]),
    (["192.0.2.2", "192.0.2.1"], ["192.0.2.1", "192.0.2.2"]),
    (["198.51.100.0/24", "198.51.100.7"], ["198.51.100.0/24"]),
    (["192.0.2.0/25", "192.0.2.128/25"], ["192.0.2.0/24"]),
    (["192.0.2.9/32", "10.1.2.3/8"], ["10.0.0.0/8", "192.0.2.9"]),
])
def test_collapse(addresses, collapsed):
    assert pol.collapse(addresses) == collapsed


@pytest.mark.parametrize("mode, changes, blocked", [
    ("open", {}, ()),
    ("allowlist", {}, ()),
    ("restricted", {}, PRIVATE + META),
    ("restricted", {"allow_local_network_access": True, "block_private_networks": True}, META),
    ("restricted", {"block_metadata_endpoint": False, "allow_local_network_access": True}, ()),
])
def test_blocked_ranges(mode, changes, blocked):
    assert pol.blocked_ranges(net_config(**changes), mode) == blocked


@pytest.mark.parametrize("minutes, env, seconds", [
    (30, {}, 1800),
    (1, {}, 60),
    (30, {"COI_NETWORK_REFRESH_SECONDS": "7"}, 7),
    (30, {"COI_NETWORK_REFRESH_SECONDS": "-3"}, 1),
    (30, {"OTHER": "7"}, 1800),
])
def test_refresh_seconds(minutes, env, seconds):
    assert pol.refresh_seconds(minutes, env) == seconds
