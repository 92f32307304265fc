"""A hostile agent against session saves: whatever it leaves in its state dir is read
back by coi on the host when the session is saved.

The agent is root in its container. It may leave files of any size, count,
depth, name and mode, put a directory where a credential file would be, or
wipe its state to wipe the saves. Most cases play against a fake Incus daemon
(the real client over a unix socket); one plays against the real daemon
(``real`` in its name: ``-k 'not real'`` leaves it out).
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest


from coi.sessions import state  # noqa: E402
from coi.incus import Incus  # noqa: E402
from coi.tools import TOOLS  # noqa: E402
from fake_incus import FakeDaemon, FakeFiles, error  # noqa: E402

CLAUDE = TOOLS["claude"]
HOME = f"{state.CODE_HOME}/.claude"
FILES = "/1.0/instances/c1/files"


@pytest.fixture
def container(daemon: FakeDaemon) -> FakeFiles:
    """The container's files, served by the fake daemon; the agent's state dir exists."""
    files = FakeFiles()
    files.dir(HOME)
    daemon.on("GET", FILES, files)
    return files


class Saves:
    """Saves of one session into a sessions dir, with the warnings coi gave."""

    def __init__(self, client: Incus, root: Path) -> None:
        self.client, self.root, self.warnings = client, root, []
        self.metadata = {"session_id": str(uuid.uuid4()), "container_name": "c1", "persistent": False,
                         "workspace": "/w", "tool": "claude", "slot": 1, "image": "coi"}

    def __call__(self, **limits) -> state.SavedSession:
        self.warnings.clear()
        return state.save_session(self.client, "c1", tool=CLAUDE, sessions_dir=self.root, metadata=self.metadata,
                                  limits=state.SaveLimits(**limits), warn=self.warnings.append)


@pytest.fixture
def saves(client: Incus, tmp_path: Path) -> Saves:
    return Saves(client, tmp_path / "coi")


def entries(path: Path) -> dict[str, os.stat_result]:
    return {str(p.relative_to(path)): p.lstat() for p in sorted(path.rglob("*"))}


def tree_size(path: Path) -> int:
    return sum(st.st_size for st in entries(path).values() if stat.S_ISREG(st.st_mode))


def assert_private(path: Path) -> None:
    """Only files and directories, with no bit outside the owner's, none of them setuid."""
    for rel, st in entries(path).items():
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) & ~0o700 == 0, (rel, oct(st.st_mode))


# ---- size, count and depth ---------------------------------------------------------

def test_files_over_the_size_limit_are_never_read(container, saves, daemon):
    container.file(f"{HOME}/projects/t.jsonl", b'{"text": "apples"}\n')
    container.file(f"{HOME}/a-huge", announced=1 << 40)  # 1 TiB announced, never sent
    container.file(f"{HOME}/b-big", b"x" * (3 << 20))  # 3 MiB, sent in full by the daemon
    container.file(f"{HOME}/c-fits", b"y" * 1000)
    saved = saves(max_size=1 << 20)
    assert sorted(entries(saved.path / "state")) == ["c-fits", "projects", "projects/t.jsonl"]
    assert tree_size(saved.path / "state") <= 1 << 20
    assert len(saves.warnings) == 1 and "sessions.max_size (1048576 bytes) reached" in saves.warnings[0]
    assert "'a-huge'" in saves.warnings[0]
    # A later save still works on the same client: the refused bodies left no stray bytes.
    assert saves(max_size=1 << 20).path == saved.path


def test_the_total_stops_the_copy(container, saves):
    for n in range(50):
        container.file(f"{HOME}/f{n:02}", b"z" * 100)
    saved = saves(max_size=1000)
    assert len(entries(saved.path / "state")) == 10 and tree_size(saved.path / "state") == 1000
    assert len(saves.warnings) == 1 and "the first 'f10'" in saves.warnings[0]
    assert f"{HOME}/f11" not in container.pulled  # nothing is read once no byte is left


def test_a_directory_of_100k_entries_is_cut_to_max_files(container, saves):
    container.listing(f"{HOME}/cache", [f"e{n:06}" for n in range(100_000)])
    for n in range(300):
        container.file(f"{HOME}/cache/e{n:06}", b"c")
    saved = saves(max_files=200)
    assert len(entries(saved.path / "state")) == 200
    assert len(container.pulled) <= 202  # the state dir, 200 entries: the listing is not walked further
    assert saves.warnings == ["sessions.max_files (200) reached: the rest of the agent's state is left out"]


