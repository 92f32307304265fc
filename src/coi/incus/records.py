"""Reading Incus's records: pure functions over the dicts the API returns."""

from __future__ import annotations

from typing import Any, Mapping


def ipv4_addresses(state: Mapping[str, Any], *, nic: str | None = None, global_only: bool = True) -> list[str]:
    """The IPv4 addresses in an instance's state (``/state``): of ``nic``, or of every NIC
    but ``lo``; only global ones unless ``global_only`` is False. Malformed entries are skipped."""
    networks = (state or {}).get("network") or {}
    names = [nic] if nic is not None else [name for name in networks if name != "lo"]
    found = []
    for name in names:
        for address in (networks.get(name) or {}).get("addresses") or []:
            if not isinstance(address, Mapping) or address.get("family") != "inet" or not address.get("address"):
                continue
            if global_only and address.get("scope") != "global":
                continue
            found.append(address["address"])
    return found


def ipv4_address(state: Mapping[str, Any], nic: str = "eth0") -> str | None:
    """The first global IPv4 address of ``nic``, if it has one yet."""
    found = ipv4_addresses(state, nic=nic)
    return found[0] if found else None
