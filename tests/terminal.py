"""Drive ``coi`` through a real pseudo-terminal and read the screen like a person.

pexpect gives the terminal; pyte renders what the program drew, so tests can
wait for text to appear on screen (never for a fixed time).
"""

from __future__ import annotations

import time

import pexpect
import pyte

ROWS, COLS = 40, 160


class Terminal:
    def __init__(self, argv: list[str], *, cwd: str, timeout: float = 60) -> None:
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.child = pexpect.spawn(argv[0], argv[1:], cwd=cwd, dimensions=(ROWS, COLS), timeout=timeout,
                                   env={"TERM": "xterm-256color", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    def _pump(self, wait: float) -> None:
        try:
            data = self.child.read_nonblocking(65536, timeout=wait)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            raise
        self.raw += data
        self.stream.feed(data)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def output(self) -> str:
        """Everything the program printed, as text (progress lines included)."""
        return self.raw.decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        """Until ``needle`` is on screen (or in the raw output); fail with the screen."""
        deadline = time.monotonic() + timeout
        while needle not in self.text() and needle not in self.output():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} did not appear; screen:\n{self.text()}")
            try:
                self._pump(0.1)
            except pexpect.EOF:
                if needle in self.text() or needle in self.output():
                    return
                raise AssertionError(f"program ended before {needle!r}; output:\n{self.output()}") from None

    def type(self, text: str, enter: bool = True) -> None:
        self.child.send(text + ("\r" if enter else ""))

    def detach(self) -> None:
        self.child.send("\x02")  # Ctrl+b
        self.child.send("d")

    def finish(self, timeout: float = 90) -> int:
        """Wait for the program to exit; its exit status."""
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            if time.monotonic() > deadline:
                raise AssertionError(f"program did not exit; output:\n{self.output()}")
            try:
                self._pump(0.1)
            except pexpect.EOF:
                break
        self.child.close()
        return self.child.exitstatus if self.child.exitstatus is not None else 128 + (self.child.signalstatus or 0)
