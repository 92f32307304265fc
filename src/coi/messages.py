"""How services tell the person what they do, without printing themselves."""

from __future__ import annotations

from typing import Callable, Protocol

Log = Callable[[str], None]  # one line of progress or a warning


class Messages(Protocol):
    """What a service says while it works; the CLI's UI is one."""

    def info(self, text: str) -> None: ...
    def detail(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
