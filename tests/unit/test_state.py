"""Saved sessions: ids, atomic saves, lookup by workspace."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from coi import state
from coi.errors import NotFoundError, UsageError
from coi.tools import TOOLS

pytestmark = pytest.mark.unit
CLAUDE = TOOLS["claude"]


class FakeClient:
    """pull_tree copies a local tree, or fails half-way like a dying daemon."""

    def __init__(self, source: Path, fail: bool = False) -> None:
        self.source, self.fail = source, fail

    def pull_tree(self, name: str, remote: str, local: Path) -> None:
        local.mkdir(parents=True)
        (local / "partial").write_text("half")
        if self.fail:
            raise KeyboardInterrupt
        for p in self.source.rglob("*"):
            target = local / p.relative_to(self.source)
            if p.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(p.read_bytes())


def meta(workspace: str = "/w", sid: str | None = None) -> dict:
    return {"session_id": sid or str(uuid.uuid4()), "container_name": "coi-x-1", "persistent": False,
            "workspace": workspace, "tool": "claude", "slot": 1, "image": "coi"}


@pytest.mark.parametrize("value", ["../../etc", "", "abc", "0b6c/../x", "1" * 36])
def test_non_uuid_ids_are_refused(value):
    with pytest.raises(UsageError, match="not a session id"):
        state.check_session_id(value)


def test_save_is_atomic_and_private(tmp_path):
    src = tmp_path / "src"
    (src / "projects").mkdir(parents=True)
    (src / "projects" / "t.jsonl").write_text("{}")
    (src / ".credentials.json").write_text("secret")
    m = meta()
    saved = state.save_session(FakeClient(src), "c", tool=CLAUDE, sessions_dir=tmp_path / "coi", metadata=m)
    assert saved.path.stat().st_mode & 0o777 == 0o700
    assert (saved.path / "state" / "projects" / "t.jsonl").exists()
    assert not (saved.path / "state" / ".credentials.json").exists()
    data = json.loads((saved.path / "metadata.json").read_text())
    assert data["session_id"] == m["session_id"] and data["saved_at"].endswith("Z")


def test_interrupted_save_keeps_the_previous_copy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_text("good")
    m = meta()
    first = state.save_session(FakeClient(src), "c", tool=CLAUDE, sessions_dir=tmp_path / "coi", metadata=m)
    with pytest.raises(KeyboardInterrupt):
        state.save_session(FakeClient(src, fail=True), "c", tool=CLAUDE, sessions_dir=tmp_path / "coi", metadata=m)
    assert (first.path / "state" / "old").read_text() == "good"
    assert [p.name for p in first.path.parent.iterdir()] == [m["session_id"]]  # no temp dirs left


def test_latest_is_per_workspace_and_ids_must_exist(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    mine = state.save_session(FakeClient(src), "c", tool=CLAUDE, sessions_dir=tmp_path, metadata=meta("/mine"))
    state.save_session(FakeClient(src), "c", tool=CLAUDE, sessions_dir=tmp_path, metadata=meta("/other"))
    assert state.find_session(tmp_path, "claude", session_id=None, workspace=Path("/mine")).path == mine.path
    with pytest.raises(NotFoundError):
        state.find_session(tmp_path, "claude", session_id=None, workspace=Path("/nowhere"))
    with pytest.raises(NotFoundError):
        state.find_session(tmp_path, "claude", session_id=str(uuid.uuid4()), workspace=Path("/mine"))
