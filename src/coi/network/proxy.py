"""coi's egress proxy for the allowlist by name: ``python -I -m coi.network.proxy NETWORK_DIR LISTEN [READY_FD]``.

One process per host user (``egress.proxy_port``), started by coi when a session needs it
(``ensure_running``), detached so that it outlives ``coi`` (sessions detach), and ended
by coi when no session of the user needs it any more (``stop_if_unused``). It is
mitmproxy, used as a library, in transparent mode: the nft rules of each container
(``coi.network.nft``) redirect its TCP 80 and 443 to it.

What it lets through, per connection, by the container's address: a TLS connection whose
SNI, or an HTTP request whose Host, is in the container's allowlist (names and
``*.`` wildcards, ``egress.NameRules``). The upstream is the *name* resolved by the proxy,
never the address the container asked for (else any address would pass with an allowed
SNI), and never the host, loopback, link-local or the bridge (``egress.upstream_problem``).
Allowed TLS is spliced through unread (the container checks the real server's
certificate). A refused HTTP request gets a 403 naming the domain and the config key; a
refused TLS connection is reset. Every connection is one JSON line in
``<state>/network/connections/<container>.jsonl``, with the bytes it carried each way.

The per-container policy files (``<state>/network/proxy/<ipv4>.json``) are written by
``coi.network.service`` when it applies the rules, and removed with them; a connection
from an address without one is refused.

mitmproxy is imported here only (``coi list`` and ``coi --version`` never load it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from coi import detached
from coi.network.connlog import log_path
from coi.network.egress import EXPLICIT_OFFSET, NameRules, refusal_text, upstream_problem

POLICY_DIR = "proxy"  # under <state>/network
PID_FILE = "proxy.pid"  # under <state>/network/proxy
LISTEN_FILE = "proxy.listen"  # under <state>/network/proxy: where the last proxy listened
UPSTREAM_CA_ENV = "COI_PROXY_UPSTREAM_CA"  # the CA file the proxy trusts for upstream TLS instead (tests)
LOG_LIMIT = 8 << 20  # bytes of one session's connection log
MAX_NAME = 253  # characters of a name in the log (a DNS name's longest)
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"  # the host's trusted CAs (Debian's bundle)


# ---- the per-container policies (written by coi.network.service) ---------------------------

def policy_path(network_dir: Path, ipv4: str) -> Path:
    return network_dir / POLICY_DIR / f"{ipv4}.json"


def write_policy(network_dir: Path, *, ipv4: str, container: str, allowed: list[str], refused: list[str],
                 resolver: str | None, credentials: list[dict[str, Any]] | None = None) -> None:
    """What the proxy lets ``ipv4`` (one container) reach, and the credentials it injects
    for it, written atomically and readable by the user alone (it holds secrets)."""
    path = policy_path(network_dir, ipv4)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"container": container, "allowed": allowed, "refused": refused, "resolver": resolver,
                   "credentials": credentials or []}, fh)
    os.replace(tmp, path)


CA_FILE = "mitmproxy-ca-cert.pem"  # the proxy's CA certificate, in <network>/proxy-ca (made at its first start)


def ca_certificate(network_dir: Path) -> bytes:
    return (network_dir / "proxy-ca" / CA_FILE).read_bytes()


def remove_policy(network_dir: Path, ipv4: str) -> None:
    policy_path(network_dir, ipv4).unlink(missing_ok=True)


class Policies:
    """The policy files, read again when they change (looked up per connection)."""

    def __init__(self, network_dir: Path) -> None:
        self.dir = network_dir / POLICY_DIR
        self._cache: dict[str, tuple[float, dict[str, Any], NameRules]] = {}

    def get(self, ipv4: str) -> tuple[dict[str, Any], NameRules] | None:
        path = self.dir / f"{ipv4}.json"
        try:
            mtime = path.stat().st_mtime
            cached = self._cache.get(ipv4)
            if cached and cached[0] == mtime:
                return cached[1], cached[2]
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            self._cache.pop(ipv4, None)
            return None
        rules = NameRules.from_entries(data.get("allowed") or [])
        self._cache[ipv4] = (mtime, data, rules)
        return data, rules


def resolve(name: str, resolver: str | None) -> list[str]:
    """The name's IPv4 addresses: through ``resolver`` ("ip:port") when set, else the host's."""
    if resolver:
        from coi.network.dns import dns_query_a

        host, _, port = resolver.partition(":")
        return list(dns_query_a(name, (host, int(port or 53))))
    return sorted({a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)})


def _is_this_host(address: str) -> bool:
    """Whether ``address`` is one of this host's own (binding to it works only then)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


