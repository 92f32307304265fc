"""Shared fixtures: the real Incus daemon, a normal test user in the Incus
admin group, the test image, and clean-up of everything tests create.

Every container a test makes is named with the ``coi-test-`` prefix, so a
user's own sessions are never touched; a session-wide finaliser removes any
``coi-test-`` container and test image left behind, even after failures.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_PREFIX = "coi-test-"
TEST_USER = "coi-tester"
OUTSIDER = "coi-outsider"  # a user *not* in the Incus admin group
ADMIN_GROUP = "incus-admin"


TIERS = ("unit", "integration", "e2e", "security", "acceptance")


def pytest_collection_modifyitems(items):
    """Tests carry their tier as a marker; the folder decides when they do not."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in TIERS):
            tier = Path(str(item.fspath)).parent.name
            if tier in TIERS:
                item.add_marker(getattr(pytest.mark, tier))


# ---- fakes of Incus (tests/fake_incus.py) ------------------------------------------


@pytest.fixture
def daemon(tmp_path):
    """The fake daemon (``FakeDaemon``), serving on a socket of the test's own."""
    from fake_incus import FakeDaemon, socket_in

    with FakeDaemon(socket_in(tmp_path)) as fake:
        yield fake


@pytest.fixture
def client(daemon):
    """coi's real Incus client, talking to the fake daemon."""
    from coi.incus import Incus

    real = Incus(daemon.path)
    yield real
    real.close()


# ---- the real daemon ---------------------------------------------------------------


@pytest.fixture(scope="session")
def incus():
    """The real daemon (coi setup must have run: scripts/test.sh does it)."""
    from coi.incus import Incus

    client = Incus.from_environment()
    client.server()  # fails loudly when the daemon is not there
    yield client
    _remove_test_leftovers(client)
    client.close()


def _remove_test_leftovers(client) -> None:
    for inst in client.instances(recursion=1):
        if inst["name"].startswith(TEST_PREFIX):
            subprocess.run(["incus", "delete", "--force", inst["name"]], capture_output=True)
    from coi.errors import NotFoundError

    for img in client.images():
        if any(a["name"].startswith(TEST_PREFIX) for a in img.get("aliases") or []):
            try:
                client.delete_image(img["fingerprint"])
            except NotFoundError:
                pass  # removed meanwhile


@pytest.fixture
def container_name(incus):
    """A fresh test container name; the container is deleted after the test."""
    name = f"{TEST_PREFIX}{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["incus", "delete", "--force", name], capture_output=True)


@pytest.fixture(scope="session")
def base_image(incus):
    """The local Debian base image, built by coi's own code (cached across runs)."""
    from coi.images import ensure_base

    return ensure_base(incus, "bookworm", log=print)


def _ensure_user(name: str, groups: list[str]) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        pw = pwd.getpwnam(name)
    for group in groups:
        if name not in grp.getgrnam(group).gr_mem:
            subprocess.run(["usermod", "-aG", group, name], check=True)
    return pw


