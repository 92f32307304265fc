"""wait_for: the one poll helper, run against a fake clock (no real waiting)."""

from __future__ import annotations

import types
from typing import Any, Callable

import pytest

import coi.wait
from coi.errors import CoiError
from coi.wait import wait_for

pytestmark = pytest.mark.unit

START = 1000.0


class FakeClock:
    """Stands in for ``time`` inside coi.wait: sleeping only moves the clock."""

    def __init__(self) -> None:
        self.now = START
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(coi.wait, "time", types.SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep))
    return fake


def answers(*values: Any) -> Callable[[], Any]:
    """A check returning ``values`` in turn, then the last one forever."""
    queue = list(values)
    return lambda: queue.pop(0) if len(queue) > 1 else queue[0]


def never() -> bool:
    return False


def test_returns_the_first_true_value(clock):
    assert wait_for(answers(None, 0, "", [], {"ip": "10.195.0.5"}, "later"), timeout=5, what="x") == {
        "ip": "10.195.0.5"}
    assert len(clock.sleeps) == 4


def test_an_immediate_answer_never_sleeps(clock):
    assert wait_for(lambda: "ready", timeout=5, what="x") == "ready"
    assert clock.sleeps == []


@pytest.mark.parametrize(("timeout", "text"), [(2, "2s"), (0.5, "0.5s"), (60, "60s")])
def test_raises_at_the_deadline_naming_what(clock, timeout, text):
    with pytest.raises(CoiError) as info:
        wait_for(never, timeout=timeout, what="the Incus daemon to answer", hint="see /var/log/incus")
    assert info.value.message == f"timed out after {text} waiting for the Incus daemon to answer"
    assert info.value.hint == "see /var/log/incus"
    assert clock.now == pytest.approx(START + timeout)


def test_checks_once_more_at_the_deadline(clock):
    assert wait_for(lambda: clock.now >= START + 1, timeout=1, what="x") is True
    assert clock.now == pytest.approx(START + 1)


def test_backs_off_up_to_max_interval(clock):
    with pytest.raises(CoiError):
        wait_for(never, timeout=2, what="x", first_interval=0.01, max_interval=0.25)
    assert clock.sleeps[:8] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25, 0.25])
    assert max(clock.sleeps) == 0.25
    assert clock.sleeps == sorted(clock.sleeps[:-1]) + clock.sleeps[-1:]  # only the last is cut short


@pytest.mark.parametrize(("timeout", "check_cost", "first", "most"), [
    (1.0, 0.0, 0.01, 0.25),
    (1.0, 0.07, 0.01, 0.25),
    (0.3, 0.2, 0.05, 1.0),
    (5.0, 0.0, 0.3, 2.0),
    (0.001, 0.0, 0.01, 0.25),
    (1.0, 1.5, 0.01, 0.25),  # the check itself outlasts the deadline
])
def test_never_sleeps_past_the_deadline(clock, timeout, check_cost, first, most):
    deadline = START + timeout
    woke: list[float] = []

    def slow_check() -> bool:
        if clock.sleeps:
            woke.append(clock.now)
        clock.now += check_cost
        return False

    with pytest.raises(CoiError):
        wait_for(slow_check, timeout=timeout, what="x", first_interval=first, max_interval=most)
    assert all(t <= deadline + 1e-9 for t in woke), (woke, deadline)
    assert all(s <= most for s in clock.sleeps)


def test_a_failing_check_propagates(clock):
    def broken() -> bool:
        raise CoiError("container c1 stopped")

    with pytest.raises(CoiError, match="container c1 stopped"):
        wait_for(broken, timeout=5, what="x")
