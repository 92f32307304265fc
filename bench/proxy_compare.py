"""Lab for choosing coi's filtering egress proxy: mitmproxy (as a library) against squid.

    sudo MITM_PYTHON/python bench/proxy_compare.py --squid-root DIR [--reps 400] [--bulk-reps 7]
        [--bulk-mib 200] [--json PATH] [--keep]

Run it with a Python that has ``mitmproxy`` installed (a throw-away venv:
``python3 -m venv V && V/bin/pip install mitmproxy==11.0.2``); its ``cryptography``
also makes the lab's certificates. ``--squid-root`` is a directory holding the
extracted Debian packages squid-openssl, squid-common, squid-langpack, libecap3,
libltdl7, libtdb1 (``apt-get download ...; dpkg-deb -x PKG DIR``), so nothing is
installed on the machine. See docs/proxy-choice.md for the results.

The lab is three network namespaces that never touch the root namespace (no
link to it, no change to its nftables ruleset):

    coi-pxy-cli  192.0.2.2/.3/.4  --veth--  coi-pxy-rtr  --veth--  coi-pxy-srv
    (the container)                 192.0.2.1            198.51.100.1   198.51.100.10 "real"
                                    (the host: nft redirect,           203.0.113.10  "decoy"
                                     the proxies)

The client's source address picks the path: .2 is redirected (nat prerouting,
``redirect to :8080``) to mitmproxy, .3 to squid (:3129 HTTP, :3130 TLS), .4 is
routed straight through (the baseline). The server answers HTTP on :80 and TLS
on :443 with one certificate per SNI name (allowed.test, other.test, creds.test,
*.wild.test) from a lab CA; the decoy at another address has the same
certificates, so a proxy that trusts the original destination instead of the
name can be caught. The router resolves names through /etc/netns/coi-pxy-rtr/hosts.

Everything (namespaces, processes, /etc/netns/coi-pxy-*, the work directory) is
removed at the end, also after a failure or Ctrl+C, unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NS_CLI, NS_RTR, NS_SRV = "coi-pxy-cli", "coi-pxy-rtr", "coi-pxy-srv"
RTR_C, RTR_S = "192.0.2.1", "198.51.100.1"
SRC = {"direct": "192.0.2.4", "mitm": "192.0.2.2", "squid": "192.0.2.3"}
REAL, DECOY = "198.51.100.10", "203.0.113.10"
MITM_PORT, MITM_REGULAR_PORT = 8080, 8081
SQUID_FWD_PORT, SQUID_HTTP_PORT, SQUID_TLS_PORT = 3128, 3129, 3130
NAMES = ["allowed.test", "other.test", "creds.test", "wild.test", "a.wild.test", "b.c.wild.test"]
ALLOWED = ["allowed.test", "*.wild.test", "creds.test"]          # coi's allowed_domains in the lab
CREDENTIALS = {"creds.test": {"authorization": ("Bearer coi-placeholder-lab", "Bearer real-secret-lab")}}
PLACEHOLDER = CREDENTIALS["creds.test"]["authorization"][0]
HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- helpers

def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def stats(values: list[float]) -> dict:
    v = sorted(values)
    if not v:
        return {}
    p90 = v[min(len(v) - 1, int(round(0.9 * len(v) + 0.5)) - 1)]
    return {"n": len(v), "median": statistics.median(v), "p90": p90, "min": v[0], "max": v[-1]}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_port(ns: str, host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(in_ns(ns, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"), capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} in {ns}")


def allowed(name: str, patterns=ALLOWED) -> bool:
    """coi's allowlist rule: exact names, and '*.example.com' for any name below it (not the apex)."""
    name = name.lower().rstrip(".")
    for p in patterns:
        if p.startswith("*.") and name.endswith(p[1:]) and len(name) > len(p) - 1:
            return True
        if name == p:
            return True
    return False


# ---------------------------------------------------------------- certificates

