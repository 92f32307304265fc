"""The proxy case's test host: a network namespace routed from the host, serving two
names on one address (bench/labserver.py: HTTP on 80, HTTPS on 443 with the lab's own
CA, DNS on 53 for those names), and what is left of it afterwards.

Adapted from the tests' ``NetLab.web`` and fake DNS server (tests/conftest.py); the
bench imports nothing from tests/. Everything is named ``coi-bench-*`` (the namespace)
or ``cbl*`` (the veth pair, which goes with the namespace), lives in a directory of
the bench's own, and ``close`` removes it, also after a failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from measure import BenchError

NETNS_PREFIX = "coi-bench-"
LINK_PREFIX = "cbl"
SERVER = Path(__file__).resolve().parent / "labserver.py"
# Private /30s, tried in order; the first that no route or address on the host overlaps
# is used (the tests' hosts use 192.168.250-252.0/30).
SUBNETS = ("192.168.254.0/30", "192.168.253.0/30", "10.254.253.0/30", "172.31.253.0/30")


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def subnet_in_use(subnet: str) -> bool:
    """Whether any route (any table) or address on the host overlaps ``subnet`` (read only)."""
    net = ipaddress.ip_network(subnet)
    routes = json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]")
    addresses = json.loads(_ip("-j", "-4", "addr", "show") or "[]")
    found = [r.get("dst", "") for r in routes]
    found += [f"{a['local']}/{a.get('prefixlen', 32)}" for link in addresses for a in link.get("addr_info", [])
              if a.get("local")]
    for dst in found:
        if dst in ("default", ""):
            continue
        try:
            if ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False).overlaps(net):
                return True
        except ValueError:
            continue
    return False


def free_subnet() -> str:
    for subnet in SUBNETS:
        if not subnet_in_use(subnet):
            return subnet
    raise BenchError(f"every subnet the bench's test host could use is in use on this host: {', '.join(SUBNETS)}")


def bench_namespaces() -> list[str]:
    """Network namespaces named like the bench's (a run's own, or an earlier run's leftover)."""
    proc = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return [ns["name"] for ns in json.loads(proc.stdout or "[]") if ns.get("name", "").startswith(NETNS_PREFIX)]


def delete_namespace(name: str) -> None:
    """The namespace, after every process in it (``ip netns pids``) is killed."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def wait_port(address: str, port: int, *, udp: bool = False, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if udp:  # an A query for "." : any answer will do
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(0.3)
                    sock.sendto(bytes(12) + b"\x00\x00\x01\x00\x01", (address, port))
                    if sock.recv(512):
                        return
            else:
                with socket.create_connection((address, port), timeout=0.5):
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise BenchError(f"the bench's test host did not answer on {address}:{port}{'/udp' if udp else ''} "
                             f"within {timeout:g} s")
        time.sleep(0.05)


class Lab:
    """One test host: ``start()``, then ``address``, ``resolver`` and ``ca_pem``; ``close()``."""

    def __init__(self, workdir: Path, names: list[str], *, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.names = list(names)
        self.python = python
        tag = uuid.uuid4().hex[:6]
        self.netns = f"{NETNS_PREFIX}web-{tag}"
        self.outer, self.inner = f"{LINK_PREFIX}{tag}h", f"{LINK_PREFIX}{tag}n"
        self.subnet = ""
        self.address = ""
        self.host_side = ""
        self.proc: subprocess.Popen | None = None
        self._made_ns = self._made_link = False

    @property
    def resolver(self) -> str:
        return f"{self.address}:53"

    @property
    def ca_pem(self) -> Path:
        return self.workdir / "certs" / "ca.pem"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs = self._certificates()
        self.subnet = free_subnet()
        net = ipaddress.ip_network(self.subnet)
        self.host_side, self.address = (str(a) for a in list(net.hosts())[:2])
        _ip("netns", "add", self.netns)
        self._made_ns = True
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        self._made_link = True
        _ip("link", "set", self.inner, "netns", self.netns)
        _ip("addr", "add", f"{self.host_side}/{net.prefixlen}", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        for args in (["addr", "add", f"{self.address}/{net.prefixlen}", "dev", self.inner],
                     ["link", "set", self.inner, "up"], ["link", "set", "lo", "up"],
                     ["route", "add", "default", "via", self.host_side]):
            _ip("netns", "exec", self.netns, "ip", *args)
        answers = self.workdir / "dns-answers.json"
        answers.write_text(json.dumps({name: [self.address] for name in self.names}))
        log = open(self.workdir / "labserver.log", "wb")
        with log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, self.python, str(SERVER),
                                          self.address, str(certs), str(answers)],
                                         cwd=str(self.workdir), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            for port, udp in ((80, False), (443, False), (53, True)):
                wait_port(self.address, port, udp=udp)
        except BenchError as exc:
            raise BenchError(f"{exc}; its log: {self.log_tail()}") from None

    def log_tail(self) -> str:
        try:
            return " / ".join((self.workdir / "labserver.log").read_text().strip().splitlines()[-3:]) or "(empty)"
        except OSError:
            return "(none)"

    def _certificates(self) -> Path:
        """The lab CA and one certificate per name (openssl, P-256 keys), in ``<workdir>/certs``,
        with the extensions a strict verifier wants (Python 3.13's default context checks
        key identifiers and CA constraints)."""
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        config = certs / "ca.cnf"
        config.write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = coi bench lab CA\n"
                          "[v3_ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
                          "subjectKeyIdentifier = hash\n")
        ca_key = certs / "ca.key"
        self._openssl("req", "-x509", "-new", *ec, "-config", str(config), "-extensions", "v3_ca", "-days", "2",
                      "-keyout", str(ca_key), "-out", str(self.ca_pem))
        for name in self.names:
            key, csr, pem, ext = (certs / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
            ext.write_text(f"basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\n"
                           f"extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\n"
                           f"authorityKeyIdentifier = keyid, issuer\nsubjectAltName = DNS:{name}\n")
            self._openssl("req", "-new", *ec, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
            self._openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca_pem), "-CAkey", str(ca_key),
                          "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(pem))
        return certs

    @staticmethod
    def _openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"openssl {args[0]}: {proc.stderr.strip()[-300:]}")

    def close(self) -> list[str]:
        """Everything removed; returns what is still there (nothing, normally)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # ip netns exec execs the server: this is the server itself
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._made_ns:
            delete_namespace(self.netns)
        if self._made_link:  # gone with the namespace's peer; this is only a safety net
            subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        left = []
        if self.proc is not None and self.proc.poll() is None:
            left.append(f"test host server (pid {self.proc.pid})")
        if self.netns in bench_namespaces():
            left.append(f"network namespace {self.netns}")
        if subprocess.run(["ip", "link", "show", self.outer], capture_output=True).returncode == 0:
            left.append(f"link {self.outer}")
        return left