@dataclass
class User:
    """A normal host user that runs ``coi`` the way people do."""

    name: str
    uid: int
    gid: int
    home: Path

    def run(self, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``coi ARGS`` as this user with a clean login-like environment.

        When Incus lost track of a command coi ran (an Incus 6.0.4 fault: the
        command ran once, its output or exit status is gone, and coi says so)
        the test cannot check what it wanted to: it is skipped, with the reason.
        """
        proc = subprocess.run(self.argv(["coi", *args], env=env), cwd=cwd or self.home, input=input,
                              capture_output=True, text=True, timeout=timeout)
        if "Incus lost track of the command" in proc.stderr:
            pytest.skip(f"Incus lost track of a command of 'coi {' '.join(args)}': {proc.stderr.strip()}")
        return proc

    def background(self, workspace: Path, *args: str, env: dict[str, str] | None = None) -> dict:
        """``coi shell --background --format json ARGS`` in ``workspace``: what it printed
        ({"container", "session_id", "slot", "workspace", "network", "branch", "ports", "ssh_agent"})."""
        proc = self.run(["shell", "--background", "--format", "json", *args], cwd=workspace, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def argv(self, command: list[str], *, env: dict[str, str] | None = None) -> list[str]:
        base = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                "COI_CONTAINER_PREFIX": TEST_PREFIX}
        base.update(env or {})
        prefix = [] if os.geteuid() == pwd.getpwnam(self.name).pw_uid else ["runuser", "-u", self.name, "--"]
        return [*prefix, "env", "-i", *(f"{k}={v}" for k, v in base.items()), *command]

    def workspace(self, name: str | None = None) -> Path:
        """A fresh directory owned by this user, removed by the caller's tmp clean-up."""
        path = self.home / "workspaces" / (name or uuid.uuid4().hex[:8])
        path.mkdir(parents=True, exist_ok=True)
        for p in (path, path.parent):
            os.chown(p, self.uid, self.gid)
        return path


def _user(name: str, groups: list[str]) -> User:
    if os.geteuid() != 0:
        pytest.skip("creating test users needs root (scripts/test.sh runs as root)")
    pw = _ensure_user(name, groups)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


@pytest.fixture(scope="session")
def coi_user():
    """A normal user set up the way people are: 'sudo coi setup' run on their behalf."""
    user = _user(TEST_USER, [])
    system_config = Path("/etc/coi/config.toml")
    had_system_config = system_config.exists()
    proc = subprocess.run(["coi", "setup", "--user", TEST_USER], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    yield user
    # What coi setup granted for the test user, and every workspace the tests made.
    Path(f"/etc/sudoers.d/coi-{user.uid}").unlink(missing_ok=True)  # the helper grant
    Path(f"/etc/sudoers.d/coi-nft-{TEST_USER}").unlink(missing_ok=True)  # what older versions wrote
    if not had_system_config:
        system_config.unlink(missing_ok=True)
        if system_config.parent.is_dir() and not any(system_config.parent.iterdir()):
            system_config.parent.rmdir()
    shutil.rmtree(user.home / "workspaces", ignore_errors=True)


@pytest.fixture(scope="session")
def outsider() -> User:
    """A normal user outside the Incus admin group."""
    return _user(OUTSIDER, [])


@pytest.fixture
def workspace(coi_user):
    path = coi_user.workspace()
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- sessions: the test image with the stand-in agent -----------------------------

SANDBOX_IMAGE = "coi-sandbox-test"  # cached across runs like the base image; rebuilt when its inputs change
IMAGES_DIR = Path(__file__).parent / "images"


def sandbox_script() -> str:
    """The build script: the image set-up plus the stand-in agent installed as fake-claude."""
    agent = (IMAGES_DIR / "fake-claude").read_text()
    return ((IMAGES_DIR / "sandbox.sh").read_text()
            + "\ncat > /usr/local/bin/fake-claude <<'COI_AGENT'\n" + agent + "COI_AGENT\n"
            + "chmod 0755 /usr/local/bin/fake-claude\n")


@pytest.fixture(scope="session")
def sandbox_image(incus, base_image, tmp_path_factory):
    """An image for session tests, built with coi's own 'build custom' code."""
    import hashlib

    script = sandbox_script()
    base_fingerprint = incus.image_by_alias(base_image)["fingerprint"]  # a new base: a new sandbox
    digest = hashlib.sha256((base_fingerprint + script).encode()).hexdigest()[:16]
    if incus.image_exists(SANDBOX_IMAGE):
        if incus.image_by_alias(SANDBOX_IMAGE).get("properties", {}).get("coi.test_inputs") == digest:
            return SANDBOX_IMAGE
    from coi.config import default_config
    from coi.images import build_custom

    path = tmp_path_factory.mktemp("sandbox") / "sandbox.sh"
    path.write_text(script)
    info = build_custom(incus, name=SANDBOX_IMAGE, script=path, base=base_image, force=True,
                        config=default_config(env=os.environ), log=print)
    incus.update_image_properties(info["fingerprint"], {"coi.test_inputs": digest})
    return SANDBOX_IMAGE


def wait_for_spares(state_dir: Path) -> None:
    """Until no background process is making a spare branch copy there (each holds its lock)."""
    import fcntl

    for lock in state_dir.glob("branches/*/.spare.lock"):
        with open(lock) as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)


def configured(user: User, config: str):
    """``user`` with ``config`` as their own coi config for one test; afterwards their
    sessions, saved state and config are removed."""
    cfg = user.home / ".config" / "coi"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_text(config)
    for p in (user.home / ".config", cfg, cfg / "config.toml"):
        os.chown(p, user.uid, user.gid)
    yield user
    # Remove every coi-test- container the test left (sessions of this user).
    subprocess.run(user.argv(["coi", "kill", "--all", "--force"]), capture_output=True)
    wait_for_spares(user.home / ".coi")
    shutil.rmtree(user.home / ".coi", ignore_errors=True)
    shutil.rmtree(cfg, ignore_errors=True)


@pytest.fixture
def session_user(coi_user, sandbox_image, nft_sudo):
    """The test user, configured to use the test image and the stand-in agent; sessions
    run in the default network mode (restricted), enforced with nft through 'sudo -n'."""
    yield from configured(coi_user, f'[defaults]\nimage = "{sandbox_image}"\n\n[tool]\nbinary = "fake-claude"\n\n'
                                    f'[network]\nprivileged_command = {json.dumps(nft_sudo)}\n')


# ---- images: the full coi image -----------------------------------------------------


AGENTS_IMAGE = "coi-agents-test"  # the coi image with --tools all; cached like the others


@pytest.fixture(scope="session")
def agents_image(incus, base_image):
    """The coi image with every agent tool (``coi build --tools all``), built once by coi's own
    code and reused while its inputs are unchanged."""
    from coi.config import default_config
    from coi.errors import NotFoundError
    from coi.images import build_coi, coi_inputs_hash

    config = default_config(env=os.environ)
    wanted = coi_inputs_hash(tools=["all"], config=config)
    try:
        have = (incus.image_by_alias(AGENTS_IMAGE).get("properties") or {}).get("coi.inputs")
    except NotFoundError:
        have = None
    if have != wanted:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("COI_CONTAINER_PREFIX", TEST_PREFIX)
            build_coi(incus, force=True, tools=["all"], config=config, log=print, alias=AGENTS_IMAGE)
    return AGENTS_IMAGE


@pytest.fixture
def real_user(coi_user, coi_image, nft_sudo):
    """The test user as a new user is: the real coi image and the real agent (Claude Code),
    the default restricted network."""
    yield from configured(coi_user, f'[defaults]\nimage = "{coi_image}"\n\n'
                                    f'[network]\nprivileged_command = {json.dumps(nft_sudo)}\n')


@pytest.fixture(scope="session")
def coi_image(incus, base_image):
    """The real ``coi`` image, built by coi's own code once and reused while its inputs
    (build script, tools, code uid, base, host CA certificates) are unchanged."""
    from coi.config import default_config
    from coi.errors import NotFoundError
    from coi.images import COI_ALIAS, build_coi, coi_inputs_hash

    config = default_config(env=os.environ)
    tools = list(config.build.tools)
    wanted = coi_inputs_hash(tools=tools, config=config)
    try:
        have = (incus.image_by_alias(COI_ALIAS).get("properties") or {}).get("coi.inputs")
    except NotFoundError:
        have = None
    if have != wanted:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("COI_CONTAINER_PREFIX", TEST_PREFIX)  # the builder is a coi-test- container
            build_coi(incus, force=True, tools=tools, config=config, log=print)
    return COI_ALIAS


# ---- network isolation: test hosts in network namespaces, sudo for nft --------------
#
# Tests send traffic only to loopback, to their own containers and to hosts in
# network namespaces they create here (a veth pair routed from the host), plus
# the package registries by name. Every namespace, link, process, nft chain and
# sudoers file made here is removed again, also after failures.

import sys  # noqa: E402 - this block is appended to the fixtures above

SUDOERS_FILE = Path("/etc/sudoers.d/coi-tester-nft")

# A tiny DNS server for the tests: answers A queries from a JSON file
# {"name": "1.2.3.4"} read on every query, NXDOMAIN for anything else.
_FAKE_DNS = r'''
import json, socket, struct, sys
addr, port, answers = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((addr, port))
while True:
    data, peer = sock.recvfrom(512)
    qid, flags, qd = struct.unpack("!HHH", data[:6])
    pos, labels = 12, []
    while data[pos]:
        labels.append(data[pos + 1:pos + 1 + data[pos]].decode()); pos += 1 + data[pos]
    question = data[12:pos + 5]
    name = ".".join(labels).lower()
    try:
        table = json.load(open(answers))
    except (OSError, ValueError):
        table = {}
    ips = table.get(name) or []
    ips = [ips] if isinstance(ips, str) else ips
    head = struct.pack("!HHHHHH", qid, 0x8180 if ips else 0x8183, 1, len(ips), 0, 0)
    body = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 1, 4) + socket.inet_aton(ip) for ip in ips)
    sock.sendto(head + question + body, peer)
'''


# Network probes, run inside a container: every probe in parallel, 3 s timeouts, one JSON line out.
NET_PROBE = r'''
import concurrent.futures, json, socket, sys, time, urllib.request
def run(item):
    label, kind, target = item
    started = time.monotonic()
    try:
        if kind == "http":
            with urllib.request.urlopen(target, timeout=3) as reply:
                detail = reply.status
        elif kind == "resolve":
            detail = sorted({a[4][0] for a in socket.getaddrinfo(target, 80, socket.AF_INET)})
        else:  # "dns": one UDP query straight to HOST:PORT
            host, port = target.rsplit(":", 1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(3)
                sock.connect((host, int(port)))
                sock.send(bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01")
                detail = len(sock.recv(512))
        ok = True
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return label, {"ok": ok, "detail": detail, "seconds": round(time.monotonic() - started, 2)}
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    print(json.dumps(dict(pool.map(run, json.loads(sys.argv[1])))))
'''


@dataclass
class NetHost:
    """A test host in its own network namespace, routed from the host."""

    netns: str
    address: str  # inside the namespace
    host_side: str  # the host's end of the veth pair
    port: int  # its HTTP (or DNS) port

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _subnet_in_use(subnet: str) -> bool:
    """Whether any route or address on the host overlaps ``subnet`` (read only)."""
    import ipaddress
    import json as _json

    net = ipaddress.ip_network(subnet)
    routes = _json.loads(subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"],
                                        capture_output=True, text=True).stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("default", ""):
            continue
        try:
            if ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False).overlaps(net):
                return True
        except ValueError:
            continue
    return False


