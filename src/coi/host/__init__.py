"""The host coi runs on: ``coi setup`` (``setup``) and ``coi doctor`` (``diagnose``).

- ``steps``: what every set-up step shares (``Step``, ``Report``, running a host command);
- ``system``: packages, root's id ranges, the Incus admin group, the address lock;
- ``daemon``: the Incus daemon started, with a storage pool, the coi bridge and profile;
- ``privileges``: the root nft helper's launcher, the sudoers grant, the bridge gate;
- ``doctor``: the checks, each with what to do, and ``--fix``'s repairs (setup's own steps).

It talks to Incus only through the client it is given and never builds one; it
never imports ``coi.cli`` and prints nothing: steps are reported to a callback,
checks are returned, and the CLI renders both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coi.host.daemon import (
    COI_NETWORK,
    COI_POOL,
    COI_PROFILE,
    answers,
    ensure_network,
    ensure_profile,
    ensure_storage_pool,
    start_daemon,
)
from coi.host.doctor import Check, Fix, Health, check_nftables, diagnose, run_checks
from coi.host.privileges import (
    dropin_text,
    ensure_gate,
    ensure_network_privileges,
    grant_path,
    install_helper,
    launcher_text,
    remove_legacy_grants,
    sudoers_rule,
    untrusted_paths,
)
from coi.host.steps import Report, Step, require_root
from coi.host.system import ensure_address_lock, ensure_group_member, ensure_subids, install_packages

if TYPE_CHECKING:
    from coi.incus import IncusClient

__all__ = [
    "COI_NETWORK", "COI_POOL", "COI_PROFILE", "Check", "Fix", "Health", "Report", "Step", "check_nftables",
    "diagnose", "dropin_text",
    "ensure_gate", "ensure_network_privileges", "grant_path", "install_helper", "launcher_text",
    "remove_legacy_grants", "require_root", "run_checks", "setup", "sudoers_rule", "untrusted_paths",
]


def setup(client: IncusClient, *, report: Report, group: str, user: str | None, ipv6: bool = False) -> bool:
    """``coi setup``: every step, in order (root only); returns whether anything changed.

    ``client`` need not answer yet: the daemon is started before it is first asked.
    """
    require_root()
    changed: list[Step] = []

    def track(step: Step) -> None:
        if step.changed:
            changed.append(step)
        report(step)

    install_packages(track)
    subids_changed = ensure_subids(track, user=user)
    install_helper(track)
    ensure_gate(track)  # before incusd starts (and autostarts containers)
    # incusd reads the id ranges at start: restart a running one we just gave ranges to.
    start_daemon(client, track, group=group, restart=subids_changed and answers(client))
    pool = ensure_storage_pool(client, track)
    network = ensure_network(client, track, ipv6=ipv6)
    ensure_profile(client, track, pool=pool, network=network)
    ensure_group_member(user, group, track)
    ensure_address_lock(group, track)
    ensure_network_privileges(user, track)
    remove_legacy_grants(track)
    return bool(changed)