# ---- what mitmproxy has no API for: a connection's socket --------------------------------------
# Two of its internals, here only: ``Proxyserver.connections`` (client id -> its handler) and
# the handler's ``transports`` (connection -> its reader and writer).

def _client_writer(client: Any) -> Any:
    from mitmproxy import ctx

    handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
    io = handler.transports.get(handler.client) if handler is not None else None
    return io.writer if io is not None else None


def _reset(client: Any) -> None:
    """End the client's connection with a TCP RST (mitmproxy itself closes with a FIN)."""
    writer = _client_writer(client)
    if writer is not None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


_TCPI_BYTES = 120  # offset of tcpi_bytes_acked, then tcpi_bytes_received, in Linux's struct tcp_info


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """(bytes sent and acknowledged, bytes received) on a TCP socket, from the kernel's own
    count: nothing is counted per chunk, so spliced TLS stays spliced."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        return struct.unpack_from("<QQ", info, _TCPI_BYTES)  # type: ignore[return-value]
    except (OSError, struct.error):
        return None


# ---- the mitmproxy addon ---------------------------------------------------------------------

class Egress:
    """The allowlist by name, as mitmproxy hooks."""

    def __init__(self, network_dir: Path) -> None:
        self.policies = Policies(network_dir)
        self.network_dir = network_dir
        self.verdicts: dict[str, dict[str, Any]] = {}  # client connection id -> what was decided
        self.sni: dict[str, str] = {}  # client connection id -> the TLS name the proxy ended TLS for
        self.carried: dict[str, tuple[int, int]] = {}  # client connection id -> (to it, from it), at its close

    def client_connected(self, client: Any) -> None:
        """Count what the connection carries: the kernel's totals, read as asyncio closes
        its socket (its protocol's ``connection_lost`` comes just before, whoever closes)."""
        writer = _client_writer(client)
        if writer is None:
            return
        sock, protocol = writer.get_extra_info("socket"), writer.transport.get_protocol()
        lost = protocol.connection_lost

        def counted(exc: Exception | None) -> None:
            carried = tcp_bytes(sock)
            if carried is not None:
                self.carried[client.id] = carried
            lost(exc)

        protocol.connection_lost = counted

    # A connection's verdict: allowed (upstream address chosen) or refused (why).
    async def _decide(self, client: Any, name: str | None, port: int, kind: str) -> dict[str, Any]:
        import asyncio

        ipv4 = client.peername[0]
        found = self.policies.get(ipv4)
        verdict: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "client": ipv4,
                                   "container": found[0].get("container") if found else None,
                                   "name": name, "port": port, "kind": kind}
        if found is None:
            return {**verdict, "verdict": "refused", "why": "no coi session has this address"}
        data, rules = found
        if not rules.allows(name):
            return {**verdict, "verdict": "refused", "why": "not in allowed_domains"}
        try:
            addresses = await asyncio.to_thread(resolve, name or "", data.get("resolver"))
        except (OSError, UnicodeError, ValueError) as exc:
            return {**verdict, "verdict": "refused", "why": f"{name} did not resolve ({exc})"}
        for address in addresses:
            problem = upstream_problem(address, refused=data.get("refused") or [])
            if problem is None and _is_this_host(address):
                problem = f"{address} is this host"
            if problem is None:
                return {**verdict, "verdict": "allowed", "upstream": [address, port]}
        return {**verdict, "verdict": "refused",
                "why": (problem if addresses else f"{name} has no IPv4 address")}

    async def tls_clienthello(self, data: Any) -> None:
        client = data.context.client
        port = data.context.server.address[1] if data.context.server.address else 443
        verdict = await self._decide(client, data.client_hello.sni, port, "tls")
        self.verdicts[client.id] = verdict
        # Spliced through unread (or closed), unless a credential is to go in: then the
        # proxy ends TLS with its own CA (which coi put into the container) and reads on.
        data.ignore_connection = not (verdict["verdict"] == "allowed" and self._credentials(client, verdict["name"]))
        if not data.ignore_connection:
            self.sni[client.id] = verdict["name"]
        if verdict["verdict"] == "allowed":
            data.context.server.address = tuple(verdict["upstream"])
        else:
            _reset(client)  # before any answer: the program sees the refusal at once

    def _credentials(self, client: Any, name: str | None) -> list[dict[str, Any]]:
        """The credentials of the client's container for ``name``."""
        found = self.policies.get(client.peername[0])
        if found is None or not name:
            return []
        return [c for c in found[0].get("credentials") or [] if NameRules.from_entries(c["hosts"]).allows(name)]

    def _inject(self, flow: Any) -> None:
        """A request to a credential's host: its placeholder replaced by the secret (the
        header set when the request has none). Only on TLS the proxy ended itself."""
        if flow.request.scheme != "https":
            return
        name = self.sni.get(flow.client_conn.id)
        host = (flow.request.host_header or "").rsplit(":", 1)[0]
        if not name or host.lower().rstrip(".") != name.lower().rstrip("."):
            return  # a Host other than the SNI gets nothing
        for cred in self._credentials(flow.client_conn, name):
            current = flow.request.headers.get(cred["header"])
            if current is None:
                flow.request.headers[cred["header"]] = cred["value"]
            elif cred["placeholder"] in current:
                flow.request.headers[cred["header"]] = cred["value"]

    async def requestheaders(self, flow: Any) -> None:
        from mitmproxy import http

        name = flow.request.host_header or ""
        verdict = await self._decide(flow.client_conn, name.rsplit(":", 1)[0] if name.count(":") == 1 else name,
                                     flow.request.port, flow.request.scheme)
        previous = self.verdicts.get(flow.client_conn.id)
        if previous is not None and not previous.get("logged"):
            self._log(previous)  # each request of a kept-alive connection is a line; the bytes go on its last
        self.verdicts[flow.client_conn.id] = verdict
        if verdict["verdict"] != "allowed":
            flow.response = http.Response.make(403, refusal_text(verdict["name"], verdict["port"]),
                                               {"Content-Type": "text/plain; charset=utf-8"})
            self._log(verdict)
            return
        address, port = verdict["upstream"]
        host_header = flow.request.host_header
        flow.request.host, flow.request.port = address, port
        flow.request.host_header = host_header
        self._inject(flow)
        flow.request.stream = True  # bodies pass through, never held in memory

    def responseheaders(self, flow: Any) -> None:
        if flow.response is not None:
            flow.response.stream = True

    async def http_connect(self, flow: Any) -> None:
        """A CONNECT (programs that honour HTTPS_PROXY): its target checked like an SNI;
        the TLS inside is checked again by its own SNI."""
        from mitmproxy import http

        verdict = await self._decide(flow.client_conn, flow.request.host, flow.request.port, "connect")
        if verdict["verdict"] != "allowed":
            flow.response = http.Response.make(403, refusal_text(verdict["name"], verdict["port"]),
                                               {"Content-Type": "text/plain; charset=utf-8"})
            self._log(verdict)

    def server_connect(self, data: Any) -> None:
        """The last word before any upstream connection: only to what a verdict chose (and
        TLS to the server with the verdict's name)."""
        verdict = self.verdicts.get(data.client.id)
        wanted = tuple(verdict.get("upstream") or ()) if verdict else ()
        if verdict and verdict["verdict"] == "allowed" and tuple(data.server.address or ()) == wanted:
            data.server.sni = verdict["name"]
            return
        if verdict is None:
            verdict = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "client": data.client.peername[0], "container": None, "name": None,
                       "port": (data.server.address or (None, None))[1], "kind": "tcp",
                       "verdict": "refused", "why": "neither TLS with a name nor HTTP with a Host"}
            self.verdicts[data.client.id] = verdict
        data.server.error = f"refused by coi: {verdict.get('why', 'not allowed')}"

    def client_disconnected(self, client: Any) -> None:
        self.sni.pop(client.id, None)
        verdict = self.verdicts.pop(client.id, None)
        carried = self.carried.pop(client.id, None)
        if verdict is not None and not verdict.get("logged"):
            if carried is not None:  # the client is the container: what went to it was received
                verdict["bytes_received"], verdict["bytes_sent"] = carried
            self._log(verdict)

    def _log(self, verdict: dict[str, Any]) -> None:
        """One line of the session's log. The container chooses what it connects to, and
        how often: names are cut at a DNS name's length, and a log stops at LOG_LIMIT
        bytes (with one line saying so), so an agent cannot fill the host's disk."""
        verdict["logged"] = True
        container = verdict.get("container") or "unknown"
        entry = {k: v for k, v in verdict.items() if k != "logged"}
        if isinstance(entry.get("name"), str) and len(entry["name"]) > MAX_NAME:
            entry["name"] = entry["name"][:MAX_NAME] + "..."
        path = log_path(self.network_dir, container)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(path, "a") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size >= LOG_LIMIT:
                    return  # full: its last line says so
                line = json.dumps(entry) + "\n"  # (ASCII: as many bytes as characters)
                fh.write(line)
                if size + len(line) >= LOG_LIMIT:
                    fh.write(json.dumps({"time": entry.get("time"), "container": container, "kind": "log",
                                         "verdict": "full", "why": f"the log reached {LOG_LIMIT >> 20} MiB; "
                                         "later connections of this session are not logged"}) + "\n")
        except OSError:
            pass


