"""The builder: the throw-away container a build runs in, from launch to removal."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from coi import naming
from coi.errors import CoiError, ConflictError, NotFoundError
from coi.images.log import Log
from coi.images.manage import delete_quietly
from coi.images.refs import DEFAULT_BASE, Base, local_base
from coi.sessions import CONTAINER_CONFIG, deferred_signals  # what every container from a coi image gets

if TYPE_CHECKING:
    from coi.incus import IncusClient

PROFILES = ["coi"]
_STOP_TIMEOUT = 60


class Builder:
    """One builder container; ``build_id`` marks the images published from it."""

    def __init__(self, client: IncusClient, name: str | None = None) -> None:
        self.client = client
        self.name = name or naming.builder_name(naming.container_prefix())
        self.build_id = uuid.uuid4().hex

    def launch(self, base: Base, *, say: Log) -> Base:
        """Create and start the builder; a remote base that does not answer falls back. The base used."""
        if base.remote is not None:
            try:
                self._create(base)
                return base
            except (KeyboardInterrupt, ConflictError):
                raise
            except CoiError as exc:
                say(f"Could not reach the image server for {base.ref} ({exc.message}); "
                    f"falling back to {base.fallback}")
                self.remove()
                base = Base(base.fallback or DEFAULT_BASE)
        if base.alias is None:
            base = local_base(self.client, base, say)
        self._create(base)
        return base

    def _create(self, base: Base) -> None:
        with deferred_signals():
            self.client.create_instance(self.name, source=base.source(), config=CONTAINER_CONFIG,
                                        profiles=PROFILES, start=True)

    def stop(self) -> None:
        """Shut it down cleanly, or force it when that fails."""
        try:
            self.client.stop(self.name, timeout=_STOP_TIMEOUT)
        except CoiError:
            self.client.stop(self.name, force=True)

    def remove(self) -> None:
        """Delete it (stopped first), if it exists; best effort."""
        try:
            inst = self.client.instance(self.name)
        except NotFoundError:
            return
        if inst.get("status") != "Stopped":
            delete_quietly(lambda: self.client.stop(self.name, force=True))
        delete_quietly(lambda: self.client.delete(self.name))

    def abandon(self, *, interrupted: bool, say: Log) -> None:
        """Remove the builder and any image published from it without an alias."""
        if interrupted:
            say(f"Interrupted: removing builder {self.name}")
            self.client.close()  # the interrupted request may have left the connection half-read
        try:
            self.remove()
            for image in self.client.images():
                if (image.get("properties") or {}).get("coi.build_id") == self.build_id and not image.get("aliases"):
                    delete_quietly(self.client.delete_image, image["fingerprint"])
        except CoiError as exc:
            say(f"Warning: could not remove builder {self.name}: {exc.message}")
