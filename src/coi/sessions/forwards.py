"""Published ports and SSH agent forwarding: the Incus proxy devices of a session container.

A published port is a proxy device bound on the host: it listens on a host address
(127.0.0.1 unless the user's own config names another) and connects to the container's
own 127.0.0.1, so nothing in the container can point it anywhere else. The SSH agent is
a proxy device bound in the container: a socket of code's (mode 0600) whose connections
Incus hands to the user's agent socket on the host, with the user's ids
(``security.uid``/``security.gid``). No key ever enters the container.

Both are checked before a container exists: a host port must be free, one the user may
open (tried by binding it) and not published by another container; the agent's socket
must be the user's own and out of every container's reach.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from coi.config import PublishedPort
from coi.errors import CoiError, ConfigError, ConflictError, UsageError

if TYPE_CHECKING:
    from coi.incus import IncusClient
    from coi.sessions.spec import SessionRequest

# Where the agent's socket is in the container, and the variable that names it. Not in /run
# or /tmp: the container's init mounts a tmpfs there at boot, over a socket made before it.
AGENT_SOCKET = "/home/code/.ssh-agent-coi.sock"
AGENT_ENV = "SSH_AUTH_SOCK"
AGENT_DEVICE = "ssh-agent"
PORT_DEVICE = "port-"  # + the host port: one device per host port

PORT_USAGE = "[HOST_PORT:]CONTAINER_PORT"


# ---- published ports ----------------------------------------------------------------

def parse_port(spec: str) -> PublishedPort:
    """``--port [HOST_PORT:]CONTAINER_PORT`` on the host's 127.0.0.1; a bad one is a usage error."""
    match = re.fullmatch(r"(?:([0-9]+):)?([0-9]+)", spec)
    if not match:
        raise UsageError(f"--port {spec!r} is not {PORT_USAGE}", "for example --port 3000 or --port 8080:3000")
    container = int(match[2])
    host = int(match[1]) if match[1] is not None else container
    for port in (host, container):
        if not 1 <= port <= 65535:
            raise UsageError(f"--port {spec}: {port} is not a port (1 to 65535)",
                             "for example --port 3000 or --port 8080:3000")
    return PublishedPort(container=container, host=host)


def session_ports(configured: Iterable[PublishedPort], given: Iterable[str]) -> tuple[PublishedPort, ...]:
    """The ports of a session: ``[[ports]]`` of the config, then each ``--port``; a flag on
    a host port the config publishes replaces that entry. One host port, one publication."""
    ports: dict[int, PublishedPort] = {}
    for port in configured:
        if port.host in ports:
            raise ConfigError(f"[[ports]] publishes host port {port.host} twice",
                              "each host port can be published once; remove one of the entries")
        ports[port.host] = port
    flagged: set[int] = set()
    for spec in given:
        port = parse_port(spec)
        if port.host in flagged:
            raise UsageError(f"--port: host port {port.host} is given twice",
                             "each host port can be published once")
        flagged.add(port.host)
        ports[port.host] = port
    return tuple(ports.values())


def port_device_name(port: PublishedPort) -> str:
    return f"{PORT_DEVICE}{port.host}"


def port_device(port: PublishedPort) -> dict[str, str]:
    """The proxy device: listens on the host, connects to the container's own loopback."""
    return {"type": "proxy", "bind": "host", "listen": f"tcp:{port.host_endpoint}",
            "connect": f"tcp:127.0.0.1:{port.container}"}


def check_ports_free(ports: Iterable[PublishedPort], instances: Iterable[Mapping[str, Any]], *,
                     own: str | None = None) -> None:
    """Refuse, before anything is made, a host port that another container publishes (running
    or not: it would clash at that one's next start), or that this host does not let the user
    open now (taken, below 1024 without root, not an address of the host). ``own``: the
    container the ports are for, left out of the first check."""
    ports = list(ports)
    wanted = {port.host: port for port in ports}
    for inst in instances:
        if inst.get("name") == own:
            continue
        for number in _host_ports(inst):
            if number in wanted:
                name = inst.get("name")
                raise ConflictError(f"host port {number} is published by container {name} already",
                                    f"publish on another host port (--port OTHER:{wanted[number].container}), "
                                    f"or end that container (coi kill {name})")
    for port in ports:
        _try_binding(port)


def _host_ports(instance: Mapping[str, Any]) -> set[int]:
    """The host TCP ports an instance's proxy devices listen on (ranges and lists too)."""
    found: set[int] = set()
    devices = instance.get("expanded_devices") or instance.get("devices") or {}
    for spec in devices.values():
        if spec.get("type") != "proxy" or spec.get("bind", "host") != "host":
            continue
        kind, _, rest = str(spec.get("listen", "")).partition(":")
        if kind != "tcp":
            continue
        for part in rest.rpartition(":")[2].split(","):
            low, _, high = part.partition("-")
            if low.isdigit() and (not high or high.isdigit()):
                found.update(range(int(low), int(high or low) + 1))
    return found


