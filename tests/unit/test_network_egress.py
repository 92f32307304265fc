"""Allowlist by name (coi.network.egress and the redirect in coi.network.nft): which names
pass, which upstreams never do, the proxy's port, and the rules that send TCP 80/443 to it."""

from __future__ import annotations

import os

import pytest

from coi.network import egress
from coi.network.attach import Attachment
from coi.network.helper import script_for, validate
from coi.network.nft import nft_apply_script, nft_remove_script
from coi.network.policy import NetworkPolicy

pytestmark = pytest.mark.unit

RULES = egress.NameRules.from_entries(["pypi.org", "*.example.com", "192.0.2.7/32", "*.deep.test"])


@pytest.mark.parametrize("host, allowed", [
    ("pypi.org", True), ("PyPI.org.", True), ("pypi.org:443", True), ("files.pypi.org", False),
    ("a.example.com", True), ("a.b.example.com", True), ("example.com", False), ("badexample.com", False),
    ("example.com.evil.test", False), ("x.deep.test", True), ("192.0.2.7", False), ("", False), (None, False),
    ("[2001:db8::1]:443", False),
])
def test_names_pass_exactly_or_below_a_wildcard(host, allowed):
    assert RULES.allows(host) is allowed


@pytest.mark.parametrize("address, refused", [
    ("93.184.216.34", False), ("127.0.0.1", True), ("169.254.169.254", True), ("0.0.0.0", True),
    ("10.195.0.1", True), ("192.168.1.5", True), ("224.0.0.1", True), ("::1", True), ("nonsense", True),
])
def test_the_proxy_never_connects_to_the_host_or_local_ranges(address, refused):
    problem = egress.upstream_problem(address, refused=("10.0.0.0/8", "192.168.0.0/16"))
    assert (problem is not None) is refused


def test_the_refusal_names_the_domain_and_the_key():
    text = egress.refusal_text("Other.Test:80", 80)
    assert "other.test:80" in text and "[network] allowed_domains" in text


def test_programs_that_ask_for_a_proxy_get_the_same_filter():
    env = egress.proxy_variables("10.195.0.1", 1001)
    assert env["HTTPS_PROXY"] == env["http_proxy"] == f"http://10.195.0.1:{egress.explicit_port(1001)}"
    assert egress.explicit_port(1001) == egress.proxy_port(1001) + egress.EXPLICIT_OFFSET


def test_each_user_has_a_port_of_their_own():
    assert egress.proxy_port(1000) != egress.proxy_port(1001)
    assert all(egress.PORT_BASE <= egress.proxy_port(uid) < egress.PORT_BASE + 1000 for uid in (0, 1000, 65534))


ATT = Attachment(container="coi-test-a-1", nic="eth0", bridge="coibr0", veth="coi0123456789ab",
                 ipv4="10.195.0.23", gateway="10.195.0.1", subnet="10.195.0.0/24")


def test_by_name_tcp_80_and_443_go_to_the_proxy_and_only_its_port_is_opened_on_the_host():
    script = nft_apply_script(ATT, NetworkPolicy(mode="allowlist", proxy=True), ["192.0.2.7"], proxy_port=13001)
    assert ("add chain inet coi coi-test-a-1.nat { type nat hook prerouting priority dstnat; policy accept; }"
            in script)
    assert "ip saddr 10.195.0.23 tcp dport { 80, 443 } redirect to :13001" in script
    assert "ip saddr 10.195.0.23 ip daddr 10.195.0.1 tcp dport { 13001, 14001 } accept" in script
    assert "add element inet coi coi-test-a-1.allow { 192.0.2.7 }" in script  # addresses: as before
    plain = nft_apply_script(ATT, NetworkPolicy(mode="allowlist"), ["192.0.2.7"])
    assert "redirect" not in plain and "13001" not in plain
    assert "delete chain inet coi coi-test-a-1.nat" in nft_remove_script("coi-test-a-1")


def test_the_helper_redirects_only_to_the_callers_own_port(monkeypatch):
    request = {"action": "apply", "container": ATT.container, "ipv4": ATT.ipv4, "veth": ATT.veth,
               "gateway": ATT.gateway, "subnet": ATT.subnet, "mode": "allowlist", "allowed": [], "proxy": True}
    monkeypatch.setattr("os.getuid", lambda: 0)
    monkeypatch.setenv("SUDO_UID", "1234")
    assert f"redirect to :{egress.proxy_port(1234)}" in script_for(validate(request))
    with pytest.raises(Exception, match="unknown key"):
        validate({**request, "proxy_port": 22})
    with pytest.raises(Exception, match="only in allowlist mode"):
        validate({**request, "mode": "restricted"})
    with pytest.raises(Exception, match="expected true or false"):
        validate({**request, "proxy": "yes"})


