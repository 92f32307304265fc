"""Terminal output: progress and messages on stderr, results on stdout."""

from __future__ import annotations

import os
import sys


def printable(text: str) -> str:
    """``text`` safe for a terminal, its lines kept: control characters (escape sequences,
    carriage returns, C1 codes) written as ``\\xNN``, newlines and tabs left as they are."""
    return "".join(c if c in "\t\n" or (" " <= c != "\x7f" and not "\x80" <= c <= "\x9f") else f"\\x{ord(c):02x}"
                   for c in text)


class UI:
    """Writes user-facing text; honours --quiet, --verbose and NO_COLOR."""

    def __init__(self, *, quiet: bool = False, verbose: bool = False) -> None:
        self.quiet = quiet
        self.verbose = verbose
        self.color = sys.stderr.isatty() and "NO_COLOR" not in os.environ

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def out(self, text: str = "") -> None:
        """A result line on stdout (never silenced: it is what was asked for)."""
        print(text, flush=True)

    def info(self, text: str) -> None:
        """A progress line on stderr."""
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def detail(self, text: str) -> None:
        """Extra progress shown only with --verbose."""
        if self.verbose and not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def progress(self, text: str) -> None:
        """A status line rewritten in place on a terminal (a spinner); "" clears it. Nothing elsewhere."""
        if self.quiet or not sys.stderr.isatty():
            return
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()

    # Warnings and errors go through ``printable``: they can quote what an agent wrote (git
    # names the files of a branch session's copy in its messages, C1 codes as they are).
    def warn(self, text: str) -> None:
        print(self._paint("Warning:", "33") + " " + printable(text), file=sys.stderr, flush=True)

    def error(self, message: str, hint: str | None = None) -> None:
        print(self._paint("Error:", "31") + " " + printable(message), file=sys.stderr, flush=True)
        if hint:
            print(f"Hint: {printable(hint)}", file=sys.stderr, flush=True)
