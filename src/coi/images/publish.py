"""Publishing a builder: the new image gets its alias (an image it replaces goes only
after that), and is unpacked once on the storage pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from coi.errors import CoiError, ConflictError, NotFoundError
from coi.images.builder import PROFILES, Builder
from coi.images.log import Log
from coi.images.manage import delete_quietly
from coi.sessions import CONTAINER_CONFIG, deferred_signals

if TYPE_CHECKING:
    from coi.incus import IncusClient


def publish_builder(client: IncusClient, builder: Builder, *, alias: str, properties: Mapping[str, str],
                    replace: bool, description: str, say: Log) -> str:
    """Stop ``builder``, publish it and point ``alias`` at the new image; its fingerprint.

    The new image is deleted again when it cannot get the alias.
    """
    builder.stop()
    props = {**properties, "coi.build_id": builder.build_id, "description": description}
    say("Publishing (Ctrl+C takes effect when the daemon has finished)")
    with deferred_signals():
        fingerprint = client.publish(builder.name, properties=props, compression="none")
    try:
        point_alias(client, alias, fingerprint, replace=replace, description=description)
    except BaseException:
        delete_quietly(client.delete_image, fingerprint)
        raise
    return fingerprint


def point_alias(client: IncusClient, alias: str, fingerprint: str, *, replace: bool, description: str) -> None:
    """Give the new image the alias; the image it replaces is deleted when nothing else names it."""
    try:
        old = client.image_alias(alias)["target"]
    except NotFoundError:
        client.create_alias(alias, fingerprint, description)
        return
    if not replace:
        raise ConflictError(f"image {alias} already exists", "use --force to replace it")
    client.point_alias(alias, fingerprint)
    if old != fingerprint:
        try:
            others = [a["name"] for a in client.image(old).get("aliases") or [] if a["name"] != alias]
        except NotFoundError:
            return
        if not others:
            delete_quietly(client.delete_image, old)


def unpack(client: IncusClient, fingerprint: str, *, name: str, say: Log) -> None:
    """Create (and delete) container ``name`` from the new image, so the storage pool holds it
    unpacked: otherwise the first session after a build waits for that (13 s for coi)."""
    say("Unpacking the image on the storage pool (makes the first launch fast)")
    try:
        with deferred_signals():
            client.create_instance(name, source={"type": "image", "fingerprint": fingerprint},
                                   config=CONTAINER_CONFIG, profiles=PROFILES)
    except CoiError as exc:
        say(f"Warning: could not unpack the image ahead of time ({exc.message}); "
            "the first launch will do it")
    finally:
        delete_quietly(client.delete, name)
