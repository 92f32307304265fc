"""Image commands: ``coi build [custom]`` and ``coi image list|publish|delete|exists|cleanup``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from coi.cli.render import print_json

if TYPE_CHECKING:
    from coi.cli.context import Context
    from coi.images import ImageInfo

def _build_output(ctx: Context) -> dict[str, Any]:
    """Steps' own output (apt, npm, pip) only with --verbose; else a spinner while a step runs."""
    return {"output": ctx.ui.info, "progress": None} if ctx.ui.verbose else {"output": None,
                                                                               "progress": ctx.ui.progress}


def build(ctx: Context, *, force: bool = False, tools: str | None = None) -> int:
    """Build the ``coi`` image."""
    from coi.images import build_coi

    chosen = tools.split(",") if tools is not None else None  # None: [build] tools
    build_coi(ctx.incus, force=force, tools=chosen, config=ctx.config, log=ctx.ui.info, **_build_output(ctx))
    return 0


def build_custom(ctx: Context, *, name: str, script: str, base: str | None = None, force: bool = False,
                 tools: Any = None) -> int:
    """Build image NAME from a script run as root (``tools`` belongs to ``coi build`` and is ignored)."""
    from coi.images import build_custom as run_build

    run_build(ctx.incus, name=name, script=Path(script).expanduser(), base=base, force=force,
              config=ctx.config, log=ctx.ui.info, **_build_output(ctx))
    return 0


def image_list(ctx: Context, *, all: bool = False, prefix: str | None = None,  # noqa: A002 - the --all flag
               format: str = "table") -> int:  # noqa: A002 - the --format flag
    from coi.images import list_images

    rows = list_images(ctx.incus, all=all, prefix=prefix)
    if format == "json":
        print_json(ctx.ui, [row.to_json() for row in rows])
    else:
        render_table(ctx, rows, all=all)
    return 0


def render_table(ctx: Context, rows: Iterable[ImageInfo], *, all: bool) -> None:  # noqa: A002
    """``COI Images:`` (coi-built), and with ``--all`` ``Available Images:`` (every other)."""
    rows = list(rows)
    if not rows:
        ctx.ui.out("No images found" + ("" if all else " (build one with 'coi build')"))
        return
    ours = [r for r in rows if "coi.kind" in r.properties]
    sections = [("COI Images:", ours)] + ([("Available Images:", [r for r in rows if r not in ours])] if all else [])
    for i, (title, section) in enumerate(sections):
        if i:
            ctx.ui.out("")
        ctx.ui.out(title)
        for line in _table(section) if section else ["  (none)"]:
            ctx.ui.out(line)


def _table(rows: list[ImageInfo]) -> list[str]:
    from coi.images import human_size

    header = ("ALIAS", "FINGERPRINT", "SIZE", "CREATED", "KIND", "BASE", "COI")
    table = [header] + [
        (r.alias or "-", r.fingerprint[:12], human_size(r.size), r.created[:16].replace("T", " "),
         r.properties.get("coi.kind", "-"), r.properties.get("coi.base", "-"),
         r.properties.get("coi.version", "-"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]


def image_publish(ctx: Context, *, container: str, alias: str, description: str = "") -> int:
    from coi.images import human_size, publish_container

    ctx.ui.info(f"Publishing container {container} as image {alias}...")
    info = publish_container(ctx.incus, container=container, alias=alias, description=description)
    ctx.ui.info(f"Published image {alias} (fingerprint {info.fingerprint[:12]}, {human_size(info.size)})")
    return 0


def image_delete(ctx: Context, *, alias: str) -> int:
    from coi.images import delete_image

    delete_image(ctx.incus, alias)
    ctx.ui.info(f"Deleted image {alias}")
    return 0


def image_exists(ctx: Context, *, alias: str) -> int:
    from coi.images import image_exists as exists

    return 0 if exists(ctx.incus, alias) else 1


def image_cleanup(ctx: Context, *, prefix: str, keep: int) -> int:
    from coi.images import cleanup_images

    kept, deleted = cleanup_images(ctx.incus, prefix=prefix, keep=keep)
    for row in deleted:
        ctx.ui.info(f"Deleted image {row.alias} (created {row.created[:19].replace('T', ' ')})")
    for row in kept:
        ctx.ui.info(f"Kept image {row.alias}")
    ctx.ui.info(f"Cleanup complete: {len(deleted)} image(s) removed, {len(kept)} kept")
    return 0
