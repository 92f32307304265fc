"""What every command handler gets: global options, output, config, Incus.

The config and the Incus client are built once, lazily, here in the CLI
layer and passed to the services; nothing below the CLI builds its own.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coi.cli.ui import UI

if TYPE_CHECKING:
    from coi.config import LoadedConfig
    from coi.incus import Incus
    from coi.sessions.lifecycle import Place

# Flags that are configuration values: they form the highest config layer and
# are read back from the config, not passed to handlers.
FLAG_KEYS = {
    "image": ("defaults.image", "--image"),
    "persistent": ("defaults.persistent", "--persistent"),
    "network": ("network.mode", "--network"),
    "profile": ("defaults.profile", "--profile"),
    "ssh_agent": ("ssh.forward_agent", "--ssh-agent"),
    "max_duration": ("limits.max_duration", "--max-duration"),
}


class Context:
    """Global options plus lazily built config and Incus client."""

    def __init__(
        self,
        *,
        ui: UI,
        workspace: Path,
        flag_values: dict[str, tuple[str, Any]],
    ) -> None:
        self.ui = ui
        self.workspace = workspace
        self.flag_values = flag_values
        self.workspace_given = False  # -w/--workspace on the command line (else the current directory)
        self._loaded: LoadedConfig | None = None

    @classmethod
    def from_namespace(cls, kwargs: dict[str, Any]) -> Context:
        """Take the global options out of parsed ``kwargs`` (mutated in place)."""
        quiet = kwargs.pop("quiet", False)
        verbose = kwargs.pop("verbose", False)
        workspace = kwargs.pop("workspace", None)
        flag_values: dict[str, tuple[str, Any]] = {}
        for dest, (key, flag) in FLAG_KEYS.items():
            if dest in kwargs:
                value = kwargs.pop(dest)
                # Flags only count when given (None); --no-ssh-agent gives False, and it counts.
                if value is not None:
                    flag_values[key] = (flag, value)
        ws = Path(os.path.abspath(os.path.expanduser(workspace or os.getcwd())))
        ctx = cls(ui=UI(quiet=quiet, verbose=verbose), workspace=ws, flag_values=flag_values)
        ctx.workspace_given = workspace is not None
        return ctx

    def set_flag(self, key: str, label: str, value: Any) -> None:
        """Set a config value as if given on the command line (config is loaded again)."""
        self.flag_values[key] = (label, value)
        self._loaded = None

    @property
    def loaded_config(self) -> LoadedConfig:
        """The config of every layer, loaded on first use (its warnings printed then)."""
        if self._loaded is None:
            from coi.config import load_config

            self._loaded = load_config(workspace=self.workspace, env=os.environ, flags=self.flag_values)
            for warning in self._loaded.warnings:
                self.ui.warn(warning)
        return self._loaded

    @property
    def config(self):
        return self.loaded_config.config

    @cached_property
    def sessions_dir(self) -> Path:
        """``[paths] sessions_dir``, checked to be the user's alone (``coi.statedir``)."""
        from coi.statedir import check_state_dir

        return check_state_dir(self.config.paths.sessions_dir)

    @cached_property
    def incus(self) -> Incus:
        from coi.incus import Incus

        return Incus.from_environment(project=self.config.incus.project)

    @property
    def place(self) -> Place:
        """What the session services work with: client, config, workspace, state dir, output."""
        from coi.sessions.lifecycle import Place

        return Place(client=self.incus, config=self.config, workspace=self.workspace, messages=self.ui,
                     state_dir=lambda: self.sessions_dir)