def wait_port(address: str, port: int, *, udp_probe: bytes | None = None, timeout: float = 15) -> None:
    import socket

    from coi.wait import wait_for

    def ready() -> bool:
        try:
            if udp_probe is None:
                with socket.create_connection((address, port), timeout=0.5):
                    return True
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0.3)
                sock.sendto(udp_probe, (address, port))
                return bool(sock.recv(512))
        except OSError:
            return False
    wait_for(ready, timeout=timeout, what=f"a test server on {address}:{port}")


# The lab's web server: HTTP on 80 and HTTPS on 443 (the certificate by SNI) on one address.
_WEB_SERVER = r'''
import http.server, socketserver, ssl, sys, threading
from pathlib import Path
address, certs = sys.argv[1], Path(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/big" or self.path.startswith("/zeros/"):
            size = 200 * 1024 * 1024 if self.path == "/big" else int(self.path[len("/zeros/"):])
            self.send_response(200); self.send_header("Content-Length", str(size)); self.end_headers()
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                self.wfile.write(chunk)
            self.wfile.write(chunk[:size % len(chunk)])
            return
        body = ("hello " + (self.headers.get("Host") or "").split(":")[0] + "\n").encode()
        if self.path == "/auth":
            body = ("auth " + (self.headers.get("Authorization") or "(none)") + "\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
contexts = {}
for pem in certs.glob("*.pem"):
    if pem.name != "ca.pem":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pem, certs / (pem.stem + ".key"))
        contexts[pem.stem] = ctx
default = next(iter(contexts.values()))
def pick(sock, name, _ctx):
    if name in contexts:
        sock.context = contexts[name]
default.sni_callback = pick
plain, tls = Server((address, 80), Handler), Server((address, 443), Handler)
tls.socket = default.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=plain.serve_forever, daemon=True).start()
tls.serve_forever()
'''


