"""Resolving allowlist names (coi.network.dns): DNS answers parsed, a query against a
local server, the fallback to the last good addresses, and where names are looked up."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from coi.network.attach import Attachment
from coi.network.dns import ResolveError, dns_query_a, parse_dns_answer, resolve_allowed, resolver_for
from coi.network.policy import NetworkPolicy

ATT = Attachment(container="coi-abc12345-1", nic="eth0", bridge="coibr0", veth="veth1234abcd",
                 ipv4="10.195.0.23", gateway="10.195.0.1", subnet="10.195.0.0/24")


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
    assert parse_dns_answer(data, "a.example") == addresses


@pytest.mark.parametrize("data, message", [
    (dns_reply(rcode=3), "no such name"),
    (dns_reply(rcode=2), "DNS error code 2"),
    (dns_reply(answers=[a_record("192.0.2.1")])[:-2], "truncated|malformed"),
    (b"\x00\x07", "malformed"),
])
def test_parse_dns_errors(data, message):
    with pytest.raises(ResolveError, match=message):
        parse_dns_answer(data, "a.example")


def test_dns_query_against_a_local_server():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        def answer():
            data, peer = server.recvfrom(512)
            qid = data[:2]
            server.sendto(b"\x99\x99" + dns_reply()[2:], peer)  # a stray answer with another id is ignored
            server.sendto(qid + dns_reply(answers=[a_record("192.0.2.44")])[2:], peer)
        thread = threading.Thread(target=answer)
        thread.start()
        assert dns_query_a("a.example", server.getsockname(), timeout=2) == ["192.0.2.44"]
        thread.join()


def test_dns_query_timeout_is_a_resolve_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(ResolveError, match="no answer"):
            dns_query_a("a.example", silent.getsockname(), timeout=0.1)


def test_resolve_keeps_cached_addresses_reports_failures_and_merges_duplicates():
    answers = {"up.example": ["192.0.2.1", "192.0.2.1"], "same.example": ["192.0.2.1"]}

    def query(name, server):
        if name in answers:
            return answers[name]
        raise ResolveError(f"{name}: no such name")

    cache = {"flaky.example": {"addresses": ["198.51.100.7"]}}
    result = resolve_allowed(["up.example", "same.example", "flaky.example", "never.example", "203.0.113.0/24"],
                                     server=("127.0.0.1", 53), cache=cache, query=query)
    assert result.addresses == ["192.0.2.1", "198.51.100.7", "203.0.113.0/24"]
    assert result.stale == ["flaky.example"]
    assert list(result.failed) == ["never.example"]
    assert cache["up.example"]["addresses"] == ["192.0.2.1"]


@pytest.mark.parametrize("resolver, server", [
    (None, ("10.195.0.1", 53)),  # the bridge's DNS: what the container itself asks
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("10.0.0.53:53", ("10.0.0.53", 53)),
])
def test_where_names_are_looked_up(resolver, server):
    assert resolver_for(NetworkPolicy(mode="allowlist", resolver=resolver), ATT) == server


def _answers(table):
    def query(name, server):
        if name in table:
            return table[name]
        raise ResolveError(f"{name}: no such name")
    return query


@pytest.mark.parametrize("entries, answers, cache, addresses, failed, stale", [
    (["192.0.2.0/24"], {}, {}, ["192.0.2.0/24"], [], []),  # addresses are not looked up
    (["a.example"], {"a.example": ["192.0.2.2", "192.0.2.1"]}, {}, ["192.0.2.1", "192.0.2.2"], [], []),
    (["a.example"], {"a.example": []}, {}, [], ["a.example"], []),  # an empty answer is a failure
    (["a.example"], {}, {"a.example": {"addresses": ["192.0.2.9"]}}, ["192.0.2.9"], [], ["a.example"]),
    (["a.example"], {}, {"a.example": {"addresses": []}}, [], ["a.example"], []),
    (["a.example", "b.example"], {"a.example": ["192.0.2.1"]}, {}, ["192.0.2.1"], ["b.example"], []),
])
def test_resolve_table(entries, answers, cache, addresses, failed, stale):
    result = resolve_allowed(entries, server=("127.0.0.1", 53), cache=dict(cache), query=_answers(answers))
    assert (result.addresses, list(result.failed), result.stale) == (addresses, failed, stale)


def test_failed_answers_say_why_and_good_ones_are_cached():
    cache: dict = {}
    result = resolve_allowed(["a.example", "b.example"], server=("127.0.0.1", 53), cache=cache,
                             query=_answers({"a.example": ["192.0.2.1"], "b.example": []}))
    assert result.failed == {"b.example": "b.example: no IPv4 address"}
    assert list(cache) == ["a.example"] and cache["a.example"]["addresses"] == ["192.0.2.1"]


def test_a_name_that_is_no_name_is_a_resolve_error():
    with pytest.raises(ResolveError, match="not a valid name"):
        dns_query_a("a" * 64 + ".example", ("127.0.0.1", 9), timeout=0.1)