def test_deep_nesting_is_cut_to_max_depth(container, saves):
    container.file(HOME + "/d" * 300 + "/bottom", b"b")
    container.file(f"{HOME}/top", b"t")
    saved = saves()
    deepest = max(entries(saved.path / "state"), key=lambda rel: rel.count("/"))
    assert deepest.count("/") + 1 == 32 and "top" in entries(saved.path / "state")
    assert len(saves.warnings) == 1 and "sessions.max_depth (32) reached" in saves.warnings[0]
    assert len(container.pulled) == 34  # the state dir, 32 levels of d, top: nothing below the limit


def test_paths_too_long_for_the_host_are_left_out(container, saves):
    long = "n" * 255
    container.file(HOME + f"/{long}" * 20 + "/f", b"x")  # 5 KB of path: more than the host's PATH_MAX
    container.file(f"{HOME}/ok", b"ok")
    saved = saves()
    assert "ok" in entries(saved.path / "state")
    assert len(saves.warnings) == 1 and "left out" in saves.warnings[0]


# ---- modes, names, links -------------------------------------------------------------

def test_modes_are_masked_to_the_users(container, saves):
    container.file(f"{HOME}/suid-root-shell", b"\x7fELF", 0o4755)
    container.file(f"{HOME}/sgid", b"g", 0o2777)
    container.file(f"{HOME}/world-writable", b"w", 0o666)
    container.file(f"{HOME}/unreadable", b"u", 0o000)
    container.dir(f"{HOME}/sticky", 0o1777)
    container.dir(f"{HOME}/setgid-dir", 0o2775)
    container.file(f"{HOME}/setgid-dir/inner", b"i", 0o6755)
    saved = saves()
    modes = {rel: stat.S_IMODE(st.st_mode) for rel, st in entries(saved.path / "state").items()}
    assert modes == {"suid-root-shell": 0o700, "sgid": 0o700, "world-writable": 0o600, "unreadable": 0o600,
                     "sticky": 0o700, "setgid-dir": 0o700, "setgid-dir/inner": 0o700}
    assert_private(saved.path)


def test_links_and_special_files_are_not_copied(container, saves):
    container.link(f"{HOME}/passwd", "/etc/passwd")
    container.link(f"{HOME}/up", "../../../../../../home")
    container.special(f"{HOME}/fifo", "fifo")
    container.special(f"{HOME}/dev-sda", "block")
    container.file(f"{HOME}/real-file", b"r")
    saved = saves()
    assert list(entries(saved.path / "state")) == ["real-file"]


def test_a_linked_state_dir_saves_nothing(daemon, saves):
    files = FakeFiles()
    files.link(HOME, "/")
    daemon.on("GET", FILES, files)
    saved = saves()
    assert list(entries(saved.path / "state")) == [] and "not a directory" in saves.warnings[0]


BAD_NAMES = ["..", ".", "", "../../../../etc/cron.d/x", "a/b", "x" * 256, "nul\0byte", "é" * 200]


def test_bad_names_are_skipped_and_never_requested(container, saves):
    container.listing(HOME, BAD_NAMES + ["good", "\x1b]0;pwned\x07", "\x1b[2Jmissing"])
    container.file(f"{HOME}/good", b"g")
    container.file(f"{HOME}/\x1b]0;pwned\x07", b"a valid name, if an odd one")
    saved = saves()
    assert sorted(entries(saved.path / "state")) == sorted(["good", "\x1b]0;pwned\x07"])
    assert all(".." not in p.split("/") and "\0" not in p for p in container.pulled)
    assert len(saves.warnings) == len(BAD_NAMES) + 1  # each bad name, and the missing file
    assert not any("\x1b" in w or "\0" in w or "\x07" in w for w in saves.warnings)  # printed escaped
    assert all(len(w) < 400 for w in saves.warnings)


# ---- credentials ---------------------------------------------------------------------

