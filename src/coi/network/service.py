"""The network service: put a session's rules on, take them off, clean up after
containers that went, report the backend, and start and stop the watcher.

If the chosen mode cannot be enforced, ``apply`` raises (fail closed): the
session must not start. A detached watcher (``python -I -m coi.network.watcher``)
follows each filtered container; ``apply`` and ``remove`` stop it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from coi.errors import CoiError
from coi.messages import Log
from coi.network.attach import HOST_NAME_PREFIX, Attachment, find_attachment, is_pinned
from coi.network.backends import (DEFAULT_BACKENDS, AclBackend, Backend, BackendUnavailable, Backends,
                                  NftBackend, OpenBackend, nft_binary, nft_refusal)
from coi.network.dns import resolve_allowed, resolver_for
from coi.network.nft import nft_probe
from coi.network.policy import OPEN_HINT, NetworkPolicy, is_ipv4
from coi.network.store import Store
from coi.wait import wait_for

if TYPE_CHECKING:
    from coi.config import Credential
    from coi.config import Network
    from coi.incus import IncusClient


def apply(client: IncusClient, container: str, policy: NetworkPolicy, *, sessions_dir: Path, log: Log,
          backends: Backends = DEFAULT_BACKENDS, credentials: Sequence[Credential] = (),
          proxy_later: bool = False) -> str:
    """Enforce ``policy`` on a container before its agent starts; returns the backend used.

    Call it on every start (a restart gives the container a new host interface).
    Raises CoiError when the mode cannot be enforced: the session must not start.
    ``credentials`` (from the user's own config, never from a record) go to the proxy of
    the allowlist by name, and its CA into the container. ``proxy_later``: the caller
    waits for that proxy itself (``proxy_ready``), once the container has started.
    """
    store = Store(sessions_dir)
    _stop_watcher(store, container)
    if policy.mode == "open":
        return _apply_open(client, container, policy, store, log, backends)
    att = find_attachment(client, container)
    _drop_stale_address(store, att, client=client, log=log, privileged_command=policy.privileged_command,
                        backends=backends)
    if policy.proxy:  # allowlist by name: the proxy up and told first (fail closed)
        addresses = [e for e in policy.allowed if is_ipv4(e)]  # names go through the proxy only
        try:
            _start_proxy(store, att, policy, credentials)
            backend = _enforce_by_name(att, policy, addresses, backends)
            if not proxy_later:
                _proxy_ready(client, store, att, credentials)
        except BaseException:  # no policy left behind, and no proxy that only it needed
            from coi.network import proxy

            proxy.remove_policy(store.root, att.ipv4)
            proxy.stop_if_unused(store.root)
            raise
    else:
        addresses = _resolve(store, att, policy, log) if policy.mode == "allowlist" else []
        backend = _enforce(client, store, att, policy, addresses, log, backends)
    store.save_record(container, {
        "container": container, "backend": backend.name, "mode": policy.mode,
        "attachment": asdict(att), "policy": policy.to_json(), "addresses": addresses,
        "project": getattr(client, "project", "default"), "applied_at": int(time.time()),
        "sessions_dir": str(sessions_dir), "watcher": None,
    })
    try:
        pid = _start_watcher(store, container, sessions_dir=sessions_dir, client=client)
    except OSError as exc:  # the rules hold; only refresh and clean-up after a poweroff are missing
        log(f"Warning: the network watcher of {container} did not start ({exc.strerror or exc}); "
            "allowlist refresh is off and 'coi clean' removes its rules once it is gone")
        return backend.description
    record = store.record(container) or {}
    record["watcher"] = pid
    store.save_record(container, record)
    return backend.description


def _apply_open(client: IncusClient, container: str, policy: NetworkPolicy, store: Store, log: Log,
                backends: Backends) -> str:
    """Open mode: no rules (earlier ones removed), and a pinned interface let past the gate."""
    remove(container, sessions_dir=store.root.parent, client=client, privileged_command=policy.privileged_command,
           backends=backends)
    inst = client.instance(container)
    if is_pinned(inst):  # the gate holds only coi's pinned interfaces
        att = find_attachment(client, container)
        _open_gate(att, policy, log, backends)
        store.save_record(container, {"container": container, "backend": OpenBackend.name, "mode": "open",
                                      "attachment": asdict(att), "policy": policy.to_json(),
                                      "project": getattr(client, "project", "default"), "watcher": None})
    return OpenBackend.description


def _resolve(store: Store, att: Attachment, policy: NetworkPolicy, log: Log) -> list[str]:
    """The allowlist's addresses now; fails closed when no entry resolves."""
    cache = store.dns_cache()
    resolution = resolve_allowed(policy.allowed, server=resolver_for(policy, att), cache=cache)
    if not resolution.addresses:
        raise CoiError("network mode allowlist: none of the allowed names resolved ("
                       + "; ".join(resolution.failed.values()) + ")",
                       f"check [network] allowed_domains and DNS, or {OPEN_HINT}")
    store.save_dns_cache(cache)
    for entry, why in resolution.failed.items():
        log(f"Warning: allowed name {entry} did not resolve ({why}); it stays blocked until it does")
    for entry in resolution.stale:
        log(f"Warning: allowed name {entry} did not resolve now; using its last known addresses")
    return resolution.addresses


def _enforce(client: IncusClient, store: Store, att: Attachment, policy: NetworkPolicy, addresses: list[str],
             log: Log, backends: Backends) -> Backend:
    """Incus ACLs when this host allows them, else host nftables; fail closed when neither works."""
    reasons = []
    known = store.capability(AclBackend.name)
    if known is None or known.get("usable"):
        acl = backends.acl(client)
        try:
            acl.apply(att, policy, addresses)
            if known is None:
                store.save_capability(AclBackend.name, True)
            _open_gate(att, policy, log, backends)
            return acl
        except BackendUnavailable as exc:
            store.save_capability(AclBackend.name, False, str(exc))
            log(f"Network: {exc}; falling back to host nftables")
            reasons.append(str(exc))
    else:
        reasons.append(known.get("reason") or "Incus network ACLs are unavailable here")
    try:
        nft = backends.nft(policy.privileged_command)
        nft.apply(att, policy, addresses)
        return nft
    except BackendUnavailable as exc:
        reasons.append(str(exc))
    raise CoiError(f"cannot enforce network mode {policy.mode} on {att.container}: " + "; ".join(reasons),
                   f"set [network] privileged_command (e.g. [\"sudo\", \"-n\"]) or run as root, or {OPEN_HINT}")


def _start_proxy(store: Store, att: Attachment, policy: NetworkPolicy, credentials: Sequence[Credential]) -> None:
    """The container's policy for the proxy (with the credentials' secrets), and the user's
    proxy started (not waited for: ``_proxy_ready``)."""
    from coi.network import connlog, proxy
    from coi.network.credentials import for_proxy
    from coi.network.policy import PRIVATE_RANGES

    refused = [att.subnet, *([] if policy.allow_local else PRIVATE_RANGES)]
    connlog.begin(store.root, att.container)
    proxy.write_policy(store.root, ipv4=att.ipv4, container=att.container, allowed=list(policy.allowed),
                       refused=refused, resolver=policy.resolver, credentials=for_proxy(credentials))
    proxy.launch(store.root, _proxy_listen(att.gateway))


def _proxy_listen(gateway: str) -> str:
    from coi.network.egress import proxy_port

    return f"{gateway}:{proxy_port(os.getuid())}"


def _proxy_ready(client: IncusClient, store: Store, att: Attachment, credentials: Sequence[Credential]) -> None:
    from coi.network import proxy

    proxy.ensure_running(store.root, _proxy_listen(att.gateway))
    if credentials:
        _install_proxy_ca(client, att.container, proxy.ca_certificate(store.root))


def proxy_ready(client: IncusClient, container: str, *, sessions_dir: Path,
                credentials: Sequence[Credential] = ()) -> None:
    """Wait for the proxy of a session by name that ``apply(proxy_later=True)`` started, and
    put its CA in the container when it injects credentials. A session start calls it
    once the container runs, so that the proxy's start-up overlaps the container's; until
    then the container's TCP 80 and 443 are refused (the redirect leads nowhere yet).
    Raises CoiError when the proxy cannot start (the caller removes the rules with the
    container)."""
    store = Store(sessions_dir)
    record = store.record(container) or {}
    if not (record.get("policy") or {}).get("proxy"):
        return
    _proxy_ready(client, store, Attachment(**record["attachment"]), credentials)


def _bridge_gateway(client: IncusClient) -> str | None:
    """The coi bridge's own address (where the user's proxy listens), None without it."""
    import ipaddress

    from coi.host import COI_NETWORK

    try:
        return str(ipaddress.ip_interface(client.network(COI_NETWORK)["config"]["ipv4.address"]).ip)
    except (CoiError, KeyError, ValueError):
        return None


def proxy_environment(client: IncusClient) -> dict[str, str]:
    """HTTP(S)_PROXY for the agent of a session by name: the user's proxy on the coi bridge."""
    from coi.network.egress import proxy_variables

    gateway = _bridge_gateway(client)
    # no coi bridge: the redirect still filters; the variables are a convenience
    return proxy_variables(gateway, os.getuid()) if gateway else {}


def launch_proxy(client: IncusClient, sessions_dir: Path) -> None:
    """Start the user's proxy for a session by name about to be made, without waiting:
    its start-up overlaps the container's, and ``proxy_ready`` waits for it. Raises
    CoiError when it is not installed (before anything exists)."""
    from coi.network import proxy

    gateway = _bridge_gateway(client)
    if gateway:
        proxy.launch(Store(sessions_dir).root, _proxy_listen(gateway))


def revive_proxy(sessions_dir: Path, running: Iterable[str]) -> bool:
    """Start the user's proxy again when a running container by name needs it and it died
    (its egress has failed closed since); whether it was started."""
    from coi.network import proxy

    network_dir = Path(sessions_dir) / "network"
    return network_dir.is_dir() and proxy.revive(network_dir, set(running))


def proxy_unneeded(sessions_dir: Path) -> None:
    """End the user's proxy when no container needs it (a session start that failed)."""
    from coi.network import proxy

    proxy.stop_if_unused(Store(sessions_dir).root)


def _install_proxy_ca(client: IncusClient, container: str, ca: bytes) -> None:
    """The proxy's CA trusted in the container: its own file, and in the system bundle
    (what ``update-ca-certificates`` would write), so TLS the proxy ends verifies."""
    from coi.network.credentials import CA_PATH, SYSTEM_BUNDLE

    client.push_file(container, CA_PATH, ca, mode=0o644)
    try:
        bundle, _ = client.pull_file(container, SYSTEM_BUNDLE, max_bytes=16 << 20)
    except CoiError:
        bundle = b""
    if ca.strip() not in bundle:
        client.push_file(container, SYSTEM_BUNDLE, bundle.rstrip(b"\n") + b"\n" + ca, mode=0o644)


def _enforce_by_name(att: Attachment, policy: NetworkPolicy, addresses: list[str],
                     backends: Backends) -> Backend:
    """Host nftables only: the redirect to the proxy is an nft rule (Incus ACLs have none)."""
    try:
        nft = backends.nft(policy.privileged_command)
        nft.apply(att, policy, addresses)
        return nft
    except BackendUnavailable as exc:
        raise CoiError(f"cannot enforce the allowlist by name on {att.container}: {exc}",
                       f"set [network] privileged_command (e.g. [\"sudo\", \"-n\"]) or run as root, or {OPEN_HINT}")


def _open_gate(att: Attachment, policy: NetworkPolicy, log: Log, backends: Backends) -> None:
    """Let a container past the bridge gate whose traffic coi's nft rules do not filter
    (open mode, Incus ACLs); they open it themselves otherwise."""
    if not att.veth.startswith(HOST_NAME_PREFIX):
        return  # not one of coi's pinned interfaces: the gate does not hold it
    try:
        backends.nft(policy.privileged_command).open(att.veth)
    except BackendUnavailable as exc:
        log(f"Warning: could not open the coi bridge gate for {att.container} ({exc}); "
            "where 'coi setup' loaded the gate, the container has no network")


def _close_gate(record: Mapping[str, Any], privileged_command: Sequence[str], backends: Backends) -> None:
    veth = (record.get("attachment") or {}).get("veth")
    if veth:
        try:
            backends.nft(privileged_command).close(veth)
        except BackendUnavailable:
            pass  # the gate is not loaded here, or coi may not change it: nothing is open either


def _drop_stale_address(store: Store, att: Attachment, *, client: IncusClient, log: Log,
                        privileged_command: Sequence[str], backends: Backends) -> None:
    """Rules left for another container that had this address are stale now: remove them."""
    for name, record in store.records().items():
        if name != att.container and (record.get("attachment") or {}).get("ipv4") == att.ipv4:
            log(f"Network: removing stale rules of {name} (its address {att.ipv4} now belongs to {att.container})")
            remove(name, sessions_dir=Path(store.root).parent, client=client, privileged_command=privileged_command,
                   backends=backends)


def remove(container: str, *, sessions_dir: Path, client: IncusClient | None, privileged_command: Sequence[str] = (),
           backends: Backends = DEFAULT_BACKENDS) -> None:
    """Remove a container's rules and its watcher; call when coi stops or deletes it.

    Harmless when there is nothing to remove. ``privileged_command`` comes from the
    caller's trusted config (never from the record).
    """
    store = Store(sessions_dir)
    record = store.record(container) or {}
    _stop_watcher(store, container)
    kind = record.get("backend")
    try:
        backend = backends.named(kind, client=client, privileged_command=privileged_command)
        backend.remove(container)
    except BackendUnavailable:
        if kind == NftBackend.name:
            raise CoiError(f"could not remove the network rules of {container}",
                           "run 'coi clean' as a user who may run nft") from None
    else:
        if not backend.opens_gate:
            _close_gate(record, privileged_command, backends)
    if (record.get("policy") or {}).get("proxy"):
        from coi.network import proxy

        proxy.remove_policy(store.root, (record.get("attachment") or {}).get("ipv4", ""))
        proxy.stop_if_unused(store.root)
    store.drop_record(container)


def clean_orphans(existing: set[str], *, sessions_dir: Path, client: IncusClient | None = None,
                  privileged_command: Iterable[str] = (), backends: Backends = DEFAULT_BACKENDS) -> list[str]:
    """Remove rules whose container no longer exists; returns the containers cleaned.

    ``existing``: names of every instance that still exists (any status, every
    project), so no live container ever loses its rules. Rules of other users'
    vanished containers in the shared ``coi`` tables are removed too.
    """
    store = Store(sessions_dir)
    privileged = tuple(privileged_command)
    gone: set[str] = set()
    for name in store.records():
        if name not in existing:
            gone.add(name)
            remove(name, sessions_dir=sessions_dir, client=client, privileged_command=privileged, backends=backends)
    for backend in backends.present(client, privileged):
        try:
            for name in sorted(backend.containers() - existing):
                backend.remove(name)
                gone.add(name)
        except (BackendUnavailable, CoiError):
            pass  # this backend cannot be read or changed here
    return sorted(gone)


def orphans(existing: set[str], *, sessions_dir: Path, client: IncusClient | None = None,
            privileged_command: Iterable[str] = (), backends: Backends = DEFAULT_BACKENDS) -> list[str]:
    """The containers ``clean_orphans`` would clean: rules (or records) whose container no
    longer exists. Nothing is changed (``coi doctor``)."""
    found = {name for name in Store(sessions_dir).records() if name not in existing}
    for backend in backends.present(client, tuple(privileged_command)):
        try:
            found |= backend.containers() - existing
        except (BackendUnavailable, CoiError):
            pass  # this backend cannot be read here
    return sorted(found)


def applies_before_start(inst: Mapping[str, Any], policy: NetworkPolicy, sessions_dir: Path) -> bool:
    """Whether ``apply`` can run before the container starts: its NIC is pinned and the
    backend is known. (Incus accepts ACLs on a stopped container even on kernels where
    the start then fails with them, so the first probe needs a running one.)"""
    if policy.mode == "open":
        return True
    return is_pinned(inst) and Store(sessions_dir).capability(AclBackend.name) is not None


# ---- what coi doctor shows ----------------------------------------------------------------------

@dataclass(frozen=True)
class BackendReport:
    """What ``coi doctor`` shows about network isolation."""

    status: str  # "ok", "warn" or "fail"
    backend: str
    detail: str
    hint: str | None = None


def backend_report(config_network: Network | None = None, *, sessions_dir: Path | None = None,
                   backends: Backends = DEFAULT_BACKENDS) -> BackendReport:
    """Which backend sessions will use here, and why (nothing is changed)."""
    privileged = tuple(getattr(config_network, "privileged_command", ()) or ())
    acl = Store(sessions_dir).capability(AclBackend.name) if sessions_dir else None
    if acl and acl.get("usable"):
        return BackendReport("ok", "Incus network ACLs", "Incus network ACLs on the container's NIC")
    acl_note = (f"Incus network ACLs unavailable ({acl.get('reason')})" if acl
                else "Incus network ACLs are tried at the first session")
    try:
        nft = backends.nft(privileged)
    except BackendUnavailable as exc:
        if acl is None:
            return BackendReport("warn", "unknown", f"{acl_note}; host nftables unavailable: {exc}",
                                 "set [network] privileged_command or run coi as root")
        return BackendReport("fail", "none", f"{acl_note}; host nftables unavailable: {exc}",
                             "set [network] privileged_command (e.g. [\"sudo\", \"-n\"]) or run as root; "
                             "until then only --network=open sessions start")
    try:
        listing = nft.listing()  # read-only; through the helper it proves the sudoers rule works
    except BackendUnavailable as exc:
        return BackendReport("fail", "host nftables", f"{acl_note}; coi's nft helper{nft.via} failed: {exc}",
                             "run 'sudo coi setup --user $USER' (it installs the helper and its sudoers rule)")
    if acl is None and os.geteuid() == 0 and \
            nft_refusal(nft_probe("bridge", "ct state established accept"), [nft_binary()]) is not None:
        # Incus emits bridge-family conntrack rules for ACLs: without them here, ACLs cannot work.
        acl_note = "Incus network ACLs unavailable (no bridge-family conntrack in this kernel)"
    if not listing.get("gate"):
        return BackendReport("warn", "host nftables",
                             f"{acl_note}; {nft.description}; the bridge gate is not loaded, so a container "
                             "started outside coi (or after a reboot) runs unfiltered",
                             "run 'sudo coi setup' (it loads the gate, before Incus starts on systemd hosts)")
    return BackendReport("ok", "host nftables", f"{acl_note}; {nft.description}; bridge gate loaded")


# ---- the watcher process -------------------------------------------------------------------------

WATCHER_MODULE = "coi.network.watcher"
# What the watcher inherits from coi's environment: enough to find the daemon and the
# user's own config, nothing that could steer Python (PYTHONPATH and the like).
WATCHER_ENV = ("HOME", "USER", "LOGNAME", "LANG", "XDG_CONFIG_HOME", "INCUS_SOCKET", "INCUS_DIR")


def watcher_argv(container: str, sessions_dir: Path) -> list[str]:
    """Isolated Python (``-I``: no current directory, user site or PYTHON* variables on
    the path), so nothing from a workspace can be imported by it."""
    return [sys.executable, "-I", "-m", WATCHER_MODULE, container, str(Path(sessions_dir))]


def _start_watcher(store: Store, container: str, *, sessions_dir: Path, client: IncusClient) -> int:
    """Start the watcher detached (``coi.detached``); returns its pid."""
    from coi import detached

    return detached.start(watcher_argv(container, sessions_dir), log=store.log_path(container), keep_env=WATCHER_ENV,
                          client=client)


def _is_watcher(pid: int, container: str) -> bool:
    from coi import detached

    argv = detached.argv_of(pid)
    # "coi.netwatch": a watcher that an older coi started before the module moved
    return (WATCHER_MODULE.encode() in argv or b"coi.netwatch" in argv) and container.encode() in argv


def _stop_watcher(store: Store, container: str) -> None:
    record = store.record(container) or {}
    pid = record.get("watcher")
    if not isinstance(pid, int) or pid == os.getpid() or not _is_watcher(pid, container):
        return
    # SIGKILL to its process group (it leads one): immediate, and takes its
    # 'nft monitor' child along. Whatever nft change it had under way is atomic.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except PermissionError:
        return  # another user's watcher: it exits by itself when its record goes
    from coi import detached

    wait_for(lambda: not detached.alive(pid), timeout=5, what=f"the network watcher of {container} to stop",
             first_interval=0.001, max_interval=0.05)
