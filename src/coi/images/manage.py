"""Managing local images: list, delete, publish a container, clean up old ones."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from coi import __version__
from coi.errors import CoiError, ConflictError, NotFoundError, UsageError
from coi.images.refs import check_alias

if TYPE_CHECKING:
    from coi.incus import IncusClient


@dataclass(frozen=True)
class ImageInfo:
    """One alias of a local image, as ``coi image list`` shows it."""

    alias: str
    fingerprint: str
    size: int
    created: str
    description: str
    properties: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"alias": self.alias, "fingerprint": self.fingerprint, "size": self.size,
                                "created": self.created, "description": self.description}
        data.update({k: v for k, v in self.properties.items() if k.startswith("coi.")})
        return data


def human_size(size: int | float) -> str:
    """``512 B``, ``1.5 KiB`` ... up to GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def now_iso() -> str:
    """The time now, as images record it (``coi.built_at``): UTC to the second, ``Z``."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def timestamp(text: str) -> float:
    """Seconds since the epoch of an Incus timestamp (RFC 3339, up to nanoseconds)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", text or "")
    if not match:
        return 0.0
    zone = match[3] or "Z"
    moment = _dt.datetime.fromisoformat(match[1] + ("+00:00" if zone == "Z" else zone))
    return moment.timestamp() + (int(match[2]) / 10 ** len(match[2]) if match[2] else 0.0)


def delete_quietly(func: Callable[..., Any], *args: Any) -> None:
    """Best-effort clean-up: a thing already gone, or a daemon that refuses, must not hide the real error."""
    try:
        func(*args)
    except CoiError:
        pass


def image_rows(images: Iterable[Mapping[str, Any]], *, all: bool, prefix: str | None) -> list[ImageInfo]:  # noqa: A002
    """One row per alias (``all``: of every image, an unnamed one too), coi-built images only otherwise."""
    rows = []
    for image in images:
        props = dict(image.get("properties") or {})
        if not all and "coi.kind" not in props:
            continue
        aliases = [a["name"] for a in image.get("aliases") or []] or ([""] if all and not prefix else [])
        for alias in aliases:
            if prefix and not alias.startswith(prefix):
                continue
            rows.append(ImageInfo(alias, image["fingerprint"], int(image.get("size") or 0),
                                  image.get("created_at") or "", props.get("description", ""), props))
    return sorted(rows, key=lambda r: (r.alias == "", r.alias, r.fingerprint))


def list_images(client: IncusClient, *, all: bool = False, prefix: str | None = None) -> list[ImageInfo]:  # noqa: A002
    """coi-built images (every local image with ``all``), one row per alias."""
    return image_rows(client.images(), all=all, prefix=prefix)


def image_exists(client: IncusClient, alias: str) -> bool:
    return client.image_exists(alias)


def delete_image(client: IncusClient, alias: str) -> str:
    """Delete the image named ``alias`` (only the alias when other aliases name it too)."""
    try:
        fingerprint = client.image_alias(alias)["target"]
    except NotFoundError:
        raise NotFoundError(f"image {alias} does not exist", "see 'coi image list --all'") from None
    others = [a["name"] for a in client.image(fingerprint).get("aliases") or [] if a["name"] != alias]
    if others:
        client.delete_alias(alias)
    else:
        client.delete_image(fingerprint)
    return fingerprint


def publish_container(client: IncusClient, *, container: str, alias: str, description: str = "") -> ImageInfo:
    """Publish a stopped container as image ``alias``."""
    check_alias(alias)
    inst = client.instance(container)
    if inst.get("status") != "Stopped":
        raise ConflictError(f"container {container} is {str(inst.get('status', 'running')).lower()}",
                            f"stop it first: coi container stop {container}")
    if client.image_exists(alias):
        raise ConflictError(f"image {alias} already exists", f"delete it first: coi image delete {alias}")
    description = description or f"published from container {container}"
    props = {"coi.kind": "published", "coi.version": __version__, "coi.source": container,
             "coi.built_at": now_iso(), "description": description}
    fingerprint = client.publish(container, properties=props, compression="none")
    try:
        client.create_alias(alias, fingerprint, description)
    except BaseException:
        delete_quietly(client.delete_image, fingerprint)
        raise
    image = client.image(fingerprint)
    return image_rows([image], all=True, prefix=alias)[0]


def plan_cleanup(rows: Iterable[ImageInfo], *, prefix: str, keep: int) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """(kept, deleted): the ``keep`` newest aliases starting with ``prefix`` stay."""
    if keep < 1:
        raise UsageError(f"--keep must be at least 1 (got {keep})",
                         f"use 'coi image delete' to remove every image starting with {prefix}")
    matching = [r for r in rows if r.alias.startswith(prefix)]
    newest = sorted(matching, key=lambda r: (timestamp(r.created), r.alias), reverse=True)
    return newest[:keep], newest[keep:]


def cleanup_images(client: IncusClient, *, prefix: str, keep: int) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """Delete all but the ``keep`` newest images whose alias starts with ``prefix``; (kept, deleted)."""
    if not prefix:
        raise UsageError("the prefix must not be empty")
    images = client.images()
    kept, doomed = plan_cleanup(image_rows(images, all=True, prefix=prefix), prefix=prefix, keep=keep)
    by_fp = {img["fingerprint"]: {a["name"] for a in img.get("aliases") or []} for img in images}
    for row in doomed:
        names = by_fp.get(row.fingerprint, set())
        names.discard(row.alias)
        if names:
            client.delete_alias(row.alias)
        else:
            delete_quietly(client.delete_image, row.fingerprint)
    return kept, doomed