def test_the_codex_login_made_from_the_key_is_never_saved(client, container, tmp_path):
    """Codex signs in with the key it was given into ~/.codex/auth.json; the agent may also
    plant a login there. Neither is read or kept on the host."""
    codex_home = f"{state.CODE_HOME}/.codex"
    container.file(f"{codex_home}/auth.json", b'{"OPENAI_API_KEY": "sk-secret"}')
    container.file(f"{codex_home}/sessions/s.jsonl", b"{}")
    metadata = {"session_id": str(uuid.uuid4()), "container_name": "c1", "persistent": False,
                "workspace": "/w", "tool": "codex", "slot": 1, "image": "coi"}
    saved = state.save_session(client, "c1", tool=TOOLS["codex"], sessions_dir=tmp_path / "coi", metadata=metadata)
    assert sorted(entries(saved.path / "state")) == ["sessions", "sessions/s.jsonl"]
    assert f"{codex_home}/auth.json" not in container.pulled


@pytest.mark.parametrize("plant", ["directory", "file", "link", "deep-directory"])
def test_whatever_sits_at_the_credentials_path_is_left_out(container, saves, plant):
    where = f"{HOME}/.credentials.json"
    if plant == "directory":
        container.dir(where, 0o777)
        container.file(f"{where}/inner", b"i")
    elif plant == "deep-directory":
        container.file(f"{where}/a/b/c", b"c")
    elif plant == "file":
        container.file(where, b'{"token": "secret"}')
    else:
        container.link(where, "/etc/shadow")
    container.file(f"{HOME}/projects/t.jsonl", b"{}")
    for _ in range(3):  # every later save, and the clean-up, still work
        saved = saves()
        assert sorted(entries(saved.path / "state")) == ["projects", "projects/t.jsonl"]
        assert saves.warnings == []
    assert not any(p.startswith(where) for p in container.pulled)
    state.delete_saved(saved)
    assert state.saved_sessions(saves.root) == []


# ---- wiping the saves ----------------------------------------------------------------

def wipe(files: FakeFiles, how: str) -> None:
    for path in [p for p in files.nodes if p.startswith(HOME + "/")]:
        del files.nodes[path]
    files.nodes[HOME].entries.clear()
    if how == "missing":
        del files.nodes[HOME]
        files.nodes[state.CODE_HOME].entries.clear()
    elif how == "a-file":
        files.special(HOME, "file")
    elif how == "a-link":
        files.special(HOME, "symlink", b"/")
    elif how == "empty-dirs":
        files.dir(f"{HOME}/projects/-workspace")
    elif how == "only-too-big":
        files.file(f"{HOME}/huge", announced=1 << 40)


@pytest.mark.parametrize("how", ["empty", "missing", "a-file", "a-link", "empty-dirs", "only-too-big"])
def test_an_agent_that_wipes_its_state_wipes_no_save(container, saves, how):
    container.file(f"{HOME}/projects/-workspace/t.jsonl", b'{"text": "apples"}\n')
    good = saves()
    wipe(container, how)
    for _ in range(4):  # more saves than are kept
        saved = saves()
        assert saved.metadata == good.metadata
        assert (saved.path / "state" / "projects" / "-workspace" / "t.jsonl").read_bytes() == b'{"text": "apples"}\n'
        assert any("stays the newest" in w for w in saves.warnings)
    assert [g.generation for g in state.generations(saved)] == [1]


def test_older_saves_survive_a_bad_newest_one(container, saves):
    container.file(f"{HOME}/projects/t.jsonl", b"good")
    saves()
    container.file(f"{HOME}/projects/t.jsonl", b"junk written by the agent")
    saved = saves()
    older = state.find_session(saves.root, "claude", session_id=saved.session_id, workspace=Path("/w"),
                               generation=2)
    assert (older.path / "state" / "projects" / "t.jsonl").read_bytes() == b"good"
    assert_private(saved.path)


# ---- the command line ------------------------------------------------------------------

