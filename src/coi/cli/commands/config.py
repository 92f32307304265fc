"""``coi config show|path``: the effective configuration and where it came from."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from coi.config import config_files, render_toml, to_json

if TYPE_CHECKING:
    from coi.cli.context import Context


def show(ctx: Context, *, format: str = "toml") -> int:  # noqa: A002 - the parser's --format dest
    """Print the merged configuration, each value with its origin."""
    loaded = ctx.loaded_config
    text = json.dumps(to_json(loaded), indent=2) if format == "json" else render_toml(loaded).rstrip("\n")
    ctx.ui.out(text)
    return 0


def path(ctx: Context) -> int:
    """List the config files consulted, lowest precedence first.

    Works without parsing them, so it still helps when one of them is broken.
    """
    for file, exists in config_files(workspace=ctx.workspace, env=os.environ):
        ctx.ui.out(f"{file} ({'found' if exists else 'not found'})")
    return 0
