"""The allowlist by name against the real daemon, real nftables and coi's real proxy
(mitmproxy): containers' TCP 80 and 443 redirected to it, let through by SNI or Host.

Targets are only the tests' own hosts: a web host in a network namespace serving several
names on ONE address (HTTP on 80, HTTPS on 443 with the lab's own CA), and the lab's DNS
server, which the proxy asks (COI_NETWORK_RESOLVER) for those names.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from coi import network
from coi.config import default_config
from coi.network import proxy
from coi.network.egress import proxy_port
from coi.wait import wait_for

pytestmark = pytest.mark.integration

NAMES = ["allowed.test", "other.test", "x.wild.test", "wild.test"]
CA = "/tmp/coi-lab-ca.pem"

# Run inside the container: label -> [kind, address, name]; kinds: http (Host: name, port 80),
# tls (SNI name, port 443, the lab CA), rawtls (SNI name, no verification), tcp (connect to port).
PROBE = r'''
import json, socket, ssl, sys, time, urllib.request
def run(label, kind, address, name):
    started = time.monotonic()
    name, _, path = name.partition("/")  # "name/path": GET /path
    path = "/" + path
    try:
        if kind == "http":
            req = urllib.request.Request(f"http://{address}{path}", headers={"Host": name})
            try:
                with urllib.request.urlopen(req, timeout=5) as reply:
                    body = reply.read()
                    detail = [reply.status, body.decode() if len(body) < 4096 else len(body)]
            except urllib.error.HTTPError as exc:
                detail = [exc.code, exc.read().decode()]
        elif kind in ("tls", "rawtls", "auth"):
            ctx = (ssl.create_default_context(cafile=sys.argv[2]) if kind == "tls" else
                   ssl.create_default_context() if kind == "auth" else ssl._create_unverified_context())
            if kind == "auth":  # the system's CAs (coi's proxy CA among them) and the lab's
                ctx.load_verify_locations(sys.argv[2])
            path, extra = ("/auth", "Authorization: Bearer coi-placeholder-lab\r\n") if kind == "auth" else (path, "")
            with socket.create_connection((address, 443), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=name) as tls:
                    tls.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}\r\n{extra}\r\n".encode())
                    data = b""
                    while chunk := tls.recv(4096):
                        data += chunk
            body = data.split(b"\r\n\r\n", 1)[-1]
            detail = [int(data.split()[1]), body.decode() if len(body) < 4096 else len(body)]
        elif kind == "connect":  # through HTTPS_PROXY (address: the proxy URL), the name never resolved here
            ctx = ssl.create_default_context(cafile=sys.argv[2])
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": address}),
                                                 urllib.request.HTTPSHandler(context=ctx))
            with opener.open(f"https://{name}/", timeout=5) as reply:
                detail = [reply.status, reply.read().decode()]
        else:
            host, port = address.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=3).close()
            detail = ["connected"]
        ok = True
    except Exception as exc:
        ok, detail = False, [f"{type(exc).__name__}: {exc}"]
    return label, {"ok": ok, "detail": detail, "seconds": round(time.monotonic() - started, 2)}
print(json.dumps(dict(run(*item) for item in json.loads(sys.argv[1]))))
'''


@pytest.fixture
def sessions_dir(tmp_path):
    return tmp_path / "coi"


@pytest.fixture(scope="module")
def web(net_lab):
    """The web host, its names in the lab's DNS."""
    lab = net_lab["lab"]
    host = lab.web("web", "192.168.252.0/30", NAMES)
    net_lab["answers"].write_text(json.dumps({name: [host.address] for name in NAMES}))
    return {"address": host.address, "ca": lab.ca_pem, "resolver": f"{net_lab['dns'].address}:53"}


def by_name(web, **config) -> network.NetworkPolicy:
    cfg = default_config(env=os.environ).network
    cfg = replace(cfg, allowlist_by="name", block_private_networks=False, **config)
    return network.plan(cfg, "allowlist", env={"COI_NETWORK_RESOLVER": web["resolver"]})


@pytest.fixture
def box(incus, sandbox_image, sessions_dir, web):
    """A container on the coi bridge with the lab CA; removed with its rules (and the proxy)."""
    import uuid

    from coi import sessions
    from conftest import TEST_PREFIX

    name = f"{TEST_PREFIX}byname-{uuid.uuid4().hex[:8]}"
    incus.create_instance(name, image=sandbox_image, profiles=["coi"])
    try:
        sessions.ensure_running(incus, name)
        incus.push_file(name, CA, web["ca"].read_bytes(), uid=0, gid=0, mode=0o644)
        yield name
    finally:
        network.remove(name, sessions_dir=sessions_dir, client=incus)
        sessions.remove_container(incus, name)


