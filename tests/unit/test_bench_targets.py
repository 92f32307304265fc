"""Every phase the benchmark times names a function coi has: a rename must fail here,
not silently drop the phase from docs/benchmarks.md."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PHASES = Path(__file__).resolve().parents[2] / "bench" / "phases.py"


def _phases():
    spec = importlib.util.spec_from_file_location("bench_phases", PHASES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # only time and sys: nothing of coi is imported
    return module


PROBE = _phases()


@pytest.mark.parametrize("module_name, attr", [(m, a) for m, targets in PROBE.TARGETS.items()
                                               for a, _, _ in targets if a != "*"])
def test_every_target_exists(module_name, attr):
    module = importlib.import_module(module_name)
    assert PROBE.resolve(module, attr)[2] is not None, f"{module_name}:{attr}"


def test_every_target_module_exists():
    for name in PROBE.TARGETS:
        importlib.import_module(name)
