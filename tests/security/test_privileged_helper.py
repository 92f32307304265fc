"""The privileged nft helper, played against: a coi user (or whatever talks one into
running coi) tries to get more out of the sudoers grant than coi's own tables, and an
unopened or spoofing container tries to get past the bridge gate.

Real host state touched: throw-away users and their files in /etc/sudoers.d (all
removed again), read-only listings of the host's nft ruleset. Commands that would
change the host's rules if sudo allowed them are only asked about (``sudo -l``),
never run. The gate and container rules are loaded only inside network namespaces
made here (each has its own ruleset), and traffic stays inside them.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import coi
from coi import host, network

# As root (scripts/test.sh), sudo, nft and the rest are installed by the project's own set-up:
# a missing one fails these tests rather than skipping them.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (scripts/test.sh runs as root)")

SUDOERS = Path("/etc/sudoers.d")


def ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def helper():
    """The launcher, installed from the checkout's code into a root-owned temp dir."""
    workdir = Path(tempfile.mkdtemp(prefix="coi-helper-", dir="/tmp"))
    try:
        os.chmod(workdir, 0o755)
        path = host.install_helper(lambda step: None, path=workdir / "libexec" / "coi-nft",
                                   interpreter=sys.executable, package=Path(coi.__file__).resolve().parent)
        yield path
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def users(helper, tmp_path_factory):
    """Two throw-away users (one with a dot in its name), granted by the real setup step."""
    tag = uuid.uuid4().hex[:6]
    names = [f"coi-sec-{tag}", f"coi.sec{tag}"]
    before = set(os.listdir(SUDOERS))
    made: list[str] = []
    config = tmp_path_factory.mktemp("etc-coi") / "config.toml"
    try:
        for name in names:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True,
                           capture_output=True)
            made.append(name)
        # the first one has the unlimited grant an earlier coi setup wrote
        legacy = SUDOERS / f"coi-nft-{names[0]}"
        legacy.write_text(f"{names[0]} ALL=(root) NOPASSWD: /usr/sbin/nft\n")
        legacy.chmod(0o440)
        assert as_user(names[0], ["sudo", "-n", "-l", "/usr/sbin/nft", "flush", "ruleset"]).returncode == 0
        for name in names:
            host.ensure_network_privileges(name, lambda step: None, helper=helper, system_config=config)
        yield names
    finally:
        for entry in set(os.listdir(SUDOERS)) - before:
            (SUDOERS / entry).unlink(missing_ok=True)
        for name in made:
            (SUDOERS / f"coi-nft-{name}").unlink(missing_ok=True)
            subprocess.run(["userdel", name], capture_output=True)


def as_user(name: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", name, "--", *argv], capture_output=True, cwd="/", **kw)


def allowed(name: str, argv: list[str]) -> bool:
    """Whether sudo would run ``argv`` for ``name`` (asked, not run)."""
    return as_user(name, ["sudo", "-n", "-l", *argv]).returncode == 0


def test_setup_writes_a_dotless_uid_grant_and_removes_the_unlimited_one(users, helper):
    for name in users:
        uid = pwd.getpwnam(name).pw_uid
        grant = SUDOERS / f"coi-{uid}"
        st = grant.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o440)
        assert grant.read_text() == f'#{uid} ALL=(root) NOPASSWD: {helper} ""\n'
        assert not (SUDOERS / f"coi-nft-{name}").exists()
        assert not any(e.startswith(f".coi-{uid}") for e in os.listdir(SUDOERS))  # no temp file left


@pytest.mark.parametrize("argv", [
    ["/usr/sbin/nft", "list", "ruleset"],
    ["/usr/sbin/nft", "flush", "ruleset"],
    ["/usr/sbin/nft", "-f", "/etc/shadow"],
    ["nft", "list", "ruleset"],
    ["HELPER", "--gate"],
    ["HELPER", "-f", "/etc/shadow"],
    ["/bin/sh"],
])
def test_sudo_allows_nothing_but_the_helper_without_arguments(users, helper, argv):
    argv = [str(helper) if a == "HELPER" else a for a in argv]
    for name in users:
        assert not allowed(name, argv), (name, argv)
    assert all(allowed(name, [str(helper)]) for name in users)


