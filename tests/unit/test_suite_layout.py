"""The suite itself: pytest imports test files by their basename (rootdir-relative
packages are not used here), so two files of one name in two tiers break collection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def test_every_test_file_has_a_basename_of_its_own():
    names = Counter(p.name for p in Path(__file__).parents[1].rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
