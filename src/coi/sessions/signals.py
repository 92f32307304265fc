"""Signals around work with the daemon: held while one request runs, turned into an
interruption during set-up, ignored while a clean-up must run to its end."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl+C, SIGTERM and SIGHUP while the daemon does one thing; they act right after.

    An operation interrupted half-way (request sent, answer unread) would leave
    its result unknown; held, the interruption finds a known state to undo.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def _signal_handlers(handler, signals=_SIGNALS) -> Iterator[None]:
    """Install ``handler`` for ``signals`` for the block, then put the old ones back."""
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def signals_ignored():
    """Ignore Ctrl+C, SIGTERM and SIGHUP for the block: a clean-up that must not be cut short."""
    return _signal_handlers(signal.SIG_IGN)


def interruptible():
    """SIGTERM and SIGHUP (terminal closed) interrupt set-up the way Ctrl+C does."""
    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt
    return _signal_handlers(interrupt, (signal.SIGTERM, signal.SIGHUP))
