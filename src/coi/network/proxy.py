"""coi's egress proxy for the allowlist by name: ``python -I -m coi.network.proxy STATE_DIR LISTEN``.

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
refused TLS connection is closed. Every connection is one JSON line in
``<state>/network/connections/<container>.jsonl``.

The per-container policy files (``<state>/network/proxy/<ipv4>.json``) are written by
``coi.network.service`` when it applies the rules, and removed with them; a connection
from an address without one is refused.

mitmproxy is imported here only (``coi list`` and ``coi --version`` never load it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from coi.network.connlog import log_path
from coi.network.egress import EXPLICIT_OFFSET, NameRules, refusal_text, upstream_problem

POLICY_DIR = "proxy"  # under <state>/network
PID_FILE = "proxy.pid"  # under <state>/network/proxy
UPSTREAM_CA_ENV = "COI_PROXY_UPSTREAM_CA"  # a CA file the proxy trusts for upstream TLS too (tests)


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


# ---- the mitmproxy addon ---------------------------------------------------------------------

class Egress:
    """The allowlist by name, as mitmproxy hooks."""

    def __init__(self, network_dir: Path) -> None:
        self.policies = Policies(network_dir)
        self.network_dir = network_dir
        self.verdicts: dict[str, dict[str, Any]] = {}  # client connection id -> what was decided
        self.sni: dict[str, str] = {}  # client connection id -> the TLS name the proxy ended TLS for

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
        if verdict is not None and not verdict.get("logged"):
            self._log(verdict)

    def _log(self, verdict: dict[str, Any]) -> None:
        verdict["logged"] = True
        container = verdict.get("container") or "unknown"
        entry = {k: v for k, v in verdict.items() if k != "logged"}
        path = log_path(self.network_dir, container)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        except OSError:
            pass


# ---- starting and stopping it (in coi's own process; no mitmproxy here) -----------------------

START_TIMEOUT = 20.0  # seconds for a new proxy to listen (mitmproxy's import is most of it)


def _pid(network_dir: Path) -> int | None:
    try:
        pid = int((network_dir / POLICY_DIR / PID_FILE).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _listening(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_running(network_dir: Path, listen: str) -> int:
    """The user's proxy, listening on ``listen``: the running one, or a new detached one
    (waited for). Raises CoiError when it cannot start (the session must not start)."""
    from coi.errors import CoiError
    from coi.wait import wait_for

    pid = _pid(network_dir)
    if pid is not None and _listening(listen):
        return pid
    if not proxy_available():
        raise CoiError("the allowlist by name needs coi's proxy (mitmproxy), which is not installed",
                       "install it: sudo ./scripts/install.sh, or set [network] allowlist_by = \"address\"")
    (network_dir / POLICY_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
    log = open(network_dir / "proxy.log", "ab")
    import subprocess

    with log:
        proc = subprocess.Popen([sys.executable, "-I", "-m", "coi.network.proxy", str(network_dir), listen],
                                cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or _listening(listen), timeout=START_TIMEOUT,
                 what=f"coi's proxy to listen on {listen}")
    except CoiError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise CoiError(f"coi's proxy did not start (exit code {proc.returncode})",
                       f"see {network_dir / 'proxy.log'}")
    return proc.pid


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

    try:
        wait_for(lambda: _pid(network_dir) is None or _zombie(pid), timeout=10, what="coi's proxy to end")
    except TimedOutError:
        os.kill(pid, signal.SIGKILL)
    return True


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def status(network_dir: Path, listen: str) -> tuple[bool, bool, int | None]:
    """(installed, listening, pid): what ``coi doctor`` says of the proxy."""
    return proxy_available(), _listening(listen), _pid(network_dir)


# ---- the process ----------------------------------------------------------------------------

def serve(network_dir: Path, listen: str) -> int:
    """Run the proxy on ``listen`` ("ip:port") until SIGTERM."""
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
        if os.environ.get(UPSTREAM_CA_ENV):  # the tests' servers have a CA of their own
            opts.update(ssl_verify_upstream_trusted_ca=os.environ[UPSTREAM_CA_ENV])
        master.addons.add(Egress(network_dir))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, master.shutdown)
        await master.run()

    asyncio.run(main())
    return 0


def main(argv: list[str]) -> int:
    network_dir, listen = Path(argv[0]), argv[1]
    pid_file = network_dir / POLICY_DIR / PID_FILE
    pid_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        return serve(network_dir, listen)
    finally:
        try:
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