def probe(incus, name: str, **items: tuple[str, str, str]) -> dict[str, dict]:
    result = incus.exec(name, ["python3", "-c", PROBE, json.dumps([[k, *v] for k, v in items.items()]), CA])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def proxy_pid(sessions_dir: Path) -> int | None:
    return proxy._pid(sessions_dir / "network")


def listen(incus, box: str, sessions_dir: Path) -> str:
    att = network.Attachment(**network.Store(sessions_dir).record(box)["attachment"])
    return f"{att.gateway}:{proxy_port(os.getuid())}"


def test_names_on_one_address_are_told_apart_by_sni_and_host(incus, box, sessions_dir, web):
    network.apply(incus, box, by_name(web, allowed_domains=("allowed.test", "*.wild.test")),
                  sessions_dir=sessions_dir, log=print)
    ip = web["address"]
    results = probe(incus, box,
                    http_ok=("http", ip, "allowed.test"), http_other=("http", ip, "other.test"),
                    tls_ok=("tls", ip, "allowed.test"), tls_other=("tls", ip, "other.test"),
                    wild=("tls", ip, "x.wild.test"), wild_apex=("http", ip, "wild.test"),
                    wrong_sni=("rawtls", ip, "evil.example"), no_sni=("rawtls", ip, ""),
                    other_port=("tcp", f"{ip}:8000", ""))
    assert results["http_ok"]["detail"] == [200, "hello allowed.test\n"], results["http_ok"]
    assert results["tls_ok"]["detail"] == [200, "hello allowed.test\n"], results["tls_ok"]  # the real cert
    assert results["wild"]["detail"] == [200, "hello x.wild.test\n"], results["wild"]
    status, body = results["http_other"]["detail"]
    assert status == 403 and "other.test" in body and "allowed_domains" in body
    assert results["wild_apex"]["detail"][0] == 403  # a wildcard covers the names below, not the domain
    for label in ("tls_other", "wrong_sni", "no_sni", "other_port"):
        assert not results[label]["ok"], (label, results[label])
        assert results[label]["seconds"] < 2, (label, results[label])  # refused, not timed out
    for label in ("tls_other", "wrong_sni"):  # a refused TLS connection is reset, not closed
        assert results[label]["detail"][0].startswith("ConnectionResetError"), (label, results[label])
    proxy_url = network.proxy_environment(incus)["HTTPS_PROXY"]
    explicit = probe(incus, box, ok=("connect", proxy_url, "allowed.test"), other=("connect", proxy_url, "other.test"))
    assert explicit["ok"]["detail"] == [200, "hello allowed.test\n"], explicit["ok"]
    assert not explicit["other"]["ok"] and "403" in explicit["other"]["detail"][0], explicit["other"]
    log = (sessions_dir / "network" / "connections" / f"{box}.jsonl").read_text().splitlines()
    verdicts = {(e["name"], e["verdict"]) for e in map(json.loads, log)}
    assert ("allowed.test", "allowed") in verdicts and ("other.test", "refused") in verdicts
    assert ("evil.example", "refused") in verdicts


def log_entries(sessions_dir: Path, box: str) -> list[dict]:
    path = sessions_dir / "network" / "connections" / f"{box}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_log_counts_the_bytes_each_way(incus, box, sessions_dir, web):
    network.apply(incus, box, by_name(web, allowed_domains=("allowed.test",)), sessions_dir=sessions_dir, log=print)
    size = 1_000_000
    results = probe(incus, box, http=("http", web["address"], f"allowed.test/zeros/{size}"),
                    tls=("tls", web["address"], f"allowed.test/zeros/{size}"))
    assert results["http"]["detail"] == [200, size] and results["tls"]["detail"] == [200, size], results
    wait_for(lambda: len(log_entries(sessions_dir, box)) >= 2, timeout=10, what="both connections in the log")
    for kind in ("http", "tls"):
        entry = next(e for e in log_entries(sessions_dir, box) if e["kind"] == kind)
        assert entry["verdict"] == "allowed", entry
        assert size < entry["bytes_received"] < size + 20_000, entry  # the body, its headers (and TLS)
        assert 30 < entry["bytes_sent"] < 5_000, entry  # the request
    network.apply(incus, box, by_name(web, allowed_domains=("allowed.test",)), sessions_dir=sessions_dir, log=print)
    assert log_entries(sessions_dir, box) == []  # the next start of the container is a new session, a new log