def test_coi_logs_prints_and_follows_the_connection_log(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from coi.network.connlog import log_path

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = log_path(state / "network", "coi-test-ab12cd34-1")
    path.parent.mkdir(parents=True)
    entry = {"time": "t1", "container": "coi-test-ab12cd34-1", "name": "evil\x1b[2J.test", "port": 443,
             "kind": "tls", "verdict": "refused", "why": "not in allowed_domains"}
    path.write_text(json.dumps(entry) + "\n")
    env = {**os.environ, "COI_SESSIONS_DIR": str(state), "HOME": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    argv = [sys.executable, "-m", "coi", "logs", "coi-test-ab12cd34-1"]
    once = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert once.returncode == 0, once.stderr
    assert "refused" in once.stdout and "\x1b" not in once.stdout and "evil\\x1b[2J.test:443" in once.stdout
    with subprocess.Popen([*argv, "--follow", "--format", "json"], env=env, stdout=subprocess.PIPE, text=True) as follow:
        assert json.loads(follow.stdout.readline())["time"] == "t1"
        with open(path, "a") as fh:
            fh.write(json.dumps({**entry, "time": "t2", "verdict": "allowed"}) + "\n")
        assert json.loads(follow.stdout.readline())["time"] == "t2"  # a new entry arrives as it is written
        follow.terminate()
    missing = subprocess.run([*argv[:-1], "coi-test-none-1"], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "no network log" in missing.stderr


def test_a_log_line_shows_the_bytes_each_way():
    from coi.network.connlog import text

    line = text({"time": "t", "name": "pypi.org", "port": 443, "kind": "tls", "verdict": "allowed",
                 "bytes_sent": 517, "bytes_received": 1048576})
    assert line.endswith("pypi.org:443 sent 517 B, received 1048576 B")
    assert "sent" not in text({"time": "t", "name": "x", "port": 80, "kind": "http", "verdict": "refused",
                               "bytes_sent": "517"})  # only numbers are shown as counts


def test_the_kernel_counts_what_a_connection_carried():
    import socket

    from coi.network.proxy import tcp_bytes
    from coi.wait import wait_for

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            client.sendall(b"x" * 1000)
            assert len(peer.recv(4096)) == 1000
            peer.sendall(b"y" * 70_000)
            got = 0
            while got < 70_000:
                got += len(client.recv(65536))
            # (sent and acknowledged, received), from the proxy's side (peer)
            assert wait_for(lambda: tcp_bytes(peer) == (70_000, 1000), timeout=5, what="the acknowledgement")
    with socket.socket() as idle:
        assert tcp_bytes(idle) in (None, (0, 0))  # not connected: nothing


def test_a_pid_file_naming_another_program_is_not_the_proxy(tmp_path):
    from coi.network import proxy

    folder = tmp_path / proxy.POLICY_DIR
    folder.mkdir()
    (folder / proxy.PID_FILE).write_text(f"{os.getpid()}\n")  # alive, but pytest: never signalled as the proxy
    assert proxy._pid(tmp_path) is None
    (folder / proxy.PID_FILE).write_text("not a pid\n")
    assert proxy._pid(tmp_path) is None


def test_a_dead_proxy_is_started_again_only_for_a_running_container_that_needs_it(tmp_path, monkeypatch):
    from coi.network import proxy

    launched: list[str] = []
    monkeypatch.setattr(proxy, "launch", lambda network_dir, listen: launched.append(listen) or 4242)
    monkeypatch.setattr(proxy, "proxy_available", lambda: True)
    proxy.write_policy(tmp_path, ipv4="10.0.0.5", container="coi-test-a-1", allowed=["pypi.org"], refused=[],
                       resolver=None)
    assert not proxy.revive(tmp_path, {"coi-test-a-1"})  # never launched: no address to listen on
    (tmp_path / proxy.POLICY_DIR / proxy.LISTEN_FILE).write_text("10.0.0.1:13000\n")
    assert not proxy.revive(tmp_path, {"coi-test-b-1"}) and not proxy.revive(tmp_path, set())
    assert proxy.revive(tmp_path, {"coi-test-a-1", "coi-test-b-1"}) and launched == ["10.0.0.1:13000"]


def test_a_full_log_says_so_in_one_line():
    from coi.network.connlog import text

    assert text({"time": "t", "kind": "log", "verdict": "full", "why": "the log reached 8 MiB"}) == \
        "t the log reached 8 MiB"
