"""Network isolation through the commands people type: coi shell --network ..., coi run,
coi kill/shutdown/clean, run as a normal user whose nft goes through 'sudo -n'.

Probes run inside the session container with 'coi container exec --capture'.
Targets are only the tests' own hosts (net_lab) and the Debian registry by name.
Where a test looks at the rules, it looks in the backend coi picks here
(``coi_backend``: Incus ACLs where the kernel takes them, else host nftables).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from coi import network
from coi.wait import wait_for

from conftest import NET_PROBE
from netbackend import acl_on_nic, coi_backend, nft_table, ruled_anywhere, user_proxies, uses_nft  # noqa: F401

pytestmark = pytest.mark.e2e

REGISTRY_URL = "http://deb.debian.org/debian/dists/bookworm/Release"



def start(user, workspace, *args: str) -> str:
    name = user.background(workspace, *args)["container"]
    return name


def probe(user, name: str, **targets: tuple[str, str]) -> dict[str, dict]:
    items = json.dumps([[label, kind, target] for label, (kind, target) in targets.items()])
    proc = user.run(["container", "exec", name, "--capture", "--", "python3", "-c", NET_PROBE, items])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 0, out
    return json.loads(out["stdout"])


def refused_fast(result: dict) -> bool:
    return not result["ok"] and result["seconds"] < 1.5


def test_shell_restricted_by_default_then_kill_removes_the_rules(net_user, workspace, net_lab, incus, coi_backend):
    name = start(net_user, workspace)
    assert name in coi_backend.containers()
    results = probe(net_user, name, private=("http", net_lab["private"].url),
                    metadata=("http", net_lab["metadata"].url),
                    gateway=("http", f"http://{net_lab['gateway']}:{net_lab['gateway_port']}/"),
                    registry=("http", REGISTRY_URL))
    assert all(refused_fast(results[k]) for k in ("private", "metadata", "gateway")), results
    assert results["registry"]["ok"], results
    assert net_user.run(["kill", name]).returncode == 0
    assert name not in ruled_anywhere(incus)


def test_shell_allowlist_from_config_and_shutdown(net_user, workspace, net_lab, incus):
    config = net_user.home / ".config" / "coi" / "config.toml"
    config.write_text(config.read_text().replace("[network]\n", '[network]\nallowed_domains = ["deb.debian.org"]\n'))
    name = start(net_user, workspace, "--network", "allowlist")
    results = probe(net_user, name, private=("http", net_lab["private"].url), registry=("http", REGISTRY_URL),
                    public_dns=("dns", f"{net_lab['dns'].address}:53"))
    assert results["registry"]["ok"], results
    assert refused_fast(results["private"]) and refused_fast(results["public_dns"]), results
    assert net_user.run(["shutdown", name, "--timeout", "5"]).returncode == 0
    assert name not in ruled_anywhere(incus)


def test_shell_allowlist_by_name_goes_through_the_users_proxy(net_user, workspace, net_lab, incus):
    config = net_user.home / ".config" / "coi" / "config.toml"
    config.write_text(config.read_text().replace(
        "[network]\n", '[network]\nallowlist_by = "name"\nallowed_domains = ["deb.debian.org"]\n'))
    name = start(net_user, workspace, "--network", "allowlist")
    results = probe(net_user, name, registry=("http", REGISTRY_URL), npm=("http", "http://registry.npmjs.org/"),
                    private=("http", net_lab["private"].url))
    assert results["registry"]["ok"], results
    assert refused_fast(results["npm"]) and "403" in results["npm"]["detail"], results
    assert refused_fast(results["private"]), results
    # The proxy is the user's own process, and outlives the coi that started it.
    pids = user_proxies(net_user.home / ".coi")
    assert len(pids) == 1 and os.stat(f"/proc/{pids[0]}").st_uid == net_user.uid
    assert not (net_user.home / ".mitmproxy").exists()  # its files stay in coi's state directory
    log = net_user.run(["logs", name, "--network", "--format", "json"])
    assert log.returncode == 0, log.stderr
    entries = [json.loads(line) for line in log.stdout.splitlines()]
    assert {(e["name"], e["verdict"]) for e in entries} >= {("deb.debian.org", "allowed"),
                                                           ("registry.npmjs.org", "refused")}
    text = net_user.run(["logs", name])
    assert "refused" in text.stdout and "registry.npmjs.org:80" in text.stdout
    [listed] = [c for c in json.loads(net_user.run(["list", "--format", "json"]).stdout)["active_containers"]
                if c["name"] == name]
    assert listed["refused_connections"] >= 1
    os.kill(pids[0], signal.SIGKILL)  # the proxy dies under the session: the next coi command revives it
    wait_for(lambda: not user_proxies(net_user.home / ".coi"), timeout=10, what="the proxy to die")
    revived = net_user.run(["list"])
    assert revived.returncode == 0 and "started it again" in revived.stderr, revived.stderr
    assert len(user_proxies(net_user.home / ".coi")) == 1
    assert net_user.run(["kill", name]).returncode == 0
    wait_for(lambda: not user_proxies(net_user.home / ".coi"), timeout=10,
             what="the proxy to end with the last session")


def test_shell_open_filters_nothing(net_user, workspace, net_lab, incus):
    name = start(net_user, workspace, "--network", "open")
    assert name not in ruled_anywhere(incus)
    # nothing waits for DHCP in open mode: wait for the address before probing
    wait_for(lambda: network.find_attachment(incus, name).ipv4, timeout=30, what=f"{name} to get an address")
    results = probe(net_user, name, private=("http", net_lab["private"].url))
    assert results["private"]["ok"], results


def test_without_privileges_the_session_does_not_start(session_user, workspace, coi_backend):
    """Where coi needs host nftables (the kernel refuses Incus ACLs); where ACLs work, the
    daemon filters without privileges and the session starts."""
    config = session_user.home / ".config" / "coi" / "config.toml"
    # An explicit empty list overrides what /etc/coi/config.toml (coi setup) grants.
    config.write_text("\n".join("privileged_command = []" if "privileged_command" in l else l
                                for l in config.read_text().splitlines()))
    if not uses_nft(coi_backend):
        name = start(session_user, workspace)
        assert session_user.run(["kill", name]).returncode == 0
        return
    proc = session_user.run(["shell", "--background"], cwd=workspace)
    assert proc.returncode == 1, proc.stderr
    assert "cannot enforce network mode restricted" in proc.stderr
    assert "--network=open" in proc.stderr
    listed = json.loads(session_user.run(["list", "--format", "json"], cwd=workspace).stdout)
    assert [c for c in listed["active_containers"] if c["workspace"] == str(workspace)] == []


def test_run_is_isolated_too(net_user, workspace, net_lab):
    items = json.dumps([["private", "http", net_lab["private"].url]])
    proc = net_user.run(["run", "--capture", "--", "python3", "-c", NET_PROBE, items], cwd=workspace)
    result = json.loads(json.loads(proc.stdout)["stdout"])["private"]
    assert refused_fast(result), result


def test_poweroff_inside_and_clean_leave_no_rules(net_user, workspace, incus):
    name = start(net_user, workspace, "--persistent")
    net_user.run(["container", "exec", name, "--", "sh", "-c", "(sleep 0.2; poweroff) >/dev/null 2>&1 &"])
    # no coi process is attached: the watcher removes the rules once the container stays stopped
    wait_for(lambda: name not in ruled_anywhere(incus), timeout=60, what="the rules of the stopped container to go")
    # a container deleted behind coi's back while its watcher is gone too: coi clean removes the rules
    name2 = start(net_user, workspace)
    record = network.Store(net_user.home / ".coi").record(name2)
    os.kill(record["watcher"], signal.SIGKILL)
    subprocess.run(["incus", "delete", "--force", name2], check=True, capture_output=True)
    assert net_user.run(["clean", "--force"], cwd=workspace).returncode == 0
    assert name2 not in ruled_anywhere(incus)


def test_run_has_the_network_from_its_first_moment(net_user, workspace):
    """No wait for DHCP, yet the command's first request gets through: the address,
    default route and resolver are in place before the container's init runs."""
    items = json.dumps([["registry", "http", REGISTRY_URL]])
    proc = net_user.run(["run", "--capture", "--", "python3", "-c", NET_PROBE, items], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(json.loads(proc.stdout)["stdout"])["registry"]
    assert result["ok"], result


def test_sessions_get_distinct_pinned_addresses_keyed_in_their_rules(net_user, workspace, incus, coi_backend):
    names = [start(net_user, workspace) for _ in range(2)]
    ruleset = nft_table("bridge")  # the gate's open set, and the nft backend's chains
    addresses = set()
    for name in names:
        eth0 = incus.instance(name)["devices"]["eth0"]
        assert eth0["host_name"].startswith("coi") and f'"{eth0["host_name"]}"' in ruleset
        assert uses_nft(coi_backend) or acl_on_nic(incus, name)
        state = incus.instance_state(name)["network"]["eth0"]
        assert state["host_name"] == eth0["host_name"]
        assert eth0["ipv4.address"] in [a["address"] for a in state["addresses"] if a["family"] == "inet"]
        addresses.add(eth0["ipv4.address"])
    assert len(addresses) == 2
    assert net_user.run(["kill", *names]).returncode == 0
