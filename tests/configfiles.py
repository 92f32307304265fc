"""A person's config and a project's ``.coi.toml`` side by side in a temporary tree, loaded
the way coi loads them (no system file): what the hostile-project tests start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from coi.config import load_config


class ConfigFiles:
    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        self.home = root / "home"
        self.user = self.home / ".config" / "coi" / "config.toml"
        self.workspace = root / "project"
        self.workspace.mkdir(parents=True)
        self.user.parent.mkdir(parents=True)
        self.env = {"HOME": str(self.home), **(env or {})}

    def load(self, workspace: str = "", user: str = "", **kw: Any):
        """The config with ``workspace`` as the project's file and ``user`` as the person's."""
        (self.workspace / ".coi.toml").write_text(workspace)
        self.user.write_text(user)
        return load_config(workspace=self.workspace, env=self.env, system_file=self.home / "none.toml",
                           user_file=self.user, **kw)
