"""A build's log file: ``<sessions_dir>/logs/build-<alias>.log``.

It gets every line the user sees, the command lines run in the builder
(``$ ...``) and their full output; coi's own notes start with ``# ``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Any

from coi.messages import Log  # where a build's lines go (the terminal, a test's list)


def log_path(config: Any, alias: str) -> Path:
    """The log file of the build of image ``alias``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", alias)
    return Path(config.paths.sessions_dir) / "logs" / f"build-{safe}.log"


class BuildLog:
    """The log file of one build, and the user's line sink (``say`` goes to both)."""

    def __init__(self, path: Path, log: Log) -> None:
        self.path = path
        self.log = log
        self._fh: IO[str] | None = None

    def open(self, header: str) -> None:
        """Start the file afresh with ``header`` (a ``# `` note) as its first line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8")
        self.write(header)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def write(self, line: str) -> None:
        """A line for the file only (a step's output, a command line); flushed at once."""
        if self._fh is not None:
            self._fh.write(line + "\n")
            self._fh.flush()

    def say(self, line: str) -> None:
        """A line for the user, kept in the file too."""
        self.write(line)
        self.log(line)

    def tail(self, count: int) -> list[str]:
        """The last ``count`` lines of output in the file (coi's own ``# `` notes left out)."""
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if not line.startswith("# ")][-count:]