@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, daemon: FakeDaemon) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    for name in [n for n in os.environ if n.startswith("COI_") or n.startswith("XDG_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("INCUS_SOCKET", daemon.path)
    return home


def test_coi_info_lists_the_generations(user_home, client, daemon, container, capsys):
    from coi.cli.main import main

    daemon.on("GET", "/1.0/instances/c1", error("Not Found", 404))
    saves = Saves(client, user_home / ".coi")
    for text in (b"one", b"two", b"three, a longer one"):
        container.file(f"{HOME}/t", text)
        saves()
    sid = saves.metadata["session_id"]
    assert main(["info", sid]) == 0
    gens = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Generation ")]
    newest = state.find_session(saves.root, "claude", session_id=sid, workspace=Path("/w"))
    assert gens == [f"Generation {g.generation}: saved at {g.metadata['saved_at']}, {g.generation_size()} bytes"
                    for g in state.generations(newest)]
    assert len(gens) == 3 and newest.generation_size() > state.generations(newest)[1].generation_size()


@pytest.mark.parametrize("args", [["shell", "--generation", "2"], ["shell", "--resume", "--generation", "0"]])
def test_generation_needs_resume(user_home, args, capsys):
    from coi.cli.main import main

    assert main(args) == 2
    assert "--generation N picks a save to resume" in capsys.readouterr().err


def test_a_bad_max_size_is_one_line_before_a_session_starts(user_home, capsys):
    from coi.cli.main import main

    cfg = user_home / ".config" / "coi"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('[sessions]\nmax_size = "huge"\n')
    assert main(["shell", "--background"]) == 1
    err = capsys.readouterr().err
    assert "Error: sessions.max_size = 'huge' is not a size" in err and "Traceback" not in err


# ---- against the real daemon -------------------------------------------------------------

def test_real_daemon_hostile_agent_save_is_bounded_masked_and_kept(session_user, workspace):
    """A real session whose agent plants a file over max_size, a setuid file, a world-writable
    directory and a directory at .credentials.json; the save is bounded and tamed, later saves
    of the resumed session keep generations, and coi clean still works."""
    user = session_user
    config = user.home / ".config" / "coi" / "config.toml"
    config.write_text(config.read_text() + '\n[sessions]\nmax_size = "1MiB"\nkeep = 3\n')

    def start(*extra: str) -> tuple[str, str]:
        proc = user.run(["shell", "--background", "--debug", *extra], cwd=workspace)  # bash for the agent
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        name = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("Container: "))
        sid = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("Session ID: "))
        return name, sid

    def agent(name: str, script: str) -> None:
        proc = user.run(["container", "exec", name, "--user", "1000", "--", "sh", "-c", script], cwd=workspace)
        assert proc.returncode == 0, proc.stderr

    def shutdown(name: str) -> str:
        proc = user.run(["shutdown", name, "--timeout", "20"], cwd=workspace)
        assert proc.returncode == 0 and "Session data saved" in proc.stderr, proc.stderr
        return proc.stderr

    name, sid = start()
    agent(name, "set -e; c=/home/code/.claude; mkdir -p $c/projects/-workspace; "
                "echo '{\"text\": \"apples\"}' > $c/projects/-workspace/t.jsonl; "
                "head -c 3145728 /dev/zero > $c/big.bin; "
                "printf '#!/bin/sh\\nid\\n' > $c/suid; chmod 4777 $c/suid; "
                "mkdir -p $c/open; chmod 1777 $c/open; echo w > $c/open/w; chmod 0666 $c/open/w; "
                "rm -rf $c/.credentials.json; mkdir $c/.credentials.json; echo x > $c/.credentials.json/inner")
    err = shutdown(name)
    assert "sessions.max_size" in err

    saved = user.home / ".coi" / "sessions-claude" / sid
    assert json.loads((saved / "metadata.json").read_text())["session_id"] == sid
    found = entries(saved / "state")
    assert "projects/-workspace/t.jsonl" in found and "big.bin" not in found
    assert not any(rel.startswith(".credentials.json") for rel in found)
    assert tree_size(saved / "state") <= 1 << 20
    assert stat.S_IMODE(found["suid"].st_mode) == 0o700
    assert stat.S_IMODE(found["open"].st_mode) == 0o700 and stat.S_IMODE(found["open/w"].st_mode) == 0o600
    assert_private(saved)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o700

    name, resumed = start("--resume")
    assert resumed == sid
    agent(name, "echo '{\"text\": \"pears\"}' >> /home/code/.claude/projects/-workspace/t.jsonl")
    shutdown(name)
    assert (saved / "generations" / "2" / "metadata.json").is_file()
    assert b"pears" in (saved / "state" / "projects" / "-workspace" / "t.jsonl").read_bytes()
    assert b"pears" not in (saved / "generations" / "2" / "state" / "projects" / "-workspace" / "t.jsonl").read_bytes()
    info = user.run(["info", sid], cwd=workspace)
    assert info.returncode == 0 and "Generation 2: saved at " in info.stdout, info.stderr

    proc = user.run(["clean", "--force"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    proc = user.run(["clean", "--sessions", "--force"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert not saved.exists()