def test_a_killed_proxy_fails_closed_and_the_next_start_brings_it_back(incus, box, sessions_dir, web):
    policy = by_name(web, allowed_domains=("allowed.test",))
    network.apply(incus, box, policy, sessions_dir=sessions_dir, log=print)
    pid = proxy_pid(sessions_dir)
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not proxy._listening(listen(incus, box, sessions_dir)), timeout=10, what="the proxy to die")
    results = probe(incus, box, http=("http", web["address"], "allowed.test"),
                    tls=("tls", web["address"], "allowed.test"))
    for label in ("http", "tls"):
        assert not results[label]["ok"] and results[label]["seconds"] < 2, results[label]
    assert not network.revive_proxy(sessions_dir, ["some-other-container"])  # not needed by it
    assert network.revive_proxy(sessions_dir, [box])  # what the next coi list or attach does
    wait_for(lambda: proxy._listening(listen(incus, box, sessions_dir)), timeout=20, what="the proxy again")
    assert not network.revive_proxy(sessions_dir, [box])  # running: nothing to do
    assert probe(incus, box, http=("http", web["address"], "allowed.test"))["http"]["detail"][0] == 200
    os.kill(proxy_pid(sessions_dir), signal.SIGKILL)
    network.apply(incus, box, policy, sessions_dir=sessions_dir, log=print)  # and what a session start does
    assert probe(incus, box, http=("http", web["address"], "allowed.test"))["http"]["detail"][0] == 200


def test_a_session_whose_rules_fail_leaves_no_policy_and_no_proxy(incus, box, sessions_dir, web):
    from coi.errors import CoiError
    from coi.network.backends import BackendUnavailable, Backends

    class NoNft:
        def __init__(self, privileged_command):
            pass

        def apply(self, att, policy, addresses):
            raise BackendUnavailable("nft refused (as the test wants)")

    with pytest.raises(CoiError, match="nft refused"):
        network.apply(incus, box, by_name(web, allowed_domains=("allowed.test",)), sessions_dir=sessions_dir,
                      log=print, backends=Backends(nft=NoNft))
    assert not list((sessions_dir / "network" / "proxy").glob("*.json"))
    assert proxy_pid(sessions_dir) is None  # it was started for this session alone, and ended with it


def test_nothing_is_left_after_the_session(incus, box, sessions_dir, web):
    network.apply(incus, box, by_name(web, allowed_domains=("allowed.test",)), sessions_dir=sessions_dir, log=print)
    address = listen(incus, box, sessions_dir)
    network.remove(box, sessions_dir=sessions_dir, client=incus)
    assert not list((sessions_dir / "network" / "proxy").glob("*.json"))
    wait_for(lambda: not proxy._listening(address), timeout=10, what="the proxy to end")
    assert proxy_pid(sessions_dir) is None or not Path(f"/proc/{proxy_pid(sessions_dir)}/cmdline").read_bytes()


def test_a_credential_reaches_the_server_and_never_the_container(incus, box, sessions_dir, web, monkeypatch):
    from coi.config import Credential

    secret = "s3cr3t-" + os.urandom(6).hex()
    monkeypatch.setenv("COI_TEST_LAB_TOKEN", secret)
    monkeypatch.setenv("COI_PROXY_UPSTREAM_CA", str(web["ca"]))  # the proxy checks the lab's server too
    cred = Credential(name="lab", hosts=("allowed.test",), header="Authorization", env="COI_TEST_LAB_TOKEN",
                      value="Bearer {secret}", container_env="LAB_TOKEN")
    network.apply(incus, box, by_name(web, allowed_domains=("allowed.test", "other.test")),
                  sessions_dir=sessions_dir, log=print, credentials=[cred])
    ip = web["address"]
    results = probe(incus, box, injected=("auth", ip, "allowed.test"), elsewhere=("auth", ip, "other.test"))
    assert results["injected"]["detail"] == [200, f"auth Bearer {secret}\n"], results["injected"]
    # other.test is allowed but has no credential: spliced through, its placeholder untouched
    assert results["elsewhere"]["detail"] == [200, "auth Bearer coi-placeholder-lab\n"], results["elsewhere"]
    found = incus.exec(box, ["sh", "-c", f"grep -rsl {secret} /etc /home /root /tmp /usr/local /proc/*/environ; true"])
    assert found.stdout.strip() == "", found.stdout  # nowhere in the container
    log = (sessions_dir / "network" / "connections" / f"{box}.jsonl").read_text()
    assert secret not in log and secret not in (sessions_dir / "network" / "proxy.log").read_text()
