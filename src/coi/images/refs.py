"""Image references: the base a build starts from, and the names images are given."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coi.errors import CoiError, NotFoundError, UsageError
from coi.images import bootstrap
from coi.images.log import Log

if TYPE_CHECKING:
    from coi.incus import IncusClient

COI_ALIAS = "coi"
DEFAULT_BASE = "bootstrap:debian/trixie"  # Debian 13, today's stable; bookworm stays selectable
REMOTE_SERVER = "https://images.linuxcontainers.org"
ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


@dataclass(frozen=True)
class Base:
    """Where a builder comes from: a local alias, or a remote image with a fallback."""

    ref: str  # as the user gave it
    alias: str | None = None  # a local image alias
    remote: str | None = None  # alias on the remote image server
    fallback: str | None = None  # bootstrap reference used when the remote does not answer

    def source(self) -> dict[str, Any]:
        """The ``source`` of an Incus instance created from this base."""
        if self.remote is None:
            return {"type": "image", "alias": self.alias}
        return {"type": "image", "mode": "pull", "server": REMOTE_SERVER,
                "protocol": "simplestreams", "alias": self.remote}


def parse_base(ref: str | None, *, default: str = DEFAULT_BASE) -> Base:
    """What a ``--base`` / ``[build] base`` value names (pure: nothing is looked up).

    ``images:<alias>`` is a remote image (falling back to a bootstrap base),
    ``bootstrap:debian/<suite>`` a locally built Debian, anything else a local alias.
    """
    ref = (ref or "").strip() or default
    if ref.startswith("bootstrap:"):
        bootstrap.parse_base(ref)  # refuses unknown suites
        return Base(ref)
    if ref.startswith("images:"):
        remote = ref[len("images:"):].strip("/")
        if not remote:
            raise CoiError(f"image reference {ref!r} names no image", "for example: images:debian/12")
        return Base(ref, remote=remote, fallback=fallback_for(remote))
    if not ALIAS_RE.fullmatch(ref):
        raise CoiError(f"{ref!r} is not an image alias",
                       "use a local alias, images:<distro>/<release> or bootstrap:debian/<suite>")
    return Base(ref, alias=ref)


def fallback_for(remote: str) -> str:
    """The bootstrap base closest to a remote alias (Debian 12 -> bookworm, else the default, trixie)."""
    parts = remote.lower().split("/")
    if parts[0] == "debian" and len(parts) > 1 and parts[1] in ("12", "bookworm"):
        return "bootstrap:debian/bookworm"
    return DEFAULT_BASE


def local_base(client: IncusClient, base: Base, log: Log) -> Base:
    """A base that is a local alias: bootstrap bases are built (once) here."""
    if base.ref.startswith("bootstrap:"):
        alias = bootstrap.ensure_base(client, bootstrap.parse_base(base.ref), log=log)
        return Base(base.ref, alias=alias)
    if base.alias and not client.image_exists(base.alias):
        hint = ("build it first with 'coi build'" if base.alias == COI_ALIAS
                else "see 'coi image list --all' for the local images")
        raise NotFoundError(f"base image {base.alias!r} does not exist", hint)
    return base


def check_alias(alias: str) -> None:
    """Refuse a name Incus (or a remote reference) would read otherwise."""
    if not ALIAS_RE.fullmatch(alias) or ":" in alias:
        raise UsageError(f"{alias!r} is not a valid image name",
                         "use letters, digits, '-', '_', '.' and '/' (no ':')")
