"""The network watcher: one detached process per filtered container.

Started by ``coi.network.apply`` (``python -I -m coi.network.watcher CONTAINER
SESSIONS_DIR``) in its own session, so it outlives ``coi shell --background``. It

* re-resolves the allowlist every refresh interval and replaces the nft set
  (or the Incus ACL) when the addresses changed; a failed lookup keeps the last
  good addresses;
* re-applies the rules when the container came back from a restart with a new
  host interface or address;
* writes blocked connection attempts to the network log when logging is on;
* removes the rules and exits when the container is deleted, or stays stopped
  longer than a reboot takes (a poweroff from inside while coi is not attached);
  rules put on before the start wait longer for the container to come up.

It exits quietly on SIGTERM; ``apply`` and ``remove`` stop it with SIGKILL to its
process group. It reaches the backends only through the ``Backend`` protocol, and
the package ``__init__`` never imports this module (``-m`` runs it as ``__main__``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coi.errors import CoiError, NotFoundError
from coi.network.attach import Attachment, find_attachment
from coi.network.backends import DEFAULT_BACKENDS, Backend, BackendUnavailable, Backends
from coi.network.dns import resolve_allowed, resolver_for
from coi.network.nft import parse_trace
from coi.network.policy import NetworkPolicy
from coi.network.service import remove
from coi.network.store import Store, log_file

if TYPE_CHECKING:
    from coi.incus import IncusClient

POLL_SECONDS = 0.5  # how often the container is read (one REST call answered from Incus's database)
STOPPED_GRACE = 5.0  # a reboot from inside shows "Stopped" for about half a second
START_GRACE = 60.0  # rules go on before the start: give a start that fails time to be cleaned up by coi


def _say(message: str) -> None:
    print(time.strftime("%Y-%m-%dT%H:%M:%S"), message, flush=True)


class Watcher:
    """Follows one container until its rules are gone (``run``)."""

    def __init__(self, container: str, sessions_dir: Path, client: IncusClient,
                 privileged_command: tuple[str, ...] = (), *, backends: Backends = DEFAULT_BACKENDS) -> None:
        self.container = container
        self.privileged_command = privileged_command  # from the user's trusted config, not the record
        self.sessions_dir = sessions_dir
        self.store = Store(sessions_dir)
        self.client = client
        self.backends = backends
        self.stop = threading.Event()
        self.monitor: subprocess.Popen[str] | None = None

    def record(self) -> dict[str, Any] | None:
        return self.store.record(self.container)

    def run(self) -> int:
        record = self.record()
        if not record:
            return 0
        policy = NetworkPolicy.from_json(record["policy"], privileged_command=self.privileged_command)
        if policy.log_blocked:
            self._start_monitor(policy)
        next_refresh = time.monotonic() + policy.refresh_seconds
        stopped_since: float | None = None
        seen_running = False
        try:
            while not self.stop.is_set():
                record = self.record()
                if not record:
                    return 0  # removed by coi meanwhile
                try:
                    # The instance, not its state: reading the state enters the container
                    # (Incus forks a helper into its namespaces) on every poll.
                    state = self.client.instance(self.container)
                except NotFoundError:
                    _say(f"{self.container} is gone: removing its rules")
                    self._remove()
                    return 0
                except CoiError as exc:
                    _say(f"reading the state of {self.container} failed: {exc.message}")
                    state = None
                if state is not None:
                    if state.get("status") in ("Stopped", "Error"):
                        stopped_since = stopped_since or time.monotonic()
                        if time.monotonic() - stopped_since >= (STOPPED_GRACE if seen_running else START_GRACE):
                            _say(f"{self.container} stopped: removing its rules")
                            self._remove()
                            return 0
                    elif state.get("status") == "Running":
                        stopped_since, seen_running = None, True
                        self._follow_restart(record, policy, state)
                        if policy.mode == "allowlist" and not policy.proxy and time.monotonic() >= next_refresh:
                            self._refresh(policy)
                            next_refresh = time.monotonic() + policy.refresh_seconds
                wait = POLL_SECONDS
                if policy.mode == "allowlist" and not policy.proxy:  # by name: the proxy resolves
                    wait = max(0.05, min(wait, next_refresh - time.monotonic()))
                self.stop.wait(wait)
            return 0
        finally:
            if self.monitor is not None:
                self.monitor.terminate()

    def _remove(self) -> None:
        try:
            remove(self.container, sessions_dir=self.sessions_dir, client=self.client,
                   privileged_command=self.privileged_command, backends=self.backends)
        except CoiError as exc:
            _say(f"removing the rules of {self.container} failed: {exc.message}")

    def _follow_restart(self, record: dict[str, Any], policy: NetworkPolicy,
                        state: dict[str, Any]) -> None:
        """A restart gives a new host interface (and maybe address): re-key the rules."""
        old = record.get("attachment") or {}
        host_name = (state.get("config") or {}).get(f"volatile.{old.get('nic', 'eth0')}.host_name")
        if not host_name or host_name == old.get("veth"):
            return
        _say(f"{self.container} has a new interface {host_name}: re-applying its rules")
        try:
            att = find_attachment(self.client, self.container)
            self._backend(record, policy).rekey(att, policy, record.get("addresses") or [])
            record["attachment"] = asdict(att)
            self.store.save_record(self.container, record)
        except (CoiError, BackendUnavailable) as exc:
            _say(f"re-applying the rules of {self.container} failed: {exc}")

    def _backend(self, record: dict[str, Any], policy: NetworkPolicy) -> Backend:
        return self.backends.named(record.get("backend"), client=self.client,
                                   privileged_command=policy.privileged_command)

    def _refresh(self, policy: NetworkPolicy) -> None:
        record = self.record()
        if not record:
            return
        att = Attachment(**record["attachment"])
        cache = self.store.dns_cache()
        result = resolve_allowed(policy.allowed, server=resolver_for(policy, att), cache=cache)
        self.store.save_dns_cache(cache)
        for entry in result.stale + list(result.failed):
            _say(f"refresh: {entry} did not resolve; keeping its last known addresses")
        if not result.addresses or result.addresses == record.get("addresses"):
            return
        try:
            self._backend(record, policy).update_allowed(att, policy, result.addresses)
        except (CoiError, BackendUnavailable) as exc:
            _say(f"refresh of {self.container} failed: {exc}")
            return
        record["addresses"] = result.addresses
        self.store.save_record(self.container, record)
        _say(f"refresh: {self.container} may now reach {', '.join(result.addresses)}")

    def _start_monitor(self, policy: NetworkPolicy) -> None:
        """``nft monitor trace`` (as root), else the helper's ``monitor`` request, which passes
        on trace lines of coi's tables only: the deny chains set nftrace, so refused packets
        show up here (the trace is host nftables', whichever backend filters)."""
        try:
            nft = self.backends.nft(policy.privileged_command)
            argv, request = nft.monitor_argv(), nft.monitor_input()
        except BackendUnavailable as exc:
            _say(f"logging of blocked connections is off: {exc}")
            return
        path = log_file(policy, self.sessions_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.monitor = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        stdin=subprocess.PIPE if request else subprocess.DEVNULL)
        if request and self.monitor.stdin is not None:
            try:
                self.monitor.stdin.write(request)
                self.monitor.stdin.close()
            except OSError as exc:
                _say(f"logging of blocked connections is off: the helper did not take the request ({exc})")

        def pump() -> None:
            assert self.monitor is not None and self.monitor.stdout is not None
            for line in self.monitor.stdout:
                parsed = parse_trace(line)
                if parsed and parsed[0] == self.container:
                    with open(path, "a") as fh:
                        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {parsed[0]} blocked {parsed[1]}\n")

        threading.Thread(target=pump, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m coi.network.watcher CONTAINER SESSIONS_DIR", file=sys.stderr)
        return 2
    container, sessions_dir = args[0], Path(args[1]).absolute()
    os.chdir("/")  # hold no directory (a workspace) busy while the container lives
    from coi.config import load_config
    from coi.incus import Incus
    from coi.statedir import check_state_dir

    check_state_dir(sessions_dir)
    # The privileged command comes from the user's own config (no workspace file), read now.
    trusted = load_config(workspace=None, env=os.environ).config
    record = Store(sessions_dir).record(container) or {}
    client = Incus.from_environment(project=record.get("project", "default"))
    watcher = Watcher(container, sessions_dir, client, trusted.network.privileged_command)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: watcher.stop.set())
    try:
        return watcher.run()
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