# ---- starting and stopping it (in coi's own process; no mitmproxy here) -----------------------

START_TIMEOUT = 20.0  # seconds for a new proxy to listen (mitmproxy's import is most of it)


def _pid(network_dir: Path) -> int | None:
    """The user's proxy process, when its pid file names a live one (a pid the system gave
    to another program since is not it)."""
    try:
        pid = int((network_dir / POLICY_DIR / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    argv = detached.argv_of(pid)
    return pid if b"coi.network.proxy" in argv and str(network_dir).encode() in argv else None


def _listening(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


class _Child:
    """A proxy this process started: its Popen (to reap it) and the read end of the pipe
    on which it says it listens."""

    def __init__(self, proc: Any, ready: int) -> None:
        self.proc, self.ready = proc, ready

    def wait_ready(self, timeout: float) -> bool | None:
        """True once it listens, False when it ended first, None at the timeout."""
        import select

        if self.ready < 0:
            return self.proc.poll() is None
        readable, _, _ = select.select([self.ready], [], [], timeout)
        if not readable:
            return None
        said = os.read(self.ready, 16)
        os.close(self.ready)
        self.ready = -1
        if said != READY:
            self.proc.wait()
        return said == READY


_started: dict[int, _Child] = {}  # pid -> the proxies this process started
READY = b"listening\n"  # what the proxy writes on its ready pipe once it listens


def launch(network_dir: Path, listen: str) -> int:
    """The user's proxy process: the live one, or a new detached one, not waited for. A
    session starts it early, so that its start-up overlaps the container's
    (``ensure_running`` waits). Raises CoiError when mitmproxy is not installed."""
    import fcntl
    import subprocess

    from coi.errors import CoiError

    if not proxy_available():
        raise CoiError("the allowlist by name needs coi's proxy (mitmproxy), which is not installed",
                       "install it: sudo ./scripts/install.sh, or set [network] allowlist_by = \"address\"")
    folder = network_dir / POLICY_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / "launch.lock", "a") as lock:  # one launch at a time among the user's coi processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        pid = _pid(network_dir)
        if pid is not None:
            return pid
        ready, said = os.pipe()
        try:
            with open(network_dir / "proxy.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-I", "-m", "coi.network.proxy", str(network_dir), listen,
                                         str(said)], cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        pass_fds=(said,), start_new_session=True)
        except BaseException:
            os.close(ready)
            raise
        finally:
            os.close(said)
        _started[proc.pid] = _Child(proc, ready)
        (folder / PID_FILE).write_text(f"{proc.pid}\n")  # written here: a second launch sees it at once
        (folder / LISTEN_FILE).write_text(f"{listen}\n")  # for ``revive``
        return proc.pid


def ensure_running(network_dir: Path, listen: str) -> int:
    """The user's proxy, listening on ``listen``: the running one, one starting (waited
    for), or a new one. A proxy that ends before it listens (another coi stopped it as
    unused, a moment before this session's policy was written) is started once more.
    Raises CoiError when it cannot start (the session must not start)."""
    from coi.errors import CoiError
    from coi.wait import wait_for

    for _ in range(2):
        pid = launch(network_dir, listen)
        child = _started.get(pid)
        if child is not None:  # started here: it says when it listens
            listening = child.wait_ready(START_TIMEOUT)
        else:  # started by another coi, which waits for it too: its port answers
            listening = wait_for(lambda: _listening(listen) or _pid(network_dir) != pid, timeout=START_TIMEOUT,
                                 what=f"coi's proxy to listen on {listen}") and _pid(network_dir) == pid
        if listening:
            return pid
        if listening is None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            raise CoiError(f"coi's proxy did not listen on {listen} within {START_TIMEOUT:g}s",
                           f"see {network_dir / 'proxy.log'}")
        if _listening(listen):
            raise CoiError(f"another program listens on {listen}, the address of your coi proxy",
                           "end it (ss -ltnp shows which), then start the session again")
    raise CoiError("coi's proxy did not start", f"see {network_dir / 'proxy.log'}")


def revive(network_dir: Path, containers: set[str]) -> bool:
    """Start the proxy again, not waited for, when one of ``containers`` (running ones) has
    a policy but no proxy runs: it died, and their egress has failed closed since. Whether
    it was started. Cheap when nothing is wrong (``coi list`` calls it): no Incus call."""
    folder = network_dir / POLICY_DIR
    if _pid(network_dir) is not None or not containers:
        return False
    needed = False
    for path in folder.glob("*.json"):
        try:
            needed = json.loads(path.read_text()).get("container") in containers
        except (OSError, ValueError, AttributeError):
            continue
        if needed:
            break
    try:
        listen = (folder / LISTEN_FILE).read_text().strip()
    except OSError:
        return False
    if not needed or not listen or not proxy_available():
        return False
    launch(network_dir, listen)
    return True


def proxy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mitmproxy") is not None


def stop_if_unused(network_dir: Path) -> bool:
    """End the user's proxy when no container has a policy any more; whether it was ended."""
    if any((network_dir / POLICY_DIR).glob("*.json")):
        return False
    pid = _pid(network_dir)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    # Gone before this returns: the next session may need the port again at once.
    from coi.errors import TimedOutError
    from coi.wait import wait_for

    try:  # the process, not its pid file (removed as it begins to end); a zombie has no command line
        wait_for(lambda: b"coi.network.proxy" not in detached.argv_of(pid), timeout=10, what="coi's proxy to end")
    except TimedOutError:
        os.kill(pid, signal.SIGKILL)
    child = _started.pop(pid, None)
    if child is not None:  # reaped, its pipe closed
        child.proc.wait()
        if child.ready >= 0:
            os.close(child.ready)
    return True


def status(network_dir: Path, listen: str) -> tuple[bool, bool, int | None]:
    """(installed, listening, pid): what ``coi doctor`` says of the proxy."""
    return proxy_available(), _listening(listen), _pid(network_dir)


# ---- the process ----------------------------------------------------------------------------

class _Ready:
    """Says on the launcher's pipe that the proxy listens (mitmproxy's ``running`` comes
    after its servers are up; a failed bind ends it before)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def running(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, READY)
                os.close(self.fd)
            self.fd = None


def serve(network_dir: Path, listen: str, ready_fd: int | None = None) -> int:
    """Run the proxy on ``listen`` ("ip:port") until SIGTERM; say so on ``ready_fd``."""
    import asyncio

    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    host, _, port = listen.rpartition(":")

    async def main() -> None:
        # confdir at once: the master makes its CA there (else in ~/.mitmproxy) as it starts.
        opts = options.Options(confdir=str(network_dir / "proxy-ca"))
        master = DumpMaster(opts, with_termlog=False, with_dumper=False)
        # After the master: its addons define these options. lazy: no upstream connection
        # before a verdict chose one.
        opts.update(mode=[f"transparent@{host}:{port}", f"regular@{host}:{int(port) + EXPLICIT_OFFSET}"],
                    connection_strategy="lazy")
        # Upstream TLS (ended for a credential) is checked against what the host trusts (its
        # own CAs too, as curl on the host would), not mitmproxy's bundled list.
        trusted = os.environ.get(UPSTREAM_CA_ENV) or (SYSTEM_CAS if os.path.exists(SYSTEM_CAS) else None)
        if trusted:
            opts.update(ssl_verify_upstream_trusted_ca=trusted)
        master.addons.add(Egress(network_dir), _Ready(ready_fd))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, master.shutdown)
        await master.run()

    asyncio.run(main())
    return 0


def main(argv: list[str]) -> int:
    network_dir, listen = Path(argv[0]), argv[1]
    pid_file = network_dir / POLICY_DIR / PID_FILE  # written by ``launch``; removed here when it is ours
    try:
        return serve(network_dir, listen, int(argv[2]) if len(argv) > 2 else None)
    finally:
        try:
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