class NetLab:
    """Creates network-namespace test hosts and host-side servers; ``close`` removes them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def host(self, label: str, subnet: str, *, dns_answers: Path | None = None, serve: bool = True) -> NetHost:
        """A namespace on ``subnet`` (a /30: host end first, test host second) running an
        HTTP server, or the fake DNS server on port 53 when ``dns_answers`` is given."""
        import ipaddress

        if _subnet_in_use(subnet):
            pytest.skip(f"{subnet} is in use on this host; the test host cannot be routed safely")
        net = ipaddress.ip_network(subnet)
        host_side, inside = (str(a) for a in list(net.hosts())[:2])
        tag = uuid.uuid4().hex[:6]
        ns, outer, inner = f"{TEST_PREFIX}{label}-{tag}", f"ctn{tag}h", f"ctn{tag}n"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{host_side}/{net.prefixlen}", "dev", outer)
        _ip("link", "set", outer, "up")
        for args in (["addr", "add", f"{inside}/{net.prefixlen}", "dev", inner], ["link", "set", inner, "up"],
                     ["link", "set", "lo", "up"], ["route", "add", "default", "via", host_side]):
            _ip("netns", "exec", ns, "ip", *args)
        if dns_answers is not None:
            script = self.workdir / "fake_dns.py"
            script.write_text(_FAKE_DNS)
            self._spawn(["ip", "netns", "exec", ns, sys.executable, str(script), inside, "53", str(dns_answers)])
            wait_port(inside, 53, udp_probe=bytes(12) + b"\x00\x00\x01\x00\x01")
            return NetHost(ns, inside, host_side, 53)
        port = 8000
        if not serve:
            return NetHost(ns, inside, host_side, 0)
        self._spawn(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", str(port), "--bind", inside])
        wait_port(inside, port)
        return NetHost(ns, inside, host_side, port)

    def web(self, label: str, subnet: str, names: list[str]) -> NetHost:
        """A namespace serving HTTP on 80 and HTTPS on 443 for ``names`` (one address, the
        certificate chosen by SNI, signed by the lab's own CA: ``ca_pem``). Each answers
        ``hello <name>``; ``/big`` is 200 MB of zeros for throughput."""
        if _subnet_in_use(subnet):
            pytest.skip(f"{subnet} is in use on this host; the test host cannot be routed safely")
        certs = self._certificates(names)
        host = self.host(label, subnet, serve=False)
        script = self.workdir / "web.py"
        script.write_text(_WEB_SERVER)
        self._spawn(["ip", "netns", "exec", host.netns, sys.executable, str(script), host.address, str(certs)])
        wait_port(host.address, 80)
        wait_port(host.address, 443)
        return NetHost(host.netns, host.address, host.host_side, 80)

    @property
    def ca_pem(self) -> Path:
        return self.workdir / "certs" / "ca.pem"

    def _certificates(self, names: list[str]) -> Path:
        """The lab CA and one certificate per name (openssl), in ``<workdir>/certs``."""
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        ca_key, ca = certs / "ca.key", certs / "ca.pem"
        if not ca.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=coi test lab CA", "-keyout", str(ca_key), "-out", str(ca)],
                           check=True, capture_output=True)
        for name in names:
            key, csr, pem = certs / f"{name}.key", certs / f"{name}.csr", certs / f"{name}.pem"
            ext = certs / f"{name}.ext"
            ext.write_text(f"subjectAltName=DNS:{name}\n")
            subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                            "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
            subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(pem)],
                           check=True, capture_output=True)
        return certs

    def http_on_host(self, address: str) -> int:
        """An HTTP server in the host's own namespace, bound to ``address``; returns its port."""
        import socket

        with socket.socket() as sock:
            sock.bind((address, 0))
            port = sock.getsockname()[1]
        self._spawn([sys.executable, "-m", "http.server", str(port), "--bind", address])
        wait_port(address, port)
        return port

    def _spawn(self, argv: list[str]) -> None:
        serve = self.workdir / "www"
        serve.mkdir(exist_ok=True)
        self.procs.append(subprocess.Popen(argv, cwd=serve, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:  # gone with the namespace's peer; this is only a safety net
            subprocess.run(["ip", "link", "del", link], capture_output=True)


def remove_test_network_rules() -> None:
    """Remove coi-test- containers' chains from coi's nft tables and stop their watchers and
    the egress proxies the tests started."""
    import json as _json

    from coi import network

    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            test_proxy = b"coi.network.proxy" in argv and any(
                a.startswith((b"/tmp/pytest-of-", str(Path.home() / ".coi").encode(), f"/home/{TEST_USER}/".encode()))
                for a in argv)
            if test_proxy or (b"coi.network.watcher" in argv and any(a.startswith(TEST_PREFIX.encode())
                                                                       for a in argv)):
                try:
                    os.kill(int(pid), 9)
                except OSError:
                    pass
    proc = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True)
    if proc.returncode != 0:
        return
    for name in network.containers_in_ruleset(_json.loads(proc.stdout or "{}")):
        if name.startswith(TEST_PREFIX):
            from coi.network import helper  # as root, in-process: also shuts the gate for its interface

            try:
                helper.execute({"action": "remove", "container": name})
            except helper.HelperError:
                pass
    for acl in subprocess.run(["incus", "network", "acl", "list", "-f", "csv"], capture_output=True,
                              text=True).stdout.splitlines():
        name = acl.split(",", 1)[0]
        if name.startswith(TEST_PREFIX):
            subprocess.run(["incus", "network", "acl", "delete", name], capture_output=True)


@pytest.fixture(scope="session")
def nft_sudo(coi_user):
    """sudo for the test user, limited to coi's nft helper: what 'coi setup --user' granted
    (the coi_user fixture ran it). No test grants nft itself any more."""
    from coi.network import HELPER

    grant = Path(f"/etc/sudoers.d/coi-{coi_user.uid}")
    assert grant.is_file() and HELPER in grant.read_text(), "coi setup --user did not grant the nft helper"
    yield ["sudo", "-n"]


@pytest.fixture
def net_user(session_user, nft_sudo):
    """The session user (already allowed to run nft through 'sudo -n')."""
    yield session_user
    remove_test_network_rules()


@pytest.fixture(scope="module")
def net_lab(incus, tmp_path_factory):
    """Test hosts: two private ones, a metadata one (169.254.169.254), a fake DNS server on a
    documentation address (198.51.100.54) standing in for a public one,
    an HTTP server on the bridge gateway. All removed at the end, with any test rules."""
    from coi.host import COI_NETWORK

    lab = NetLab(tmp_path_factory.mktemp("netlab"))
    try:
        import ipaddress

        gateway = str(ipaddress.ip_interface(incus.network(COI_NETWORK)["config"]["ipv4.address"]).ip)
        answers = lab.workdir / "dns-answers.json"
        answers.write_text("{}")
        hosts = {
            "private": lab.host("private", "192.168.250.0/30"),
            "private2": lab.host("private2", "192.168.251.0/30"),
            "metadata": lab.host("metadata", "169.254.169.252/30"),
            "dns": lab.host("dns", "198.51.100.52/30", dns_answers=answers),
        }
        yield {"lab": lab, "gateway": gateway, "gateway_port": lab.http_on_host(gateway),
               "answers": answers, **hosts}
    finally:
        lab.close()
        remove_test_network_rules()


# ---- coi doctor: the host's shared address lock, away for one test ----------------------------


@pytest.fixture
def address_lock_away():
    """/var/lib/coi/addresses.lock moved aside for the test (as 'coi setup' never made it);
    the original put back afterwards, over whatever the test made there. Root only."""
    if os.geteuid() != 0:
        pytest.skip("moving the host's address lock needs root (scripts/test.sh runs as root)")
    from coi.network import ADDRESS_LOCK

    backup = ADDRESS_LOCK.with_name(f".{ADDRESS_LOCK.name}.{TEST_PREFIX}{uuid.uuid4().hex[:8]}")
    had = os.path.lexists(ADDRESS_LOCK)
    if had:
        os.replace(ADDRESS_LOCK, backup)
    try:
        yield ADDRESS_LOCK
    finally:
        if had:
            os.replace(backup, ADDRESS_LOCK)  # the same file again: its owner, group, mode and inode
        elif os.path.lexists(ADDRESS_LOCK):
            ADDRESS_LOCK.unlink()
