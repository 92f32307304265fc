"""Saved sessions: ids, bounded and atomic saves, generations, lookup by workspace."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest

from coi.sessions import state
from coi.config import Sessions
from coi.errors import ConfigError, NotFoundError, UsageError
from coi.tools import TOOLS
from fake_incus import FakeFiles

pytestmark = pytest.mark.unit
CLAUDE = TOOLS["claude"]
HOME = f"{state.CODE_HOME}/.claude"


def agent(files: dict[str, bytes] | None = None) -> FakeFiles:
    """A container whose agent left ``files`` (paths relative to its state dir)."""
    tree = FakeFiles()
    tree.dir(HOME)
    for rel, content in (files or {}).items():
        tree.file(f"{HOME}/{rel}", content)
    return tree


class Interrupted(FakeFiles):
    """Dies (Ctrl-C) after a few reads, half-way through a save."""

    def pull_file(self, name, path, *, max_bytes=None):
        if len(self.pulled) >= 2:
            raise KeyboardInterrupt
        return super().pull_file(name, path, max_bytes=max_bytes)


def meta(workspace: str = "/w", sid: str | None = None) -> dict:
    return {"session_id": sid or str(uuid.uuid4()), "container_name": "coi-x-1", "persistent": False,
            "workspace": workspace, "tool": "claude", "slot": 1, "image": "coi"}


def save(client, root: Path, m: dict, **kw) -> state.SavedSession:
    return state.save_session(client, "c", tool=CLAUDE, sessions_dir=root, metadata=m, **kw)


def tree_of(path: Path) -> dict[str, tuple[bytes | None, int]]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.lstat().st_mode))
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("value", ["../../etc", "", "abc", "0b6c/../x", "1" * 36])
def test_non_uuid_ids_are_refused(value):
    with pytest.raises(UsageError, match="not a session id"):
        state.check_session_id(value)


# ---- limits ---------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 << 20), ("1GiB", 1 << 30), ("1KiB", 1024), ("10kB", 10_000), ("2MB", 2_000_000),
    ("3GB", 3_000_000_000), ("100", 100), ("100B", 100), (" 2 MiB ", 2 << 20), ("1.5KiB", 1536),
    ("1mib", 1 << 20), ("1KB", 1000),
])
def test_sizes(text, size):
    assert state.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "abc", "-1MiB", "0", "0B", "1TiB", "1 MiB x", "1e3", "0.1B", "1,5MiB"])
def test_bad_sizes_are_one_line_config_errors(text):
    with pytest.raises(ConfigError) as caught:
        state.parse_size(text)
    assert "sessions.max_size" in caught.value.message and "\n" not in caught.value.message
    assert "MiB" in caught.value.hint


def test_limits_come_from_the_sessions_config():
    limits = state.save_limits(Sessions(keep=2, max_size="1MB", max_files=7, max_depth=3))
    assert limits == state.SaveLimits(max_size=1_000_000, max_files=7, max_depth=3, keep=2)
    assert state.save_limits(Sessions()) == state.SaveLimits()
    with pytest.raises(ConfigError):
        state.save_limits(Sessions(max_size="lots"))


@pytest.mark.parametrize("name, problem", [
    ("projects", None), (".credentials.json", None), ("é" * 127, None), ("a" * 255, None),
    ("", "is empty"), (".", "is . or .."), ("..", "is . or .."), ("a/b", "has a '/'"), ("/", "has a '/'"),
    ("a\0b", "NUL"), ("a" * 256, "longer than 255 bytes"), ("é" * 128, "longer than 255 bytes"),
    ("\ud800", "not UTF-8"), (None, "is empty"), (7, "is empty"),
])
def test_entry_names(name, problem):
    found = state.name_problem(name)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize("kind, mode, saved", [
    ("file", 0o644, 0o600), ("file", 0o600, 0o600), ("file", 0o4755, 0o700), ("file", 0o2711, 0o700),
    ("file", 0o777, 0o700), ("file", 0o7666, 0o600), ("file", 0o011, 0o600), ("file", 0o000, 0o600),
    ("directory", 0o1777, 0o700), ("directory", 0o2755, 0o700), ("directory", 0o000, 0o700),
])
def test_modes_are_the_users_alone(kind, mode, saved):
    assert state.saved_mode(kind, mode) == saved


# ---- one save -------------------------------------------------------------------

def test_save_is_atomic_and_private(tmp_path):
    tree = agent({"projects/t.jsonl": b"{}", ".credentials.json": b"secret"})
    m = meta()
    saved = save(tree, tmp_path / "coi", m)
    assert saved.path.stat().st_mode & 0o777 == 0o700
    assert (saved.path / "state" / "projects" / "t.jsonl").exists()
    assert not (saved.path / "state" / ".credentials.json").exists()
    assert f"{HOME}/.credentials.json" not in tree.pulled  # the secret is never even read
    data = json.loads((saved.path / "metadata.json").read_text())
    assert data["session_id"] == m["session_id"] and data["saved_at"].endswith("Z")


def test_a_copy_keeps_content_and_masks_modes(tmp_path):
    tree = agent()
    tree.file(f"{HOME}/run.sh", b"#!/bin/sh\n", 0o4755)
    tree.file(f"{HOME}/shared", b"x", 0o666)
    tree.dir(f"{HOME}/open", 0o1777)
    tree.file(f"{HOME}/open/f", b"y", 0o640)
    tree.link(f"{HOME}/link", "/etc/shadow")
    saved = save(tree, tmp_path, meta())
    assert tree_of(saved.path / "state") == {
        "open": (None, 0o700), "open/f": (b"y", 0o600), "run.sh": (b"#!/bin/sh\n", 0o700), "shared": (b"x", 0o600)}
    assert stat.S_IMODE((saved.path / "state").stat().st_mode) == 0o700


def test_no_state_in_the_container_saves_an_empty_state(tmp_path):
    saved = save(FakeFiles(), tmp_path, meta())
    assert (saved.path / "state").is_dir() and not list((saved.path / "state").iterdir())


@pytest.mark.parametrize("limits, kept, warning", [
    (state.SaveLimits(max_size=10), {"a": b"12345", "b": b"1234"}, None),
    (state.SaveLimits(max_size=9), {"a": b"12345", "b": b"1234"}, None),
    (state.SaveLimits(max_size=8), {"a": b"12345"}, "sessions.max_size (8 bytes) reached"),
    (state.SaveLimits(max_size=4), {"b": b"1234"}, "sessions.max_size (4 bytes) reached: files of the agent's "
                                                    "state left out of the save, the first 'a'"),
    (state.SaveLimits(max_files=1), {"a": b"12345"}, "sessions.max_files (1) reached"),
])
def test_limits_of_one_save(tmp_path, limits, kept, warning):
    warnings: list[str] = []
    saved = save(agent({"a": b"12345", "b": b"1234"}), tmp_path, meta(), limits=limits, warn=warnings.append)
    assert {k: v for k, (v, _) in tree_of(saved.path / "state").items()} == kept
    assert [w for w in warnings if warning and warning in w] == ([warnings[0]] if warning else [])
    assert len(warnings) == (1 if warning else 0)


def test_depth_is_bounded(tmp_path):
    tree = agent()
    tree.file(f"{HOME}/a/b/c/d/deep", b"x")
    tree.file(f"{HOME}/a/top", b"t")
    warnings: list[str] = []
    saved = save(tree, tmp_path, meta(), limits=state.SaveLimits(max_depth=2), warn=warnings.append)
    assert sorted(tree_of(saved.path / "state")) == ["a", "a/b", "a/top"]
    assert warnings == ["sessions.max_depth (2) reached: 1 directories saved without their contents, the first 'a/b'"]
    assert f"{HOME}/a/b/c" not in tree.pulled


def test_a_failing_entry_is_left_out_and_the_save_goes_on(tmp_path):
    tree = agent({"good": b"ok"})
    tree.listing(HOME, ["gone", "good", "..", "a/b"])  # 'gone' is listed but cannot be read
    warnings: list[str] = []
    saved = save(tree, tmp_path, meta(), warn=warnings.append)
    assert tree_of(saved.path / "state") == {"good": (b"ok", 0o600)}
    assert len(warnings) == 3 and any("'gone'" in w and "not found" in w for w in warnings)


def test_warnings_about_single_entries_are_few(tmp_path):
    tree = agent({"good": b"ok"})
    tree.listing(HOME, ["good"] + ["x/" + str(i) for i in range(50)])
    warnings: list[str] = []
    save(tree, tmp_path, meta(), warn=warnings.append)
    assert len(warnings) == 11 and warnings[-1] == "40 more entries of the agent's state were left out"


# ---- generations ------------------------------------------------------------------

def test_the_last_saves_are_kept_as_generations(tmp_path):
    m = meta()
    for n in range(1, 6):
        saved = save(agent({"n": str(n).encode()}), tmp_path, m, limits=state.SaveLimits(keep=3))
    assert (saved.path / "state" / "n").read_text() == "5"  # the contract's layout: the newest in place
    gens = state.generations(saved)
    assert [(g.generation, (g.path / "state" / "n").read_text()) for g in gens] == [(1, "5"), (2, "4"), (3, "3")]
    assert sorted(p.name for p in (saved.path / state.GENERATIONS).iterdir()) == ["2", "3"]
    assert all(g.metadata["saved_at"] and g.session_id == m["session_id"] for g in gens)
    assert stat.S_IMODE((saved.path / state.GENERATIONS).stat().st_mode) == 0o700
    assert [p.name for p in saved.path.parent.iterdir()] == [m["session_id"]]  # nothing left behind
    assert state.saved_sessions(tmp_path) == [saved]  # generations are not sessions of their own
    assert saved.size() == sum(g.generation_size() for g in gens)


@pytest.mark.parametrize("keep, numbers", [(1, [1]), (2, [1, 2]), (4, [1, 2, 3])])
def test_keep(tmp_path, keep, numbers):
    m = meta()
    for n in range(3):
        saved = save(agent({"n": str(n).encode()}), tmp_path, m, limits=state.SaveLimits(keep=keep))
    assert [g.generation for g in state.generations(saved)] == numbers
    assert (saved.path / state.GENERATIONS).exists() == (keep > 1)


def test_a_generation_can_be_picked(tmp_path):
    m = meta("/ws")
    for n in range(3):
        save(agent({"n": str(n).encode()}), tmp_path, m)
    for generation, content in ((1, "2"), (2, "1"), (3, "0")):
        for sid in (m["session_id"], None):
            picked = state.find_session(tmp_path, "claude", session_id=sid, workspace=Path("/ws"),
                                        generation=generation)
            assert (picked.path / "state" / "n").read_text() == content and picked.generation == generation
    with pytest.raises(NotFoundError, match="has no generation 4 \\(it has 1, 2, 3\\)"):
        state.find_session(tmp_path, "claude", session_id=m["session_id"], workspace=Path("/ws"), generation=4)


@pytest.mark.parametrize("before, after, newest, generations, warned", [
    # (files of the previous save or None, files of the new one) -> newest's files, generations, warned
    ({"a": b"1"}, {}, {"a": b"1"}, 1, True),  # an agent that wipes its state wipes no save
    (None, {}, {}, 1, False),  # a session that never wrote state is saved all the same
    ({}, {}, {}, 1, False),  # an empty save is no generation worth keeping
    ({}, {"b": b"2"}, {"b": b"2"}, 1, False),
    ({"a": b"1"}, {"b": b"2"}, {"b": b"2"}, 2, False),
])
def test_an_empty_state_never_replaces_a_save_with_files(tmp_path, before, after, newest, generations, warned):
    m = meta()
    if before is not None:
        first = save(agent(before), tmp_path, m)
    warnings: list[str] = []
    saved = save(agent(after), tmp_path, m, warn=warnings.append)
    assert {k: v for k, (v, _) in tree_of(saved.path / "state").items()} == newest
    assert len(state.generations(saved)) == generations
    assert bool(warnings) == warned
    if warned:
        assert saved.metadata == first.metadata and "is empty" in warnings[0]
        assert "stays the newest" in warnings[0]


def test_interrupted_save_keeps_the_previous_copy(tmp_path, monkeypatch):
    m = meta()
    save(agent({"old": b"older"}), tmp_path / "coi", m)
    first = save(agent({"old": b"good"}), tmp_path / "coi", m)
    before = tree_of(first.path)
    broken = Interrupted()  # dies while copying out of the container
    broken.dir(HOME)
    broken.file(f"{HOME}/a", b"1")
    broken.file(f"{HOME}/b", b"2")
    with pytest.raises(KeyboardInterrupt):
        save(broken, tmp_path / "coi", m)
    assert tree_of(first.path) == before
    links: list[str] = []

    def dies_on_the_second_file(src: str, dst: str) -> None:  # while the generations are carried over
        links.append(src)
        if len(links) == 2:
            raise KeyboardInterrupt
        state.shutil.copy2(src, dst)
    monkeypatch.setattr(state, "_link_or_copy", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        save(agent({"new": b"1"}), tmp_path / "coi", m)
    assert tree_of(first.path) == before
    assert (first.path / "state" / "old").read_text() == "good"
    assert [p.name for p in first.path.parent.iterdir()] == [m["session_id"]]  # no temp dirs left


def test_latest_is_per_workspace_and_ids_must_exist(tmp_path):
    mine = save(agent(), tmp_path, meta("/mine"))
    save(agent(), tmp_path, meta("/other"))
    (state.sessions_root(tmp_path, "claude") / ".hidden").mkdir()
    assert state.find_session(tmp_path, "claude", session_id=None, workspace=Path("/mine")).path == mine.path
    with pytest.raises(NotFoundError):
        state.find_session(tmp_path, "claude", session_id=None, workspace=Path("/nowhere"))
    with pytest.raises(NotFoundError):
        state.find_session(tmp_path, "claude", session_id=str(uuid.uuid4()), workspace=Path("/mine"))
    assert len(state.saved_sessions(tmp_path)) == 2


def test_a_saved_session_is_deleted_with_its_generations(tmp_path):
    m = meta()
    for n in range(3):
        saved = save(agent({"n": str(n).encode()}), tmp_path, m)
    state.delete_saved(saved)
    assert not saved.path.exists() and state.saved_sessions(tmp_path) == []