def test_the_real_nft_is_refused_through_sudo(users):
    for name in users:
        proc = as_user(name, ["sudo", "-n", "/usr/sbin/nft", "list", "ruleset"])
        assert proc.returncode != 0 and b"table" not in proc.stdout


def test_a_good_request_works_for_both_users(users, helper):
    for name in users:
        proc = as_user(name, ["sudo", "-n", str(helper)], input=b'{"action": "list"}')
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        assert set(answer) == {"containers", "gate"} and isinstance(answer["containers"], list)


HOSTILE = [
    b'{"action": "apply", "container": "coi-x\\"; flush ruleset; \\"", "ipv4": "10.195.0.9", "veth": "coi1",'
    b' "gateway": "10.195.0.1", "subnet": "10.195.0.0/24", "mode": "restricted"}',
    b'{"action": "apply", "container": "coi-x\\nflush ruleset", "ipv4": "10.195.0.9", "veth": "coi1",'
    b' "gateway": "10.195.0.1", "subnet": "10.195.0.0/24", "mode": "restricted"}',
    b'{"action": "apply", "container": "coi-x-1", "ipv4": "10.195.0.9", "veth": "coi1 } accept; {",'
    b' "gateway": "10.195.0.1", "subnet": "10.195.0.0/24", "mode": "restricted"}',
    b'{"action": "apply", "container": "coi-x-1", "ipv4": "10.195.0.9", "veth": "coi1",'
    b' "gateway": "10.195.0.1", "subnet": "10.195.0.0/24", "mode": "restricted", "file": "/etc/shadow"}',
    b'{"action": "apply", "container": "coi-x-1", "ipv4": "10.195.0.9", "veth": "coi1",'
    b' "gateway": "10.195.0.1", "subnet": "10.195.0.0/24", "mode": "restricted", "blocked": ["/etc/shadow"]}',
    b'{"action": "open", "veth": "-f"}',
    b'{"action": "open", "veth": "/etc/shadow"}',
    b'{"action": "allow", "container": "coi-x-1", "addresses": ["0.0.0.0/0; flush ruleset"]}',
    b'{"action": "remove", "container": "coi-x-1", "extra": true}',
    b'{"action": "flush ruleset"}',
    b'{"action": "list"} {"action": "gate"}',
    b"flush ruleset\n",
    b"include \"/etc/shadow\"\n",
    b'{"action": "gate", "action": "list"}',
    b"[" * 50000,
    b" " * (2 * 1024 * 1024),
]