def make_certs(work: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    def ca(cn, key):
        return (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))

    # the servers' CA: stands for the public CAs the container already trusts
    lab_key = ec.generate_private_key(ec.SECP256R1())
    lab_ca = ca("coi-lab server CA", lab_key)
    (work / "lab-ca.pem").write_bytes(lab_ca.public_bytes(serialization.Encoding.PEM))
    leaves = {"allowed": ["allowed.test"], "other": ["other.test"], "creds": ["creds.test"],
              "wild": ["wild.test", "*.wild.test", "*.c.wild.test"]}
    for stem, sans in leaves.items():
        k = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(sans[0])).issuer_name(lab_ca.subject)
                .public_key(k.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(lab_key.public_key()), critical=False)
                .sign(lab_key, hashes.SHA256()))
        (work / f"srv-{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + pem_key(k))

    # coi's interception CA (what coi would install in the container), used by both proxies
    coi_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    coi_ca = ca("coi lab interception CA", coi_key)
    cert_pem = coi_ca.public_bytes(serialization.Encoding.PEM)
    (work / "coi-ca-cert.pem").write_bytes(cert_pem)
    (work / "coi-ca-key.pem").write_bytes(pem_key(coi_key))
    confdir = work / "mitm"
    confdir.mkdir()
    (confdir / "mitmproxy-ca.pem").write_bytes(pem_key(coi_key) + cert_pem)   # key first, then cert
    (work / "bundle.pem").write_bytes((work / "lab-ca.pem").read_bytes() + cert_pem)


# ---------------------------------------------------------------- role: test server

def role_server(work: Path) -> None:
    chunk = memoryview(bytes(1 << 20))
    contexts = {}
    for stem in ["allowed", "other", "creds", "wild"]:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        c.load_cert_chain(work / f"srv-{stem}.pem")
        contexts[stem] = c

    def pick(sni):
        if sni in ("allowed.test", "other.test", "creds.test"):
            return contexts[sni.split(".")[0]]
        return contexts["wild"] if sni and (sni == "wild.test" or sni.endswith(".wild.test")) else contexts["other"]

    def sni_cb(sslsock, sni, _ctx):
        sslsock.context = pick(sni)
        sslsock.coi_sni = sni

    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    default.load_cert_chain(work / "srv-other.pem")
    default.sni_callback = sni_cb
    log_lock = threading.Lock()
    log = open(work / "server-access.log", "a", buffering=1)

    def serve(conn, peer, ident, port):
        with log_lock:
            log.write(f"accept {ident} :{port} from {peer[0]}\n")
        try:
            sni = None
            if port == 443:
                conn = default.wrap_socket(conn, server_side=True)
                sni = getattr(conn, "coi_sni", None)
            f = conn.makefile("rb")
            while True:
                line = f.readline(65536)
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    h = f.readline(65536)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                close = headers.get("connection", "").lower() == "close"
                want, got = int(headers.get("content-length", "0")), 0
                while got < want:
                    piece = f.read(min(65536, want - got))
                    if not piece:
                        return
                    got += len(piece)
                with log_lock:
                    log.write(f"request {ident} :{port} sni={sni} host={headers.get('host')} {method} {path}\n")
                if path.startswith("/size/"):
                    n = int(path[6:])
                    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\n"
                                 f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n".encode())
                    while n > 0:
                        piece = chunk[:min(n, len(chunk))]
                        conn.sendall(piece)
                        n -= len(piece)
                else:
                    body = (f"ident={ident} port={port} sni={sni} host={headers.get('host')} "
                            f"auth={headers.get('authorization')}" + (f" body={got}" if want else "") + "\n").encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n\r\n"
                                 % (len(body), b"Connection: close" if close else b"Connection: keep-alive") + body)
                if close:
                    return
        except (OSError, ValueError, ssl.SSLError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def listen(ip, port, ident):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(1024)
        while True:
            c, peer = s.accept()
            threading.Thread(target=serve, args=(c, peer, ident, port), daemon=True).start()

    for ip, ident in ((REAL, "real"), (DECOY, "decoy")):
        for port in (80, 443):
            threading.Thread(target=listen, args=(ip, port, ident), daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


# ---------------------------------------------------------------- role: mitmproxy

def role_mitm(work: Path, lean: bool = True) -> None:
    """mitmproxy embedded as a library: the shape coi's implementation would have.
    lean: a bare Master with only the addons this needs; else DumpMaster (all ~30 default addons)."""
    import asyncio
    import logging
    import struct

    from mitmproxy import ctx, http, tls
    from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.options import Options
    from mitmproxy.proxy import mode_specs, server_hooks
    from mitmproxy.tools.dump import DumpMaster

    logging.basicConfig(filename=work / "mitm.log", level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("coi.proxy")
    log.setLevel(logging.INFO)

    def hostname(value: str | None) -> str:
        value = (value or "").strip().lower()
        if value.startswith("["):
            return value                               # IPv6 literal: never on the allowlist here
        return value.rsplit(":", 1)[0].rstrip(".") if value else ""

    def reset(client) -> None:
        """Close the client's socket with a TCP RST (SO_LINGER 0): mitmproxy itself only closes with FIN.
        Uses Proxyserver.connections, mitmproxy's registry of live connection handlers."""
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
        io = handler and handler.transports.get(handler.client)
        if io is None or io.writer is None:
            return
        io.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        io.writer.transport.abort()

    class CoiAllowlist:
        def __init__(self):
            self.refused: set[str] = set()              # client connection ids refused at the ClientHello

        def tls_clienthello(self, data: tls.ClientHelloData) -> None:
            client, server = data.context.client, data.context.server
            sni = hostname(data.client_hello.sni)
            if not sni or not allowed(sni):
                log.info("refused tls sni=%s from %s to %s", sni or "-", client.peername[0], server.address)
                self.refused.add(client.id)
                data.ignore_connection = True             # do not answer the handshake ...
                reset(client)                             # ... reset instead
                return
            # Connect to the name the client asked for, never to the address it dialled.
            server.address = (sni, server.address[1])
            if sni not in CREDENTIALS:
                data.ignore_connection = True             # passthrough: the client checks the real cert

        def http_connect(self, flow: http.HTTPFlow) -> None:   # regular mode (HTTPS_PROXY users)
            if not allowed(flow.request.host) or flow.request.port != 443:
                flow.response = forbidden(flow.request.host)

        def requestheaders(self, flow: http.HTTPFlow) -> None:
            if flow.client_conn.tls_established:          # intercepted TLS: the name is the SNI, checked above
                name = flow.request.host
            elif isinstance(flow.client_conn.proxy_mode, mode_specs.TransparentMode):
                name = hostname(flow.request.host_header)
                if allowed(name):
                    flow.request.host = name              # upstream = Host header's name, port = original port
            else:
                name = hostname(flow.request.host)
            if not allowed(name):
                log.info("refused http host=%s from %s", name or "-", flow.client_conn.peername[0])
                flow.response = forbidden(name)
                return
            creds = CREDENTIALS.get(name)
            if creds and flow.client_conn.tls_established and hostname(flow.request.host_header) == name:
                for header, (placeholder, real) in creds.items():
                    if flow.request.headers.get(header) == placeholder:
                        flow.request.headers[header] = real
            flow.request.stream = True                    # no buffering of bodies

        def responseheaders(self, flow: http.HTTPFlow) -> None:
            flow.response.stream = True

        def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
            # Every upstream connection passes here: the last line of defence (raw TCP on :443, no SNI, ...).
            host = data.server.address[0] if data.server.address else ""
            if data.client.id in self.refused or not allowed(host):
                if data.client.id not in self.refused:
                    log.info("refused upstream %s from %s (not a checked name)", data.server.address,
                             data.client.peername[0])
                data.server.error = f"coi: {host} is not in network.allowed_domains"

        def client_disconnected(self, client) -> None:
            self.refused.discard(client.id)

    def forbidden(name: str) -> http.Response:
        return http.Response.make(
            403, f"coi: {name or '(no host)'} is not in network.allowed_domains (config key [network] allowed_domains)\n",
            {"Content-Type": "text/plain; charset=utf-8"})

    async def main():
        if lean:
            master = Master(Options(), with_termlog=False)
            master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                              tlsconfig.TlsConfig(), CoiAllowlist())
        else:
            master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
            master.addons.add(CoiAllowlist())
        master.options.update(
            mode=[f"transparent@{RTR_C}:{MITM_PORT}", f"regular@{RTR_C}:{MITM_REGULAR_PORT}"],
            connection_strategy="lazy",                   # no upstream connection before the name is known
            confdir=str(work / "mitm"),                   # holds coi's CA as mitmproxy-ca.pem
            ssl_verify_upstream_trusted_ca=str(work / "lab-ca.pem"),
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, master.shutdown)
        await master.run()

    asyncio.run(main())


# ---------------------------------------------------------------- squid

def squid_conf(work: Path, root: Path, strict: bool) -> str:
    d = work / "squid"
    return f"""# coi lab: squid in intercept mode, peek at the SNI, splice allowed names, bump credential hosts
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log stdio:{d}/access.log
cache_store_log none
logfile_rotate 0
coredump_dir {d}
netdb_filename none
pinger_enable off
unlinkd_program {root}/usr/lib/squid/unlinkd
cache deny all
error_directory {d}/errors
icon_directory {root}/usr/share/squid/icons
mime_table {root}/usr/share/squid/mime.conf
hosts_file /etc/hosts
dns_nameservers 127.0.0.1
shutdown_lifetime 1 seconds
visible_hostname coi-lab
host_verify_strict {"on" if strict else "off"}

http_port {RTR_C}:{SQUID_FWD_PORT}
http_port {RTR_C}:{SQUID_HTTP_PORT} intercept
https_port {RTR_C}:{SQUID_TLS_PORT} intercept ssl-bump name=tls_intercept tls-cert={work}/coi-ca-cert.pem tls-key={work}/coi-ca-key.pem generate-host-certificates=on dynamic_cert_mem_cache_size=4MB
sslcrtd_program {root}/usr/lib/squid/security_file_certgen -s {d}/ssl_db -M 4MB
sslcrtd_children 2 startup=1 idle=1
tls_outgoing_options cafile={work}/lab-ca.pem

acl allowed_dom dstdomain -n allowed.test .wild.test creds.test
acl allowed_sni ssl::server_name allowed.test .wild.test creds.test
acl creds_sni ssl::server_name creds.test
acl creds_dom dstdomain -n creds.test
acl tls_intercept myportname tls_intercept
acl step1 at_step SslBump1
acl CONNECT method CONNECT
acl SSL_ports port 443

http_access allow CONNECT tls_intercept
http_access deny CONNECT !SSL_ports
http_access allow allowed_dom
deny_info ERR_COI_DENIED all
http_access deny all

ssl_bump peek step1
ssl_bump bump creds_sni
ssl_bump splice allowed_sni
ssl_bump terminate all

acl tls_req proto HTTPS
acl has_placeholder req_header Authorization ^Bearer\ coi-placeholder-lab$
request_header_access Authorization deny creds_dom tls_req has_placeholder
request_header_add Authorization "Bearer real-secret-lab" creds_dom tls_req has_placeholder
"""


def squid_prepare(work: Path, root: Path, strict: bool) -> list[str]:
    d = work / "squid"
    if not d.exists():
        d.mkdir()
        shutil.copytree(root / "usr/share/squid-langpack/templates", d / "errors")
        (d / "errors/ERR_COI_DENIED").write_text(
            "coi: %H is not in network.allowed_domains (config key [network] allowed_domains)\n")
        sh(str(root / "usr/lib/squid/security_file_certgen"), "-c", "-s", str(d / "ssl_db"), "-M", "4MB")
        sh("chown", "-R", "proxy:proxy", str(d))
    conf = d / ("squid-strict.conf" if strict else "squid-loose.conf")
    conf.write_text(squid_conf(work, root, strict))
    env_lib = f"LD_LIBRARY_PATH={root}/usr/lib/x86_64-linux-gnu"
    parse = sh(*in_ns(NS_RTR, "env", env_lib, str(root / "usr/sbin/squid"), "-k", "parse", "-f", str(conf)), check=False)
    if parse.returncode:
        raise RuntimeError("squid -k parse failed:\n" + parse.stderr[-3000:])
    return in_ns(NS_RTR, "env", env_lib, str(root / "usr/sbin/squid"), "-N", "-f", str(conf))


# ---------------------------------------------------------------- lab

def lab_up(work: Path) -> None:
    for ns in (NS_CLI, NS_RTR, NS_SRV):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", NS_CLI, "link", "add", "pxc0", "type", "veth", "peer", "name", "pxc1", "netns", NS_RTR)
    sh("ip", "-n", NS_RTR, "link", "add", "pxs1", "type", "veth", "peer", "name", "pxs0", "netns", NS_SRV)
    for ns, dev, addrs in ((NS_CLI, "pxc0", [SRC["mitm"], SRC["squid"], SRC["direct"]]), (NS_RTR, "pxc1", [RTR_C]),
                           (NS_RTR, "pxs1", [RTR_S]), (NS_SRV, "pxs0", [REAL])):
        for a in addrs:
            sh("ip", "-n", ns, "addr", "add", f"{a}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("ip", "-n", NS_SRV, "addr", "add", f"{DECOY}/32", "dev", "pxs0")
    sh("ip", "-n", NS_CLI, "route", "add", "default", "via", RTR_C)
    sh("ip", "-n", NS_SRV, "route", "add", "default", "via", RTR_S)
    sh("ip", "-n", NS_RTR, "route", "add", f"{DECOY}/32", "via", REAL)
    sh(*in_ns(NS_RTR, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
    rules = f"""
table ip coipxy {{
  chain lab_pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "pxc1" ip saddr {SRC['mitm']} tcp dport {{ 80, 443 }} redirect to :{MITM_PORT}
    iifname "pxc1" ip saddr {SRC['squid']} tcp dport 80 redirect to :{SQUID_HTTP_PORT}
    iifname "pxc1" ip saddr {SRC['squid']} tcp dport 443 redirect to :{SQUID_TLS_PORT}
  }}
  chain lab_forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "pxc1" ip saddr {SRC['direct']} accept
  }}
}}
"""
    sh(*in_ns(NS_RTR, "nft", "-f", "-"), input=rules)
    etc = Path("/etc/netns") / NS_RTR
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n" + f"{REAL} {' '.join(NAMES)}\n")
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")


def lab_down(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for ns in (NS_CLI, NS_RTR, NS_SRV):
        r = sh("ip", "netns", "pids", ns, check=False)
        for pid in r.stdout.split():                      # only processes inside the lab's own namespaces
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(Path("/etc/netns") / NS_RTR, ignore_errors=True)
    try:
        Path("/etc/netns").rmdir()                        # only if nothing else uses it
    except OSError:
        pass


# ---------------------------------------------------------------- role: probe (runs in the client namespace)

def recv_response(sock) -> tuple[int, bytes, dict]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = sock.recv(65536)
        if not d:
            raise ConnectionError(f"closed before headers ({len(buf)} bytes)")
        buf += d
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "-1"))
    while n < 0 or len(body) < n:
        d = sock.recv(65536)
        if not d:
            break
        body += d
    return status, body[:n] if n >= 0 else body, headers


def connect(src, ip, port, timeout=10.0):
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect((ip, port))
    return s


def request(src, ip, port, host, *, tls=False, sni=None, cafile=None, headers="", path="/", raw=None):
    """One request on a new connection. Returns a dict with what happened (never raises)."""
    out = {}
    try:
        s = connect(src, ip, port)
        if tls:
            c = ssl.create_default_context(cafile=cafile) if cafile else ssl._create_unverified_context()
            if not sni:
                c.check_hostname = False
            s = c.wrap_socket(s, server_hostname=sni)
            issuer = dict(x[0] for x in s.getpeercert()["issuer"]) if cafile else {}
            out["issuer"] = issuer.get("commonName")
        s.sendall(raw if raw is not None else
                  f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode())
        status, body, _ = recv_response(s)
        out.update(status=status, body=body.decode("latin-1").strip()[:200])
        s.close()
    except Exception as e:                                # noqa: BLE001 - the outcome is the result
        out["error"] = f"{type(e).__name__}: {e}"[:160]
    return out


def probe_check(work: Path, mode: str, regular_port: int | None) -> dict:
    src, lab, bundle = SRC[mode], str(work / "lab-ca.pem"), str(work / "bundle.pem")
    auth = f"Authorization: {PLACEHOLDER}\r\n"
    r = {}
    for n in ["allowed.test", "a.wild.test", "b.c.wild.test", "wild.test", "other.test"]:
        r[f"http {n}"] = request(src, REAL, 80, n)
        r[f"tls {n}"] = request(src, REAL, 443, n, tls=True, sni=n, cafile=lab)
    r["http Host: allowed.test to decoy address"] = request(src, DECOY, 80, "allowed.test")
    r["tls SNI allowed.test to decoy address"] = request(src, DECOY, 443, "allowed.test", tls=True,
                                                         sni="allowed.test", cafile=lab)
    r["tls no SNI (IP only)"] = request(src, REAL, 443, REAL, tls=True)
    r["http no Host (HTTP/1.0)"] = request(src, REAL, 80, "", raw=b"GET / HTTP/1.0\r\n\r\n")
    # keep-alive: an allowed request, then a refused one on the same connection
    try:
        s = connect(src, REAL, 80)
        s.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        first = recv_response(s)[0]
        s.sendall(b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
        st, body, _ = recv_response(s)
        r["http keep-alive allowed.test then other.test"] = {"status": [first, st], "body": body.decode()[:200]}
    except Exception as e:                                # noqa: BLE001
        r["http keep-alive allowed.test then other.test"] = {"error": f"{type(e).__name__}: {e}"[:160]}
    # raw TCP (not TLS, not HTTP) to :443 of the decoy: must not reach it
    before = (work / "server-access.log").read_text().count("accept decoy :443")
    try:
        s = connect(src, DECOY, 443)
        s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        got = s.recv(100)
        r["raw TCP to decoy:443"] = {"reply": got.decode("latin-1")[:60]}
    except Exception as e:                                # noqa: BLE001
        r["raw TCP to decoy:443"] = {"error": f"{type(e).__name__}: {e}"[:160]}
    time.sleep(0.5)
    r["raw TCP to decoy:443"]["decoy accepted"] = (work / "server-access.log").read_text().count(
        "accept decoy :443") - before
    # credential injection: only the credential host, only over intercepted TLS
    r["tls creds.test with placeholder"] = request(src, REAL, 443, "creds.test", tls=True, sni="creds.test",
                                                   cafile=bundle, headers=auth)
    body = b"x" * (1 << 20)
    r["tls creds.test POST 1 MiB with placeholder"] = request(
        src, REAL, 443, "creds.test", tls=True, sni="creds.test", cafile=bundle,
        raw=f"POST /v1/messages HTTP/1.1\r\nHost: creds.test\r\n{auth}Content-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode() + body)
    r["tls creds.test without Authorization"] = request(src, REAL, 443, "creds.test", tls=True, sni="creds.test",
                                                        cafile=bundle)
    r["tls creds.test with another token"] = request(src, REAL, 443, "creds.test", tls=True, sni="creds.test",
                                                     cafile=bundle, headers="Authorization: Bearer agent-own\r\n")
    r["tls SNI creds.test, Host: allowed.test"] = request(
        src, REAL, 443, "creds.test", tls=True, sni="creds.test", cafile=bundle,
        raw=f"GET / HTTP/1.1\r\nHost: allowed.test\r\n{auth}Connection: close\r\n\r\n".encode())
    r["tls allowed.test with placeholder"] = request(src, REAL, 443, "allowed.test", tls=True, sni="allowed.test",
                                                     cafile=lab, headers=auth)
    r["http creds.test with placeholder"] = request(src, REAL, 80, "creds.test", headers=auth)
    if regular_port:                                       # HTTPS_PROXY users: CONNECT through the proxy's own port
        for n in ["allowed.test", "other.test"]:
            try:
                s = connect(src, RTR_C, regular_port)
                s.sendall(f"CONNECT {n}:443 HTTP/1.1\r\nHost: {n}:443\r\n\r\n".encode())
                buf = b""
                while b"\r\n\r\n" not in buf:
                    d = s.recv(4096)
                    if not d:
                        break
                    buf += d
                head, _, rest = buf.partition(b"\r\n\r\n")
                status = int(head.split()[1]) if head else None
                out = {"connect_status": status}
                if status == 200:
                    c = ssl.create_default_context(cafile=lab)
                    t = c.wrap_socket(s, server_hostname=n)
                    out["issuer"] = dict(x[0] for x in t.getpeercert()["issuer"]).get("commonName")
                    t.sendall(f"GET / HTTP/1.1\r\nHost: {n}\r\nConnection: close\r\n\r\n".encode())
                    st, body, _ = recv_response(t)
                    out.update(status=st, body=body.decode()[:200])
                else:
                    n_len = re.search(rb"content-length:\s*(\d+)", head, re.I)
                    while n_len and len(rest) < int(n_len.group(1)):
                        d = s.recv(65536)
                        if not d:
                            break
                        rest += d
                    text = re.sub(r"<[^>]+>|\s+", " ", rest.decode("latin-1"))
                    m = re.search(r"coi:[^\n<]*", text)
                    out["body"] = m.group(0).strip()[:200] if m else text.strip()[:200]
                r[f"CONNECT {n}:443 on the proxy port"] = out
            except Exception as e:                        # noqa: BLE001
                r[f"CONNECT {n}:443 on the proxy port"] = {"error": f"{type(e).__name__}: {e}"[:160]}
    return r


def probe_latency(work: Path, labels: list[str], host: str, scheme: str, reps: int, warmup: int) -> dict:
    """Interleaved: every round does one connection per label. TLS: connect + handshake (verifying), then one
    request; HTTP: connect + one request. All times in ms."""
    cafile = str(work / "bundle.pem")
    ctx = ssl.create_default_context(cafile=cafile)
    port = 443 if scheme == "https" else 80
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: {PLACEHOLDER}\r\nConnection: close\r\n\r\n".encode()
    out = {lab: {"connect": [], "handshake": [], "request": [], "first": None, "issuer": None} for lab in labels}
    for i in range(warmup + reps):
        for lab in labels:
            t0 = time.perf_counter()
            s = connect(SRC[lab.split("-")[0]], REAL, port)
            t1 = time.perf_counter()
            if scheme == "https":
                s = ctx.wrap_socket(s, server_hostname=host)
            t2 = time.perf_counter()
            s.sendall(req)
            status, body, _ = recv_response(s)
            t3 = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"{lab}: status {status} {body[:100]!r}")
            o = out[lab]
            if i == 0:
                o["first"] = {"handshake": (t2 - t0) * 1e3, "request": (t3 - t0) * 1e3}
                if scheme == "https":
                    o["issuer"] = dict(x[0] for x in s.getpeercert()["issuer"]).get("commonName")
                o["body"] = body.decode()[:200]
            if i >= warmup:
                o["connect"].append((t1 - t0) * 1e3)
                o["handshake"].append((t2 - t0) * 1e3)
                o["request"].append((t3 - t0) * 1e3)
            s.close()
    return out


def probe_bulk(work: Path, labels: list[str], host: str, scheme: str, reps: int, size: int) -> dict:
    port = 443 if scheme == "https" else 80
    out = {lab: {"seconds": [], "mib_s": []} for lab in labels}
    for _ in range(reps):
        for lab in labels:
            r = sh("curl", "-sS", "--http1.1", "-o", "/dev/null", "--max-time", "120",
                   "--interface", SRC[lab.split("-")[0]], "--cacert", str(work / "bundle.pem"),
                   "--resolve", f"{host}:{port}:{REAL}", "-H", f"Authorization: {PLACEHOLDER}",
                   "-w", "%{time_total} %{size_download} %{http_code}", f"{scheme}://{host}/size/{size}")
            t, n, code = r.stdout.split()
            if code != "200" or int(n) != size:
                raise RuntimeError(f"{lab}: {code} {n} bytes")
            out[lab]["seconds"].append(float(t))
            out[lab]["mib_s"].append(size / float(t) / 2**20)
    return out


# ---------------------------------------------------------------- orchestrator

class Lab:
    def __init__(self, work: Path, mitm_python: str):
        self.work, self.py, self.procs, self.pids = work, mitm_python, [], {}

    def start(self, key, cmd, log):
        p = subprocess.Popen(cmd, stdout=open(self.work / log, "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        self.pids[key] = p.pid
        return p

    def stop(self, key):
        for p in self.procs:
            if p.pid == self.pids.get(key) and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)
        self.pids.pop(key, None)

    def probe(self, *args) -> dict:
        r = sh(*in_ns(NS_CLI, self.py, str(HERE), "_probe", str(self.work), *map(str, args)), check=False)
        if r.returncode:
            raise RuntimeError(f"probe {args} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout)

    def measured(self, *args) -> dict:
        """A probe run, with the CPU time each proxy process used during it."""
        before = {k: cpu_seconds(p) for k, p in self.pids.items()}
        t0 = time.monotonic()
        res = self.probe(*args)
        wall = time.monotonic() - t0
        res["_cpu"] = {k: cpu_seconds(p) - before[k] for k, p in self.pids.items()}
        res["_rss_mib"] = {k: rss_mib(p) for k, p in self.pids.items()}
        res["_wall"] = wall
        return res


def under_load(lab: Lab, work: Path, label: str, reps: int, rate: str = "") -> dict:
    """TLS set-up through one path while 200 MiB downloads run through the same path (at most 40, one at a
    time; rate: curl --limit-rate, e.g. 50M for a fast internet link)."""
    limit = f"--limit-rate {rate} " if rate else ""
    loop = (f"for i in $(seq 1 40); do curl -s --http1.1 -o /dev/null --max-time 60 {limit}--interface {SRC[label]} "
            f"--cacert {work}/bundle.pem --resolve allowed.test:443:{REAL} https://allowed.test/size/{200 << 20} "
            f"|| break; done")
    bg = subprocess.Popen(in_ns(NS_CLI, "bash", "-c", loop), start_new_session=True)
    try:
        time.sleep(0.5)
        res = lab.measured("latency", label, "allowed.test", "https", reps, 10)
        return res[label]
    finally:
        os.killpg(bg.pid, signal.SIGTERM)
        bg.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squid-root", required=True, type=Path)
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--bulk-reps", type=int, default=7)
    ap.add_argument("--bulk-mib", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--mitm-master", choices=["lean", "dump"], default="lean",
                    help="lean: Master with the 4 addons needed; dump: DumpMaster with all default addons")
    ap.add_argument("--skip-bulk", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the lab up (for poking at it); remove it later "
                                                        "with: ip netns del coi-pxy-{cli,rtr,srv}")
    a = ap.parse_args()
    if os.geteuid():
        sys.exit("run as root: the lab is network namespaces")
    import mitmproxy.version                              # noqa: F401 - fail early without mitmproxy
    root = a.squid_root.resolve()
    work = Path(tempfile.mkdtemp(prefix="coi-pxy-"))
    work.chmod(0o755)                                     # squid drops to user proxy
    lab = Lab(work, sys.executable)
    results = {"date": datetime.date.today().isoformat(), "kernel": os.uname().release,
               "cpus": os.cpu_count(), "mitmproxy": mitmproxy.version.VERSION,
               "mitm_master": a.mitm_master, "warmup": a.warmup, "squid": sh(f"{root}/usr/sbin/squid", "-v", env={"LD_LIBRARY_PATH": f"{root}/usr/lib/x86_64-linux-gnu"}
                           ).stdout.splitlines()[0], "bulk_mib": a.bulk_mib}
    try:
        make_certs(work)
        lab_up(work)
        lab.start("server", in_ns(NS_SRV, sys.executable, str(HERE), "_server", str(work)), "server.out")
        for ip in (REAL, DECOY):
            for port in (80, 443):
                wait_port(NS_RTR, ip, port)
        lab.start("mitm", in_ns(NS_RTR, sys.executable, str(HERE), "_mitm", str(work), a.mitm_master), "mitm.out")
        wait_port(NS_RTR, RTR_C, MITM_PORT)
        lab.start("squid", squid_prepare(work, root, strict=True), "squid.out")
        wait_port(NS_RTR, RTR_C, SQUID_TLS_PORT)
        results["rss_idle_mib"] = {k: rss_mib(p) for k, p in lab.pids.items() if k != "server"}

        print("checks ...", file=sys.stderr)
        results["checks"] = {"direct": lab.probe("check", "direct", 0),
                             "mitm": lab.probe("check", "mitm", MITM_REGULAR_PORT),
                             "squid (host_verify_strict on)": lab.probe("check", "squid", SQUID_FWD_PORT)}
        lab.pids.pop("server")
        print("latency ...", file=sys.stderr)
        three = "direct,mitm,squid"
        results["tls_passthrough"] = lab.measured("latency", three, "allowed.test", "https", a.reps, a.warmup)
        results["http"] = lab.measured("latency", three, "allowed.test", "http", a.reps, a.warmup)
        results["tls_intercept"] = lab.measured("latency", three, "creds.test", "https", a.reps, a.warmup)
        print("latency under load ...", file=sys.stderr)
        for key, rate in (("tls_passthrough_under_load", ""), ("tls_passthrough_under_50M_load", "50M")):
            results[key] = {lab_: under_load(lab, work, lab_, max(100, a.reps // 4), rate)
                            for lab_ in ("direct", "mitm", "squid")}
        print("bulk ...", file=sys.stderr)
        size = a.bulk_mib << 20
        if not a.skip_bulk:
            for key, host, scheme in (("bulk_tls_passthrough", "allowed.test", "https"),
                                      ("bulk_http", "allowed.test", "http"),
                                      ("bulk_tls_intercept", "creds.test", "https")):
                results[key] = lab.measured("bulk", three, host, scheme, a.bulk_reps, size)
        results["rss_after_mib"] = {k: rss_mib(p) for k, p in lab.pids.items()}

        lab.stop("squid")
        lab.start("squid", squid_prepare(work, root, strict=False), "squid.out")
        wait_port(NS_RTR, RTR_C, SQUID_TLS_PORT)
        results["checks"]["squid (host_verify_strict off)"] = lab.probe("check", "squid", SQUID_FWD_PORT)
        results["logs"] = {
            "mitm": (work / "mitm.log").read_text()[-4000:],
            "squid_access": (work / "squid/access.log").read_text()[-6000:],
            "squid_cache": "\n".join(line for line in (work / "squid/cache.log").read_text().splitlines()
                                     if "SECURITY" in line or "forgery" in line.lower())[-3000:],
        }
    finally:
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
        if a.keep:
            print(f"lab kept; work directory {work}", file=sys.stderr)
        else:
            lab_down(lab.procs)
            shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    return 0


def report(r: dict) -> str:
    out = [f"{r['date']}, kernel {r['kernel']}, {r['cpus']} CPUs, mitmproxy {r['mitmproxy']}, {r['squid']}", ""]
    for key, title in (("tls_passthrough", "TLS set-up, allowed.test (passthrough)"),
                       ("http", "plain HTTP request on a new connection, allowed.test"),
                       ("tls_intercept", "TLS set-up, creds.test (mitmproxy and squid terminate TLS)")):
        if key not in r:
            continue
        out += [f"### {title}", "", "| path | set-up median | p90 | added (median) | request median | p90 | "
                "proxy CPU per conn |", "|---|---|---|---|---|---|---|"]
        res = r[key]
        base = stats(res["direct"]["handshake" if key != "http" else "request"])["median"]
        for lab in ("direct", "mitm", "squid"):
            o = res[lab]
            hs, rq = stats(o["handshake"]), stats(o["request"])
            setup = hs if key != "http" else rq
            cpu = res["_cpu"].get(lab)
            cpu_s = f"{cpu / (len(o['request']) + r.get('warmup', 0)) * 1e3:.2f} ms" if cpu is not None else "-"
            out.append(f"| {lab} | {setup['median']:.2f} | {setup['p90']:.2f} | {setup['median'] - base:+.2f} | "
                       f"{rq['median']:.2f} | {rq['p90']:.2f} | {cpu_s} |")
        out.append("")
    for key, what in (("tls_passthrough_under_load", "as fast as they go"),
                      ("tls_passthrough_under_50M_load", "limited to 50 MB/s")):
        if key not in r:
            continue
        res = r[key]
        out += [f"### TLS set-up (passthrough) while 200 MiB downloads ({what}) run on the same path", "",
                "| path | set-up median | p90 |", "|---|---|---|"]
        for lab in ("direct", "mitm", "squid"):
            st = stats(res[lab]["handshake"])
            out.append(f"| {lab} | {st['median']:.2f} | {st['p90']:.2f} |")
        out.append("")
    for key, title in (("bulk_tls_passthrough", "TLS download (passthrough)"), ("bulk_http", "plain HTTP download"),
                       ("bulk_tls_intercept", "TLS download, creds.test (terminated by the proxy)")):
        if key not in r:
            continue
        res = r[key]
        out += [f"### {title}, {r['bulk_mib']} MiB", "", "| path | MiB/s median | p10 (slow end) | cost of the median | "
                "proxy CPU s per download |", "|---|---|---|---|---|"]
        base = stats(res["direct"]["mib_s"])["median"]
        for lab in ("direct", "mitm", "squid"):
            v = sorted(res[lab]["mib_s"])
            med = statistics.median(v)
            slow = v[max(0, int(len(v) * 0.1 + 0.5) - 1)]
            cpu = res["_cpu"].get(lab)
            cpu_s = f"{cpu / len(v):.2f}" if cpu is not None else "-"
            out.append(f"| {lab} | {med:.0f} | {slow:.0f} | {(1 - med / base) * 100:+.0f}% | {cpu_s} |")
        out.append("")
    for mode, checks in r.get("checks", {}).items():
        out += [f"### checks: {mode}", "", "| case | outcome |", "|---|---|"]
        for case, o in checks.items():
            out.append(f"| {case} | {json.dumps(o)[:230]} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_server":
        role_server(Path(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "_mitm":
        role_mitm(Path(sys.argv[2]), lean=sys.argv[3:4] != ["dump"])
    elif len(sys.argv) > 3 and sys.argv[1] == "_probe":
        w, what, rest = Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
        if what == "check":
            res = probe_check(w, rest[0], int(rest[1]) or None)
        elif what == "latency":
            res = probe_latency(w, rest[0].split(","), rest[1], rest[2], int(rest[3]), int(rest[4]))
        else:
            res = probe_bulk(w, rest[0].split(","), rest[1], rest[2], int(rest[3]), int(rest[4]))
        print(json.dumps(res))
    else:
        sys.exit(main())
