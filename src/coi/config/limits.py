"""The grammar of ``[limits] max_duration`` and ``[limits] disk``: what a value means,
and a clear error for anything else (pure; the session request and the workspace
allowlist both read values through here).

* ``max_duration``: how long a session may run, as whole numbers with units in the
  order d, h, m, s: ``"2h"``, ``"90m"``, ``"1h30m"``, ``"30s"``, ``"1d"``. From
  5 seconds to 365 days; ``""`` or ``"0"``: no limit.
* ``disk``: the size of the container's root disk, a whole number and a unit as
  Incus takes it: ``"20GiB"``, ``"500GB"`` (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB).
  At least 512 MiB; ``""``: the storage pool's default (no limit of coi's).
"""

from __future__ import annotations

import re

from coi.errors import UsageError

MIN_DURATION = 5  # seconds: short enough for tests, long enough that no typo ends a session at once
MAX_DURATION = 365 * 86400
MIN_DISK = 512 << 20  # bytes: below this not even a minimal image's files fit

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_SECONDS = (86400, 3600, 60, 1)
_DURATION_HINT = 'use whole numbers with units d, h, m, s, such as "2h", "90m", "1h30m" or "30s" ("" or "0": no limit)'

_DISK = re.compile(r"(\d+)(B|kB|MB|GB|TB|KiB|MiB|GiB|TiB)")
_DISK_UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_DISK_HINT = 'use a whole number and a unit, such as "20GiB" or "500GB" (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)'


def parse_duration(text: object, *, key: str = "limits.max_duration") -> int:
    """Seconds of a ``max_duration`` value; 0 for no limit. UsageError for anything else."""
    if not isinstance(text, str):
        raise UsageError(f"{key} = {text!r} is not a duration", _DURATION_HINT)
    value = text.strip()
    if value in ("", "0"):
        return 0
    match = _DURATION.fullmatch(value)
    if not match or not any(match.groups()):
        raise UsageError(f"{key} = {text!r} is not a duration", _DURATION_HINT)
    seconds = sum(int(part) * unit for part, unit in zip(match.groups(), _SECONDS) if part)
    if seconds < MIN_DURATION:
        raise UsageError(f"{key} = {text!r} is shorter than {MIN_DURATION} seconds",
                         f'use at least "{MIN_DURATION}s", or "" for no limit')
    if seconds > MAX_DURATION:
        raise UsageError(f"{key} = {text!r} is longer than 365 days", 'use "365d" or less, or "" for no limit')
    return seconds


def format_duration(seconds: float) -> str:
    """``5400`` -> ``"1h30m"``: how coi writes a duration (whole seconds, largest units first)."""
    left = max(0, int(seconds))
    if left == 0:
        return "0s"
    parts = []
    for unit, size in zip("dhms", _SECONDS):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_disk(text: object, *, key: str = "limits.disk") -> int:
    """Bytes of a ``disk`` value; 0 for none. UsageError for anything else."""
    if not isinstance(text, str):
        raise UsageError(f"{key} = {text!r} is not a disk size", _DISK_HINT)
    value = text.strip()
    if value == "":
        return 0
    match = _DISK.fullmatch(value)
    if not match:
        raise UsageError(f"{key} = {text!r} is not a disk size", _DISK_HINT)
    size = int(match[1]) * _DISK_UNITS[match[2]]
    if size < MIN_DISK:
        raise UsageError(f"{key} = {text!r} is smaller than 512MiB",
                         "the image's own files live on the root disk too; use a size such as \"20GiB\"")
    return size


def workspace_refusal(key: str, value: object, base: object) -> str | None:
    """Why an untrusted project may not set ``key`` to ``value`` over the user's own
    ``base`` (both as written in config); None when it may: only a limit at least as
    strict ("" and, for durations, "0" mean no limit, so a project cannot lift one)."""
    parse = parse_duration if key.endswith("max_duration") else parse_disk
    try:
        mine = parse(value, key=key)
    except UsageError as exc:
        return exc.message
    try:
        theirs = parse(base, key=key)
    except UsageError:
        return f"your own {key} is not valid"
    if theirs and not 0 < mine <= theirs:
        what = "shorten" if key.endswith("max_duration") else "lower"
        return f"a workspace file may only {what} your limit ({base!r} -> {value!r})"
    return None