@pytest.mark.parametrize("raw", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_requests_are_refused_with_no_change(users, helper, raw):
    before = ruleset()
    proc = as_user(users[1], ["sudo", "-n", str(helper)], input=raw)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.decode()
    assert err.startswith("coi-nft: ") and err.count("\n") == 1 and len(err) < 300
    assert "root:" not in err  # nothing of /etc/shadow
    assert ruleset() == before


def test_arguments_are_refused_even_for_root_through_sudo(helper):
    before = ruleset()
    for argv in (["-f", "/etc/shadow"], ["list", "ruleset"], ["--gate", "x"]):
        proc = subprocess.run([str(helper), *argv], capture_output=True, input=b"", text=False)
        assert proc.returncode == 2 and b"shadow" not in proc.stderr
    proc = subprocess.run(["sudo", "-n", str(helper), "--gate"], capture_output=True,
                          env={**os.environ, "SUDO_UID": "1000"})
    assert proc.returncode != 0
    assert ruleset() == before


def test_not_root_is_refused(users, helper):
    proc = as_user(users[0], [str(helper)], input=b'{"action": "list"}')
    assert proc.returncode == 3 and b"root" in proc.stderr


# ---- the gate, in network namespaces ---------------------------------------------------------

UDP_ECHO = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    data, peer = s.recvfrom(512)
    s.sendto(data, peer)
'''

PROBE = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.5)
if len(sys.argv) > 2:
    s.bind((sys.argv[2], 0))
s.sendto(b"ping", (sys.argv[1], 53))
try:
    print("answer" if s.recv(64) == b"ping" else "other")
except OSError:
    print("nothing")
'''


class Lab:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, label: str) -> str:
        name = f"coi-sec-{label}-{self.tag}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        return name

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def test_the_gate_lets_only_opened_containers_through(lab, helper):
    hostns = lab.ns("host")
    ip(hostns, "link", "add", "coibr0", "type", "bridge")
    ip(hostns, "addr", "add", "10.77.0.1/24", "dev", "coibr0")
    ip(hostns, "link", "set", "coibr0", "up")
    boxes = {}
    for label, address in (("a", "10.77.0.10"), ("b", "10.77.0.11"), ("c", "10.77.0.10")):
        ns, veth = lab.ns(label), f"coi{label * 12}"
        ip(hostns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip(hostns, "link", "set", veth, "master", "coibr0", "up")
        ip(ns, "link", "set", "eth0", "up")
        ip(ns, "addr", "add", f"{address}/24", "dev", "eth0")
        boxes[label] = (ns, veth, address)
    ip(boxes["c"][0], "link", "set", "eth0", "down")  # c claims a's address: only up when it probes
    echo = subprocess.Popen(["ip", "netns", "exec", hostns, sys.executable, "-c", UDP_ECHO, "10.77.0.1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(echo)

    def probe(label: str, source: str | None = None) -> str:
        ns = boxes[label][0]
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, "10.77.0.1", *([source] if source else [])]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()

    def nft_in_host_ns(request: dict) -> subprocess.CompletedProcess:
        """The real helper, as root, inside the lab's host namespace (its own ruleset)."""
        return subprocess.run(["ip", "netns", "exec", hostns, str(helper)], input=json.dumps(request),
                              capture_output=True, text=True)

    from coi.wait import wait_for

    wait_for(lambda: probe("a") == "answer", timeout=10, what="the lab's echo server")
    assert probe("b") == "answer"  # no gate yet: everyone reaches the host

    ns_a, veth_a, address_a = boxes["a"]
    apply = {"action": "apply", "container": "coi-sec-a-1", "ipv4": address_a, "veth": veth_a,
             "gateway": "10.77.0.1", "subnet": "10.77.0.0/24", "mode": "restricted",
             "blocked": list(network.PRIVATE_RANGES)}
    proc = nft_in_host_ns(apply)
    assert proc.returncode == 0, proc.stderr
    for ns in lab.namespaces:
        subprocess.run(["ip", "-n", ns, "neigh", "flush", "all"], capture_output=True)

    assert probe("a") == "answer"  # opened, and its own rules allow DNS to the gateway
    assert probe("b") == "nothing"  # never opened: no network at all
    ip(ns_a, "addr", "add", "10.77.0.50/24", "dev", "eth0")
    assert probe("a", "10.77.0.50") == "nothing"  # opened, but spoofing another address
    ip(ns_a, "link", "set", "eth0", "down")
    ip(boxes["c"][0], "link", "set", "eth0", "up")
    assert probe("c") == "nothing"  # not opened, with the opened one's address
    ip(boxes["c"][0], "link", "set", "eth0", "down")
    ip(ns_a, "link", "set", "eth0", "up")
    ip(ns_a, "addr", "del", "10.77.0.50/24", "dev", "eth0")

    listing = json.loads(nft_in_host_ns({"action": "list"}).stdout)
    assert listing == {"containers": ["coi-sec-a-1"], "gate": True}
    assert nft_in_host_ns({"action": "remove", "container": "coi-sec-a-1"}).returncode == 0
    assert probe("a") == "nothing"  # removal shut the gate for it again
    assert nft_in_host_ns({"action": "open", "veth": boxes["b"][1]}).returncode == 0
    assert probe("b") == "answer"  # the pair for the Incus ACL backend
    assert nft_in_host_ns({"action": "close", "veth": boxes["b"][1]}).returncode == 0
    assert probe("b") == "nothing"
