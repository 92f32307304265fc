"""The two ways coi enforces a policy, behind one ``Backend`` protocol.

* **Incus network ACLs** (``AclBackend``) on the container's NIC, applied by
  the daemon (no root). Incus refuses them on kernels without bridge-family
  conntrack; the service notices that once, remembers it per kernel under
  ``<sessions_dir>/network/`` (``Store.capability``) and falls back.
* **Host nftables** (``NftBackend``): as root in coi's own process, else coi's
  root helper (``coi.network.helper``, installed by ``coi setup``) through
  ``[network] privileged_command`` (for example ``["sudo", "-n"]``), taking JSON
  requests, never scripts. It also holds the bridge gate, whichever backend
  filters.

``Backends`` makes them: the service and the watcher get every backend from
it, so tests hand them fakes instead of patching this module.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from coi.errors import CoiError, NotFoundError, OperationFailedError
from coi.network.acl import ACL_DESCRIPTION, acl_name, acl_spec, refusal_reason
from coi.network.attach import NAME, Attachment
from coi.network.policy import NetworkPolicy, is_ipv4

if TYPE_CHECKING:
    from coi.incus import IncusClient

# Installed by 'coi setup' (root:root 0755): the one command a coi user may run through
# sudo. It takes one JSON request on stdin and touches only coi's tables (coi.network.helper).
HELPER = "/usr/local/libexec/coi/coi-nft"


class BackendUnavailable(Exception):
    """A backend cannot enforce rules on this host (the reason is the message)."""


@runtime_checkable
class Backend(Protocol):
    """What the service and the watcher need of a backend (they never ask which one it is)."""

    @property
    def name(self) -> str:
        """What the container's record calls it."""

    @property
    def description(self) -> str:
        """What a session start says."""

    @property
    def opens_gate(self) -> bool:
        """Whether its own rules open and shut the bridge gate (else the service does)."""

    def apply(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        """Put the container's rules on, replacing earlier ones; BackendUnavailable if it cannot."""

    def rekey(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        """Follow a restart that gave the container a new host interface or address."""

    def update_allowed(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        """Swap the allowlist's addresses (the watcher's refresh)."""

    def remove(self, container: str) -> None:
        """Take the container's rules off; fine when there are none."""

    def containers(self) -> set[str]:
        """The containers that have rules in this backend (for ``clean_orphans``)."""


# ---- host nftables ----------------------------------------------------------------------------

def nft_binary() -> str:
    found = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if not found:
        raise BackendUnavailable("nft is not installed (run 'sudo coi setup')")
    return found


def nft_refusal(ruleset: str, argv: Sequence[str] = ("nft",)) -> str | None:
    """None when the kernel accepts ``ruleset`` (``nft -c``: checked, never applied), else why not."""
    proc = subprocess.run([*argv, "-c", "-f", "-"], input=ruleset, text=True, capture_output=True)
    return None if proc.returncode == 0 else _first_lines(proc.stderr, 1)


def _first_lines(text: str, n: int = 4) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[:n]) or "no output"


def apply_request(att: Attachment, policy: NetworkPolicy, addresses: Iterable[str] = ()) -> dict[str, Any]:
    """The helper request that puts one container's rules on (the helper generates them)."""
    return {"action": "apply", "container": att.container, "ipv4": att.ipv4, "veth": att.veth,
            "gateway": att.gateway, "subnet": att.subnet, "mode": policy.mode,
            "blocked": list(policy.blocked), "allowed": list(addresses), "log": bool(policy.log_blocked),
            **({"proxy": True} if policy.proxy else {})}


class NftBackend:
    """Host nftables: in-process as root, else the helper through the privileged command
    (``[*privileged_command, HELPER]``, e.g. ``sudo -n /usr/local/libexec/coi/coi-nft``)."""

    name = "nftables"
    opens_gate = True  # a container's rules open its interface in the same transaction

    def __init__(self, privileged_command: Iterable[str] = (), *, helper: str = HELPER) -> None:
        prefix = tuple(privileged_command)
        if os.geteuid() == 0:
            nft_binary()
            self.argv: list[str] = []  # root: the helper's code runs in this process
        elif prefix:
            if not os.path.exists(helper):
                raise BackendUnavailable(f"coi's nft helper {helper} is not installed "
                                         "(run 'sudo coi setup --user $USER')")
            self.argv = [*prefix, helper]
        else:
            raise BackendUnavailable(
                "host nftables need root, and [network] privileged_command is not set "
                f"(for example privileged_command = [\"sudo\", \"-n\"] with the sudoers rule for {helper} "
                "that 'sudo coi setup --user NAME' writes)")
        self.via = "" if os.geteuid() == 0 else " via " + " ".join(prefix)

    @property
    def description(self) -> str:
        return f"host nftables (inet + bridge){self.via}"

    def request(self, request: Mapping[str, Any], what: str) -> str:
        """Run one helper request; its output (``list``) or BackendUnavailable."""
        if not self.argv:
            from coi.network import helper

            try:
                return helper.execute(request)
            except helper.HelperError as exc:
                raise BackendUnavailable(f"{what}: {exc.message}") from None
        try:
            proc = subprocess.run(self.argv, input=json.dumps(request), text=True, capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(f"{what}: {' '.join(self.argv)} failed ({exc})") from None
        if proc.returncode != 0:
            raise BackendUnavailable(f"{what}: {_first_lines(proc.stderr, 2)}")
        return proc.stdout

    def listing(self) -> dict[str, Any]:
        """``{"containers": [...], "gate": bool}``: who has chains in coi's tables, and the gate."""
        try:
            data = json.loads(self.request({"action": "list"}, "listing coi's nft rules") or "{}")
        except ValueError:
            raise BackendUnavailable("listing coi's nft rules: the helper's answer is not JSON") from None
        return data if isinstance(data, dict) else {}

    def containers(self) -> set[str]:
        return {n for n in self.listing().get("containers", []) if isinstance(n, str) and NAME.fullmatch(n)}

    def monitor_argv(self) -> list[str]:
        """``nft monitor trace`` as root; else the helper, which passes on coi's trace lines only."""
        return [nft_binary(), "monitor", "trace"] if not self.argv else list(self.argv)

    def monitor_input(self) -> str:
        """What to write to the monitor's stdin (then close it)."""
        return "" if not self.argv else json.dumps({"action": "monitor"})

    def apply(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        self.request(apply_request(att, policy, addresses), f"rules for {att.container}")

    def rekey(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        self.apply(att, policy, addresses)  # the rules are keyed on the interface and address

    def update_allowed(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        self.request({"action": "allow", "container": att.container, "addresses": list(addresses)},
                     f"allowlist of {att.container}")

    def remove(self, container: str) -> None:
        self.request({"action": "remove", "container": container}, f"removing the rules of {container}")

    def ensure_gate(self) -> None:
        self.request({"action": "gate"}, "loading the bridge gate")

    def open(self, veth: str) -> None:
        """Let ``veth`` past the gate (for containers filtered by Incus ACLs)."""
        self.request({"action": "open", "veth": veth}, f"opening the gate for {veth}")

    def close(self, veth: str) -> None:
        self.request({"action": "close", "veth": veth}, f"closing the gate for {veth}")


# ---- Incus network ACLs ----------------------------------------------------------------------

def host_ipv4_addresses() -> list[str]:
    """The host's own IPv4 addresses (every interface, loopback aside): restricted mode
    refuses them on the ACL backend (the nft backend refuses all of them in its input hook)."""
    proc = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True)
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        links = []
    found = {info.get("local", "") for link in links for info in link.get("addr_info") or []}
    return sorted(a for a in found if is_ipv4(a) and not ipaddress.IPv4Address(a).is_loopback)


class AclBackend:
    """Incus network ACLs on the container's NIC, applied by the daemon."""

    name = "incus-acl"
    description = "Incus network ACLs"
    opens_gate = False  # the daemon filters; the gate is host nftables

    def __init__(self, client: IncusClient) -> None:
        self.client = client

    def apply(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        egress, ingress, nic_settings = acl_spec(att, policy, addresses, host_addresses=host_ipv4_addresses())
        name = acl_name(att.container)
        description = ACL_DESCRIPTION + att.container
        try:
            self.client.put_network_acl(name, egress=egress, ingress=ingress, description=description)
        except NotFoundError:
            self.client.create_network_acl(name, egress=egress, ingress=ingress, description=description)
        inst = self.client.instance(att.container)
        nic = dict((inst.get("expanded_devices") or {}).get(att.nic) or {})
        nic.update(nic_settings)
        try:
            self.client.update_instance(att.container, devices={att.nic: nic})
        except OperationFailedError as exc:
            self._delete_acl(name)
            raise BackendUnavailable(refusal_reason(exc.message)) from None

    def rekey(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        """Nothing to do: the ACL belongs to the NIC, which keeps it across restarts."""

    def update_allowed(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        egress, ingress, _ = acl_spec(att, policy, addresses, host_addresses=host_ipv4_addresses())
        self.client.put_network_acl(acl_name(att.container), egress=egress, ingress=ingress,
                                    description=ACL_DESCRIPTION + att.container)

    def remove(self, container: str) -> None:
        """Take the ACL off the NIC and delete it; the NIC itself (its pinned address and
        interface name) and its anti-spoofing stay."""
        name = acl_name(container)
        try:
            inst = self.client.instance(container)
        except NotFoundError:
            inst = None
        if inst is not None:
            for dev, spec in (inst.get("devices") or {}).items():
                if spec.get("type") == "nic" and spec.get("security.acls") == name:
                    kept = {k: v for k, v in spec.items() if not k.startswith("security.acls")}
                    try:
                        self.client.update_instance(container, devices={dev: kept})
                    except NotFoundError:
                        pass
        self._delete_acl(name)

    def _delete_acl(self, name: str) -> None:
        try:
            self.client.delete_network_acl(name)
        except NotFoundError:
            pass

    def containers(self) -> set[str]:
        return {a["name"] for a in self.client.network_acls()
                if str(a.get("description", "")).startswith(ACL_DESCRIPTION)}


# ---- no filtering ------------------------------------------------------------------------------

class OpenBackend:
    """Open mode: no rules; the service lets a pinned interface past the gate."""

    name = "open"
    description = "open (no filtering)"
    opens_gate = False

    def apply(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        pass

    def rekey(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        pass

    def update_allowed(self, att: Attachment, policy: NetworkPolicy, addresses: list[str]) -> None:
        pass

    def remove(self, container: str) -> None:
        pass

    def containers(self) -> set[str]:
        return set()


@dataclass(frozen=True)
class Backends:
    """Where the service and the watcher get their backends: the real ones by default."""

    nft: Callable[[Sequence[str]], NftBackend] = NftBackend
    acl: Callable[[IncusClient], AclBackend] = AclBackend

    def named(self, name: str | None, *, client: IncusClient | None,
              privileged_command: Sequence[str] = ()) -> Backend:
        """The backend a container's record names; host nftables for anything else (no
        record: coi's nft tables may still hold rules of the container)."""
        if name == AclBackend.name:
            if client is None:
                raise CoiError("removing Incus network ACLs needs the Incus client")
            return self.acl(client)
        if name == OpenBackend.name:
            return OpenBackend()
        return self.nft(tuple(privileged_command))

    def present(self, client: IncusClient | None, privileged_command: Sequence[str] = ()) -> list[Backend]:
        """The backends that may hold rules here (``clean_orphans`` looks in each)."""
        found: list[Backend] = []
        try:
            found.append(self.nft(tuple(privileged_command)))
        except BackendUnavailable:
            pass
        if client is not None:
            found.append(self.acl(client))
        return found


DEFAULT_BACKENDS = Backends()
