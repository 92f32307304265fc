"""What the user sees of a build's progress: one numbered line a step, and a spinner
while a step runs (a terminal line that is rewritten; "" clears it)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from coi.images.log import Log


def elapsed(seconds: float) -> str:
    """``42s``, or ``3m07s`` from a minute on."""
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Steps:
    """The numbered steps of one build: ``[n/total] title  (time elapsed)``, said through ``say``."""

    total: int
    say: Log
    progress: Log | None = None  # the spinner's line; None: no spinner
    started: float = field(default_factory=time.monotonic)
    number: int = 0
    current: str = ""  # the title of the step that runs

    def seconds(self) -> float:
        """Time since the build started."""
        return time.monotonic() - self.started

    def begin(self, title: str) -> None:
        self.number += 1
        self.current = title
        self.say(f"[{self.number}/{self.total}] {title}  ({elapsed(self.seconds())} elapsed)")

    @contextmanager
    def spinner(self) -> Iterator[None]:
        """While a step runs: a spinner, the step and the time so far, redrawn a few times a second."""
        progress = self.progress
        if progress is None:
            yield
            return
        import threading

        done = threading.Event()
        began = time.monotonic()

        def spin() -> None:
            frames = "|/-\\"
            i = 0
            while not done.wait(0.25):
                step = elapsed(time.monotonic() - began)
                progress(f"{frames[i % 4]} [{self.number}/{self.total}] {self.current}  {step}")
                i += 1
        ticker = threading.Thread(target=spin, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            progress("")
