"""coi's privileged nft helper (coi.network.helper) and its installation: request validation, generated
scripts (the gate too), exit codes, launcher, sudoers rule and path checks, without nft."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from coi import host, network
from coi.host import privileges
from coi.network import helper as nfthelper
from coi.errors import CoiError

GOOD = {"action": "apply", "container": "coi-abc12345-1", "ipv4": "10.195.0.23", "veth": "coi0123456789ab",
        "gateway": "10.195.0.1", "subnet": "10.195.0.0/24", "mode": "restricted",
        "blocked": ["10.0.0.0/8"], "allowed": [], "log": False}


@pytest.mark.parametrize("request_, message", [
    ({}, "unknown action"),
    ({"action": "flush"}, "unknown action"),
    ({"action": ["list"]}, "unknown action"),
    ({"action": "list", "extra": 1}, "unknown key"),
    ({**GOOD, "script": "flush ruleset"}, "unknown key"),
    ({**GOOD, "file": "/etc/shadow"}, "unknown key"),
    ({k: v for k, v in GOOD.items() if k != "veth"}, "missing key for apply: veth"),
    ({**GOOD, "container": 'a"; flush ruleset; "'}, "container: not a coi container name"),
    ({**GOOD, "container": "coi-x\nflush ruleset"}, "container"),
    ({**GOOD, "container": "coi-x.out"}, "container"),
    ({**GOOD, "container": 7}, "container: expected a short string"),
    ({**GOOD, "veth": "x{ accept }"}, "veth: not an interface name"),
    ({**GOOD, "veth": 'x" accept'}, "veth"),
    ({**GOOD, "veth": "a" * 16}, "veth"),
    ({**GOOD, "veth": "-f"}, "veth"),
    ({**GOOD, "ipv4": "10.195.0.300"}, "ipv4: not an IPv4 address"),
    ({**GOOD, "ipv4": "10.196.0.2"}, "two host addresses"),
    ({**GOOD, "ipv4": "10.195.0.1"}, "two host addresses"),
    ({**GOOD, "subnet": "10.195.0.1/24"}, "subnet: not an IPv4 network"),
    ({**GOOD, "gateway": "::1"}, "gateway: not an IPv4 address"),
    ({**GOOD, "mode": "open"}, "mode"),
    ({**GOOD, "log": "yes"}, "log"),
    ({**GOOD, "blocked": "10.0.0.0/8"}, "blocked"),
    ({**GOOD, "blocked": ["10.0.0.0/8 } accept"]}, "blocked"),
    ({**GOOD, "allowed": ["1.2.3.4"] * (nfthelper.MAX_ADDRESSES + 1)}, "allowed"),
    ({"action": "allow", "container": "coi-a-1", "addresses": ["example.com"]}, "addresses"),
    ({"action": "open", "veth": "eth0; drop"}, "veth"),
    ({"action": "remove", "container": "coi-a-1", "veth": "x"}, "unknown key"),
])
def test_bad_requests_are_refused(request_, message):
    with pytest.raises(nfthelper.HelperError) as err:
        nfthelper.validate(request_)
    assert err.value.code == nfthelper.REFUSED and message in err.value.message


@pytest.mark.parametrize("raw, message", [
    (b"not json", "not a JSON object"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"action": "list", "action": "gate"}', "duplicate key"),
    (b'{"action": NaN}', "NaN is not allowed"),
    (b"\xff\xfe", "not a JSON object"),
    (b"[" * 100000, "not a JSON object"),
    (b" " * (nfthelper.MAX_REQUEST + 1), "larger than"),
])
def test_bad_json_is_refused(raw, message):
    with pytest.raises(nfthelper.HelperError) as err:
        nfthelper.parse(raw)
    assert err.value.code == nfthelper.REFUSED and message in err.value.message


def test_a_good_request_is_normalised_and_generates_coi_s_own_script():
    req = nfthelper.validate({**GOOD, "allowed": ["192.0.2.9/32"], "blocked": ["10.1.2.3/8"]})
    assert req["blocked"] == ["10.0.0.0/8"] and req["allowed"] == ["192.0.2.9/32"]
    att = network.Attachment(container=GOOD["container"], nic="eth0", bridge="", veth=GOOD["veth"],
                             ipv4=GOOD["ipv4"], gateway=GOOD["gateway"], subnet=GOOD["subnet"])
    policy = network.NetworkPolicy(mode="restricted", blocked=("10.0.0.0/8",))
    assert nfthelper.script_for(req) == network.nft_apply_script(att, policy, ["192.0.2.9/32"])
    assert network.apply_request(att, policy) == {**GOOD, "allowed": []}


def test_every_line_touches_only_coi_s_tables():
    scripts = [nfthelper.script_for(nfthelper.validate(r), closed=["coiold0000000a"]) for r in (
        GOOD, {**GOOD, "mode": "allowlist", "allowed": ["192.0.2.1"], "log": True},
        {"action": "allow", "container": "coi-a-1", "addresses": ["192.0.2.1"]},
        {"action": "remove", "container": "coi-a-1"}, {"action": "gate"},
        {"action": "open", "veth": "veth1"}, {"action": "close", "veth": "veth1"})]
    for line in "".join(scripts).splitlines():
        words = line.split()
        assert words[0] in ("add", "flush", "delete"), line
        assert words[2:4] in (["inet", "coi"], ["bridge", "coi"]), line


def test_gate_script_is_a_default_deny_before_the_container_chains():
    assert network.nft_gate_script().splitlines() == [
        "add table bridge coi",
        "add set bridge coi open { type ifname; }",
        "add chain bridge coi gate { type filter hook prerouting priority -300; policy accept; }",
        "flush chain bridge coi gate",
        "add rule bridge coi gate iifname @open accept",
        'add rule bridge coi gate iifname "coi*" drop',
    ]
    assert network.GATE_PRIORITY < -200  # before the .spoof chains
    assert network.HOST_NAME_PREFIX == "coi"  # the pinned names the gate keys on


@pytest.mark.parametrize("script, tail", [
    (network.nft_open_script("coi0123456789ab"), ['add element bridge coi open { "coi0123456789ab" }']),
    (network.nft_close_script("coi0123456789ab"), ['add element bridge coi open { "coi0123456789ab" }',
                                                  'delete element bridge coi open { "coi0123456789ab" }']),
    (network.nft_remove_script("coi-a-1", ["v1", "v1"]), ['add element bridge coi open { "v1" }',
                                                         'delete element bridge coi open { "v1" }']),
])
def test_open_close_and_remove_scripts(script, tail):
    assert script.splitlines()[-len(tail):] == tail


def test_apply_shuts_the_old_interface_and_opens_the_new_one_in_one_transaction():
    script = nfthelper.script_for(nfthelper.validate(GOOD), closed=["coiold0000000a"])
    lines = script.splitlines()
    assert lines.index('delete element bridge coi open { "coiold0000000a" }') < \
        lines.index('add element bridge coi open { "coi0123456789ab" }') == len(lines) - 1


def test_remove_without_interfaces_is_the_plain_remove_script():
    assert nfthelper.script_for({"action": "remove", "container": "coi-a-1"}) == network.nft_remove_script("coi-a-1")
    assert "open" not in network.nft_remove_script("coi-a-1")


SPOOF_LISTING = {"nftables": [
    {"metainfo": {"json_schema_version": 1}},
    {"chain": {"family": "bridge", "table": "coi", "name": "coi-a-1.spoof", "hook": "prerouting"}},
    {"rule": {"family": "bridge", "table": "coi", "chain": "coi-a-1.spoof", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "coi0123456789ab"}},
        {"drop": None}]}},
    {"rule": {"family": "bridge", "table": "coi", "chain": "coi-a-1.spoof", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": 'bad" name'}}]}},
]}


def test_interfaces_and_gate_are_read_from_nft_json():
    assert network.interfaces_in_chain(SPOOF_LISTING) == ["coi0123456789ab"]
    assert network.interfaces_in_chain({}) == []
    assert not network.gate_in_ruleset(SPOOF_LISTING)
    assert network.gate_in_ruleset({"nftables": [{"chain": {"name": "gate", "hook": "prerouting"}}]})


class FakeNft:
    """Answers nft like a ruleset holding one container; records what is run."""

    def __init__(self, returncode=0, stderr=""):
        self.calls: list[tuple[list[str], str | None]] = []
        self.returncode, self.stderr = returncode, stderr

    def __call__(self, args, script):
        self.calls.append((args, script))
        if args[:2] == ["-j", "list"]:
            return subprocess.CompletedProcess(args, 0, json.dumps(SPOOF_LISTING), "")
        return subprocess.CompletedProcess(args, self.returncode, "", self.stderr)


def test_execute_reads_the_old_interface_and_feeds_the_script_on_stdin():
    nft = FakeNft()
    assert nfthelper.execute({"action": "remove", "container": "coi-a-1"}, run=nft) == ""
    (list_args, _), (args, script) = nft.calls
    assert list_args == ["-j", "list", "chain", "bridge", "coi", "coi-a-1.spoof"]
    assert args == ["-f", "-"] and script == network.nft_remove_script("coi-a-1", ["coi0123456789ab"])


def test_execute_list_reports_containers_and_gate():
    out = json.loads(nfthelper.execute({"action": "list"}, run=FakeNft()))
    assert out == {"containers": ["coi-a-1"], "gate": False}


def test_nft_errors_are_one_short_line():
    nft = FakeNft(1, "/dev/stdin:3:1-5: Error: Could not process rule: No such file\n" + "x" * 5000)
    with pytest.raises(nfthelper.HelperError) as err:
        nfthelper.execute({"action": "gate"}, run=nft)
    assert err.value.code == nfthelper.NFT_FAILED and "\n" not in err.value.message
    assert len(err.value.message) <= 240 and "Could not process rule" in err.value.message


@pytest.mark.parametrize("euid, args, stdin, code", [
    (1000, [], b'{"action": "list"}', nfthelper.NOT_ROOT),
    (0, ["-f", "/etc/shadow"], b"", nfthelper.REFUSED),
    (0, ["list", "ruleset"], b"", nfthelper.REFUSED),
    (0, [], b'{"action": "flush"}', nfthelper.REFUSED),
    (0, [], b'{"action": "gate"}', nfthelper.OK),
])
def test_main_exit_codes(monkeypatch, capsys, euid, args, stdin, code):
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setattr(nfthelper, "_run_nft", FakeNft())
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert nfthelper.main(args) == code
    err = capsys.readouterr().err
    assert (err == "") == (code == 0) and "shadow" not in err


def test_gate_argument_only_for_root_run_directly(monkeypatch):
    nft = FakeNft()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(nfthelper, "_run_nft", nft)
    monkeypatch.delenv("SUDO_UID", raising=False)
    assert nfthelper.main(["--gate"]) == nfthelper.OK and nft.calls[-1][1] == network.nft_gate_script()
    monkeypatch.setenv("SUDO_UID", "1000")
    assert nfthelper.main(["--gate"]) == nfthelper.REFUSED


@pytest.mark.parametrize("line, passed", [
    ("trace id 1a2b inet coi coi-a-1.deny packet: iif coibr0 ip saddr 10.195.0.2", True),
    ("trace id 1a2b bridge coi gate rule drop", True),
    ("trace id 1a2b inet filter input packet: iif eth0 ip saddr 192.0.2.1", False),
    ("trace id 1a2b inet coix x.deny packet", False),
])
def test_monitor_passes_only_coi_s_trace_lines(line, passed):
    assert bool(nfthelper._TRACE.match(line)) == passed


# ---- installation --------------------------------------------------------------------------

def test_launcher_is_isolated_python_importing_the_checked_package():
    text = host.launcher_text("/opt/coi/bin/python", "/opt/coi/lib/python3.11/site-packages")
    assert text.splitlines()[0] == "#!/opt/coi/bin/python -I"
    assert "sys.path.insert(0, '/opt/coi/lib/python3.11/site-packages')" in text
    assert "from coi.network.helper import main" in text  # host.py writes it
    for bad in ("python3", "/opt/my coi/python", "/x\n-c"):
        with pytest.raises(CoiError):
            host.launcher_text(bad, "/x")


def test_sudoers_rule_names_the_uid_and_allows_no_arguments():
    assert host.sudoers_rule(1234, "/usr/local/libexec/coi/coi-nft") == \
        '#1234 ALL=(root) NOPASSWD: /usr/local/libexec/coi/coi-nft ""\n'
    assert host.grant_path(1234) == Path("/etc/sudoers.d/coi-1234")
    assert "." not in host.grant_path(1234).name
    assert host.dropin_text("/usr/local/libexec/coi/coi-nft").endswith(
        "[Service]\nExecStartPre=/usr/local/libexec/coi/coi-nft --gate\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make root-owned files")
def test_untrusted_paths(tmp_path):
    os.chmod(tmp_path, 0o755)
    safe = tmp_path / "safe"
    safe.write_text("x")
    writable = tmp_path / "writable"
    writable.write_text("x")
    writable.chmod(0o666)
    owned = tmp_path / "owned"
    owned.write_text("x")
    os.chown(owned, 1000, 1000)
    assert host.untrusted_paths([safe]) == []
    assert host.untrusted_paths([writable]) == [f"{writable} is writable by group or others"]
    assert host.untrusted_paths([owned]) == [f"{owned} is owned by uid 1000, not root"]
    assert host.untrusted_paths([tmp_path / "gone"]) == [f"{tmp_path / 'gone'} is missing"]
    sub = tmp_path / "sub"
    sub.mkdir(mode=0o777)
    sub.chmod(0o777)
    (sub / "f").write_text("x")
    assert host.untrusted_paths([sub / "f"]) == [f"{sub} is writable by group or others"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make root-owned files")
def test_install_helper_refuses_a_user_writable_coi(tmp_path):
    os.chmod(tmp_path, 0o755)
    package = tmp_path / "site" / "coi"
    (package / "network").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "network" / "helper.py").write_text("")
    os.chown(package / "network" / "helper.py", 1000, 1000)
    with pytest.raises(CoiError) as err:
        host.install_helper(lambda step: None, path=tmp_path / "bin" / "coi-nft", interpreter="/usr/bin/python3",
                            package=package)
    assert "\n" not in err.value.message and "network/helper.py is owned by uid 1000" in err.value.message
    assert err.value.hint and not (tmp_path / "bin" / "coi-nft").exists()
    os.chown(package / "network" / "helper.py", 0, 0)
    steps = []
    path = host.install_helper(steps.append, path=tmp_path / "bin" / "coi-nft", interpreter="/usr/bin/python3",
                               package=package)
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755) and steps[-1].changed
    host.install_helper(steps.append, path=path, interpreter="/usr/bin/python3", package=package)
    assert not steps[-1].changed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make root-owned files")
def test_legacy_grants_are_replaced_by_the_helper_grant(tmp_path, monkeypatch):
    import pwd

    runs = []
    monkeypatch.setattr(privileges, "run", lambda argv, **kw: runs.append(argv) or subprocess.CompletedProcess(argv, 0))
    helper = tmp_path / "coi-nft"
    helper.write_text("#!/bin/false\n")
    (tmp_path / "coi-nft-root").write_text("root ALL=(root) NOPASSWD: /usr/sbin/nft\n")
    (tmp_path / "coi-nft-nobody-gone").write_text("nobody-gone ALL=(root) NOPASSWD: /usr/sbin/nft\n")
    (tmp_path / "coi-nft-custom").write_text("alice ALL=(root) NOPASSWD: /usr/sbin/nft list ruleset\n")
    steps = []
    host.remove_legacy_grants(steps.append, sudoers_dir=tmp_path, helper=helper)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coi-0", "coi-nft", "coi-nft-custom"]
    assert (tmp_path / "coi-0").read_text() == host.sudoers_rule(pwd.getpwnam("root").pw_uid, str(helper))
    assert runs == [["visudo", "-cf", str(tmp_path / ".coi-0.tmp")]]
    assert [s.changed for s in steps] == [False, True, True]  # custom left alone, two removed


def test_ensure_gate_loads_it_and_writes_the_systemd_drop_in(tmp_path, monkeypatch):
    calls = []

    def execute(request):
        calls.append(request["action"])
        return json.dumps({"containers": [], "gate": False}) if request["action"] == "list" else ""
    from coi.network import helper as nft_helper  # where coi.host.privileges looks it up

    monkeypatch.setattr(nft_helper, "execute", execute)
    monkeypatch.setattr(privileges, "run", lambda argv, **kw: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: None)
    dropin = tmp_path / "incus.service.d" / "coi-gate.conf"
    steps = []
    host.ensure_gate(steps.append, helper=Path("/h/coi-nft"), dropin=dropin, systemd=True)
    assert calls == ["list", "gate", ["systemctl", "daemon-reload"]]
    assert dropin.read_text() == host.dropin_text("/h/coi-nft") and all(s.changed for s in steps)
    calls.clear()
    host.ensure_gate(steps.append, helper=Path("/h/coi-nft"), dropin=tmp_path / "none", systemd=False)
    assert calls == ["list", "gate"] and not (tmp_path / "none").exists()
