"""What the session services' unit tests share: the messages a service gave (``Said``),
and a home of the test's own (import the fixture into a test module to use it)."""

from __future__ import annotations

from pathlib import Path

import pytest


class Said:
    """The messages a service gave, in order: (level, text)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def detail(self, text: str) -> None:
        self.lines.append(("detail", text))

    def warn(self, text: str) -> None:
        self.lines.append(("warn", text))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-test-")
    return home
