"""A workspace's own ``.coi.toml`` is hostile: what it may set, and only ever in the
safer direction (an allowlist of keys; limits only lower; no paths outside it)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from coi.config.schema import _PROFILE_TARGETS, SCHEMA, Layer, _generic
from coi.config.values import _given

# The network modes (schema.NETWORK_MODES) from the weakest to the strongest isolation.
_MODE_STRENGTH = {"open": 0, "restricted": 1, "allowlist": 2}


# What a workspace's own ``.coi.toml`` may set at all (schema paths). Each value is
# still checked against the user's own config (``_untrusted_reason``); every other
# key is ignored with a warning. The user's ``trust_workspace_config`` lifts both.
WORKSPACE_KEYS = frozenset({
    "defaults.image", "defaults.persistent", "defaults.max_slots", "defaults.profile",
    "tool.name", "tool.binary",
    "network.mode", "network.allowed_domains", "network.allowlist_by", "network.refresh_interval_minutes",
    "network.block_private_networks", "network.block_metadata_endpoint",
    "network.allow_local_network_access", "network.logging.enabled",
    "mounts.default", "git.isolation", "limits.cpu", "limits.memory", "limits.processes",
    "ports", "ssh.forward_agent",
    "limits.max_duration", "limits.disk",
    "security.masked_paths",
    *(k.path for k in SCHEMA if k.path.startswith("profiles.*.")),
    # Prompts are text for the agent in its container (which reads the project's files
    # anyway), never anything the host runs: a project may add its own, not replace yours.
    "prompts.*",
})


def untrusted_layer(layer: Layer, trusted: Layer, *, workspace: Path, warnings: list[str],
                    where: str, dropped: Iterable[str] = ()) -> Layer:
    """What an untrusted project may set: keys of ``WORKSPACE_KEYS`` only, isolation only
    stricter, limits only lower than the user's own (``trusted``), mounts only inside the
    workspace, unless the user's own config sets ``trust_workspace_config``.
    What is ignored is said in one warning line."""
    if trusted.get("defaults.trust_workspace_config", (False, ""))[0]:
        return layer
    kept: Layer = {}
    ignored = [f"{key} (only your own config can set it)" for key in dropped]
    for key, (value, origin) in layer.items():
        reason = _untrusted_reason(key, value, trusted, workspace)
        if reason is None:
            kept[key] = _only_added(key, (value, origin), trusted)
        else:
            ignored.append(f"{key} ({reason})")
    if ignored:
        warnings.append(f"{where}: ignored {'; '.join(ignored)} "
                        "(set trust_workspace_config = true in your own config to allow it)")
    return kept


def _untrusted_reason(key: str, value: Any, below: Layer, workspace: Path) -> str | None:
    """Why a workspace may not set ``key`` to ``value`` over the user's ``below``; None when it may."""
    generic = _generic(key)
    if generic not in WORKSPACE_KEYS:
        return "only your own config can set it"
    if generic == "prompts.*":
        return "a workspace file cannot replace your own prompt" if key in below else None
    name = generic.removeprefix("profiles.*.")
    top = _PROFILE_TARGETS.get(name, name)  # the top-level key a profile value lands on
    base = below.get(top, (None, ""))[0]
    if top == "network.mode" and _MODE_STRENGTH[value] < _MODE_STRENGTH[base]:
        return f"a workspace file cannot weaken network isolation ({base} -> {value})"
    if top == "network.allowlist_by" and value == "address" and base == "name":
        return "a workspace file cannot weaken network isolation (allowlist by name -> by address)"
    if top == "network.allowed_domains" and not set(value) <= set(base):
        return "a workspace file cannot add domains to the network allowlist"
    if top in ("network.block_private_networks", "network.block_metadata_endpoint") and not value:
        return "a workspace file cannot lift a network block"
    if top == "network.allow_local_network_access" and value:
        return "a workspace file cannot open the local network"
    if top == "ports" and value:
        return ("a workspace file cannot publish ports, as a listener on your host could pose as a service "
                "of yours: use --port")
    if top == "ssh.forward_agent" and value:
        return "a workspace file cannot forward your SSH agent: use --ssh-agent"
    if top == "git.isolation" and value == "shared" and base == "branch":
        return "a workspace file cannot turn branch isolation off"
    if top == "security.masked_paths" and any(p.startswith("!") for p in value):
        return "a workspace file cannot unmask paths (patterns starting with '!')"
    if top == "mounts.default":
        outside = [str(m.host) for m in value if not _inside(m.host, workspace)]
        if outside:
            return f"a workspace file cannot mount host paths outside the workspace ({', '.join(outside)})"
    if top in ("limits.max_duration", "limits.disk"):
        from coi.config.limits import workspace_refusal

        return workspace_refusal(top, value, base if base is not None else "")
    if top in ("defaults.max_slots", "limits.cpu", "limits.memory", "limits.processes") \
            and not _lower_limit(top, value, base):
        return f"a workspace file may only lower your limit ({_given(base)} -> {_given(value)})"
    return None


def _only_added(key: str, entry: tuple[Any, str], below: Layer) -> tuple[Any, str]:
    """(value, origin) as kept: the workspace's masked paths join the user's own list (and
    both places are named); they never replace it."""
    if key != "security.masked_paths":
        return entry
    (value, origin), (base, base_origin) = entry, below.get(key, ((), "default"))
    return (*base, *(p for p in value if p not in base)), f"{base_origin} + {origin}"


def _lower_limit(key: str, value: Any, base: Any) -> bool:
    """Whether ``value`` is no more than the user's ``base`` ("" or 0: unlimited)."""
    if key in ("defaults.max_slots", "limits.processes"):
        return not base or (0 < value <= base)
    if not base:
        return True
    measure = _cpu_count if key == "limits.cpu" else _memory_size
    mine, theirs = measure(value), measure(base)
    return mine is not None and theirs is not None and mine[0] == theirs[0] and mine[1] <= theirs[1]


def _cpu_count(spec: str) -> tuple[str, int] | None:
    """("cpus", how many) of ``limits.cpu``: a count ("2") or CPU numbers ("0-1,4")."""
    if spec.isdigit():
        return "cpus", int(spec)
    try:
        ranges = [part.split("-") for part in spec.split(",")]
        return "cpus", sum(int(r[-1]) - int(r[0]) + 1 for r in ranges if len(r) <= 2)
    except ValueError:
        return None


_UNITS = {"": 1, "B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _memory_size(text: str) -> tuple[str, float] | None:
    """("bytes", n) or ("percent", n) of a ``limits.memory`` value; None when it is neither."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|[kMGT]i?B|B)?", text.strip())
    if not match:
        return None
    if match[2] == "%":
        return "percent", float(match[1])
    unit = _UNITS.get(match[2] or "")
    return None if unit is None else ("bytes", float(match[1]) * unit)


def _inside(path: Path, workspace: Path) -> bool:
    resolved, root = Path(os.path.realpath(path)), Path(os.path.realpath(workspace))
    return resolved == root or root in resolved.parents