def _try_binding(port: PublishedPort) -> None:
    """Bind the host port as the proxy will (SO_REUSEADDR: a port only in TIME_WAIT is free)
    and let it go again; what the kernel says becomes coi's error."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in port.address else socket.AF_INET
    where = port.host_endpoint
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((port.address, port.host))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConflictError(f"host port {where} is in use on this host",
                                    f"stop what listens there, or publish on another host port "
                                    f"(--port OTHER:{port.container})") from None
            if exc.errno == errno.EACCES:
                raise CoiError(f"host port {port.host} is below 1024, and only root may listen there on this host",
                               f"publish on a port of 1024 or more, for example --port 8080:{port.container}") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise CoiError(f"{port.address} is not an address of this host (host port {where})",
                               "set address in [[ports]] of your own config to one of the host's") from None
            raise CoiError(f"cannot listen on host port {where}: {exc.strerror or exc}") from None


def published(instance: Mapping[str, Any]) -> tuple[PublishedPort, ...]:
    """The ports coi published for a container (its ``port-*`` devices), by host port."""
    ports = []
    for name, spec in (instance.get("devices") or {}).items():
        if not name.startswith(PORT_DEVICE) or spec.get("type") != "proxy":
            continue
        listen = re.fullmatch(r"tcp:\[?([^\]]*)\]?:([0-9]+)", str(spec.get("listen", "")))
        connect = re.fullmatch(r"tcp:[^:]+:([0-9]+)", str(spec.get("connect", "")))
        if listen and connect:
            ports.append(PublishedPort(container=int(connect[1]), host=int(listen[2]), address=listen[1]))
    return tuple(sorted(ports, key=lambda p: p.host))


# ---- the SSH agent ----------------------------------------------------------------------

def agent_socket(env: Mapping[str, str], *, exposed: Iterable[Path]) -> str:
    """The real path of the user's SSH agent socket (``SSH_AUTH_SOCK`` of this coi), checked:
    a socket, the user's own, and outside every directory a container can write (the
    workspace, mounts, storage, branch copies), so that no path a project or an agent
    controls is ever handed to Incus. A link is followed once, here."""
    given = env.get(AGENT_ENV, "")
    hint = 'start an agent and add your key: eval "$(ssh-agent)" && ssh-add'
    if not given:
        raise CoiError("--ssh-agent forwards your SSH agent, and SSH_AUTH_SOCK is not set", hint)
    if not os.path.isabs(given):
        raise CoiError(f"SSH_AUTH_SOCK={given} is not an absolute path", hint)
    real = os.path.realpath(given)
    try:
        st = os.lstat(real)
    except OSError:
        raise CoiError(f"SSH_AUTH_SOCK={given}: no such socket (has the agent ended?)", hint) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise CoiError(f"SSH_AUTH_SOCK={given} is not a socket", hint)
    if st.st_uid != os.geteuid():
        raise CoiError(f"SSH_AUTH_SOCK={given} belongs to uid {st.st_uid}, not to you; "
                       "coi forwards only your own agent", hint)
    for where in exposed:
        root = os.path.realpath(where)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            raise CoiError(f"SSH_AUTH_SOCK={given} is inside {where}, which a container can write; "
                           "coi forwards only an agent socket out of every container's reach",
                           "use the socket your agent made (ssh-agent puts it in /tmp/ssh-*)")
    return real


def agent_device(socket_path: str, *, code_uid: int, host_uid: int, host_gid: int) -> dict[str, str]:
    """The proxy device: code's socket in the container (0600), the user's agent on the host,
    reached with the user's ids rather than root's."""
    return {"type": "proxy", "bind": "container", "listen": f"unix:{AGENT_SOCKET}",
            "connect": f"unix:{socket_path}", "uid": str(code_uid), "gid": str(code_uid), "mode": "0600",
            "security.uid": str(host_uid), "security.gid": str(host_gid)}


def agent_forwarded(instance: Mapping[str, Any]) -> bool:
    return ((instance.get("devices") or {}).get(AGENT_DEVICE) or {}).get("type") == "proxy"


# ---- a session's devices ------------------------------------------------------------------

def devices(req: SessionRequest) -> dict[str, dict[str, str]]:
    """The proxy devices a new session container is created with."""
    out = {port_device_name(port): port_device(port) for port in req.ports}
    if req.ssh_agent:
        out[AGENT_DEVICE] = agent_device(req.ssh_agent, code_uid=req.code_uid, host_uid=req.host_uid,
                                         host_gid=req.host_gid)
    return out


def onto_reused(client: IncusClient, instance: Mapping[str, Any], req: SessionRequest,
                instances: Iterable[Mapping[str, Any]]) -> tuple[tuple[PublishedPort, ...], bool]:
    """A persistent container used again: its ports stay, this session's new ones are added
    (checked as a new container's are), a host port it publishes elsewhere is refused; the
    agent follows this session (forwarded to this coi's socket, or taken away). Returns the
    container's ports and whether the agent is forwarded."""
    name = instance["name"]
    have = {port.host: port for port in published(instance)}
    for port in req.ports:
        old = have.get(port.host)
        if old is not None and old != port:
            raise ConflictError(f"{name} publishes host port {old.host_endpoint} to its port {old.container} already",
                                f"ask for --port {old.host}:{old.container}, use another host port, "
                                f"or start afresh (coi kill {name})")
    new = [port for port in req.ports if port.host not in have]
    # A stopped container binds its host ports again when it starts: they must still be free.
    again = [] if instance.get("status") == "Running" else list(have.values())
    check_ports_free([*again, *new], instances, own=name)
    for port in new:
        client.add_device(name, port_device_name(port), port_device(port))
    if req.ssh_agent:
        wanted = agent_device(req.ssh_agent, code_uid=req.code_uid, host_uid=req.host_uid, host_gid=req.host_gid)
        if (instance.get("devices") or {}).get(AGENT_DEVICE) != wanted:
            client.add_device(name, AGENT_DEVICE, wanted)
    elif agent_forwarded(instance):
        client.remove_device(name, AGENT_DEVICE)
    return tuple(sorted([*have.values(), *new], key=lambda p: p.host)), bool(req.ssh_agent)
