"""Timing whole processes: one run, repeated runs, and their statistics.

Everything measured here is wall time of real processes (or of a fixed
sequence of them), taken with ``time.perf_counter`` around ``Popen`` and
``wait``. Nothing sleeps: waiting for an event is a poll with a deadline.
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence


class BenchError(Exception):
    """A measured step failed; the message says which command and why."""


@dataclass(frozen=True)
class Proc:
    """The result of one process: exit code, output and how long it took."""

    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> Proc:
        if self.code != 0:
            last = (self.stderr.strip() or self.stdout.strip()).splitlines()[-3:]
            raise BenchError(f"{shlex.join(self.argv)} exited {self.code}: {' / '.join(last)}")
        return self


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
        stdin: str | None = None, timeout: float = 300) -> Proc:
    """Run one process to its end and time it (output captured, never a terminal)."""
    start = time.perf_counter()
    proc = subprocess.run(list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    return Proc(tuple(argv), proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def poll(check: Callable[[], bool], *, timeout: float, what: str) -> int:
    """Call ``check`` back to back until it is true (each call is a process, tens of ms).

    Returns the number of calls; raises BenchError at the deadline.
    """
    deadline = time.perf_counter() + timeout
    calls = 0
    while True:
        calls += 1
        if check():
            return calls
        if time.perf_counter() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


@dataclass
class Series:
    """Samples (seconds) of one measured thing; warm-up runs are never in here."""

    label: str
    command: str
    samples: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, float | int | None]:
        if not self.samples:
            return {"n": 0, "min": None, "median": None, "max": None}
        return {"n": len(self.samples), "min": min(self.samples),
                "median": statistics.median(self.samples), "max": max(self.samples)}

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def to_json(self) -> dict[str, object]:
        return {"command": self.command, **self.stats(), "samples": [round(s, 4) for s in self.samples]}


def compare(coi: Callable[[], float], floor: Callable[[], float] | None, *, coi_series: Series,
            floor_series: Series | None, repeat: int, warmup: int) -> None:
    """Run ``coi`` and ``floor`` alternately (the order flips every round, so drift
    hits both alike); the first ``warmup`` rounds are thrown away."""
    for i in range(warmup + repeat):
        pair: list[tuple[Callable[[], float], Series]] = [(coi, coi_series)]
        if floor is not None and floor_series is not None:
            pair.append((floor, floor_series))
        if i % 2:
            pair.reverse()
        for func, series in pair:
            seconds = func()
            if i >= warmup:
                series.samples.append(seconds)
