"""coi.branches with real git in temporary directories, no Incus: branch names, reading a
copy's tip as data, making and filling a copy (with --carry), and reviewing, merging and
discarding its work from the host."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from coi.branches import copies, review
from coi.errors import CoiError, ConflictError, NotFoundError, UsageError

from gitrepos import first_commit, write

pytestmark = pytest.mark.unit


# ---- helpers: the person's repository and the agent's copy, with real git -------------

def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``git ARGS`` in ``cwd`` as the person (or the agent) runs it; its output."""
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The person's home: their git identity, nothing else (coi's host-side git reads it)."""
    home = tmp_path / "home"
    write(home / ".gitconfig", "[user]\n\tname = Host Person\n\temail = host@example.invalid\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    return home


@pytest.fixture
def repo(tmp_path: Path, home: Path) -> Path:
    """The person's repository: one commit on main."""
    return first_commit(tmp_path / "ws", git)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def new_copy(state: Path, repo: Path, name: str | None = "alpha", *, carry: bool = False) -> copies.Branch:
    branch, _ = copies.reserve(state, repo, name)
    copies.fill(branch, carry=carry)
    return branch


def agent(branch: copies.Branch, *args: str) -> str:
    """git in the copy, the way the agent runs it in its container."""
    return git(branch.copy, *args, env={"GIT_CONFIG_GLOBAL": "/dev/null"})


def agent_commit(branch: copies.Branch, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        write(branch.copy / name, text)
    agent(branch, "add", "-A")
    agent(branch, "commit", "-qm", message)
    return agent(branch, "rev-parse", "HEAD").strip()


def host_commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        write(repo / name, text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD").strip()


# ---- names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, checked", [
    ("a", "a"), ("alpha", "alpha"), ("fix-42", "fix-42"), ("0day", "0day"), ("coi/alpha", "alpha"),
    ("x" * 40, "x" * 40)])
def test_good_names_are_kept_and_the_coi_prefix_is_taken(name, checked):
    assert copies.check_name(name) == checked


@pytest.mark.parametrize("name", [
    "", "coi/", "Alpha", "a/b", "coi/a/b", "-a", "a-", "a_b", "a.b", "..", ".git", "a b", "a\n", "é",
    "x" * 41, "coi/coi/a", "a\x1b[2J", "HEAD@{1}"])
def test_bad_names_are_refused_with_the_rule(name):
    with pytest.raises(UsageError) as caught:
        copies.check_name(name)
    assert "not allowed" in caught.value.message and "coi/NAME" in caught.value.hint


# ---- the host repository --------------------------------------------------------------

def test_a_directory_that_is_no_repository_is_refused(tmp_path, home):
    with pytest.raises(UsageError, match="need a git repository"):
        copies.repository(tmp_path)


def test_a_subdirectory_of_a_repository_is_refused(repo):
    with pytest.raises(UsageError, match="need the top of a repository") as caught:
        copies.repository(repo / "src")
    assert str(repo) in caught.value.hint


def test_a_repository_that_borrows_objects_is_refused(repo):
    write(repo / ".git" / "objects" / "info" / "alternates", "/somewhere/else/objects\n")
    with pytest.raises(CoiError, match="borrows objects") as caught:
        copies.repository(repo)
    assert "repack" in caught.value.hint


def test_a_repository_without_a_commit_cannot_start_a_branch(tmp_path, home, state):
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(CoiError, match="no commit yet"):
        copies.reserve(state, empty, "alpha")
    assert not (copies.workspace_root(state, empty) / "alpha").exists()


def test_the_repository_is_its_top_git_dir_and_format(repo):
    found = copies.repository(repo)
    assert (found.top, found.git_dir, found.object_format) == (repo, repo / ".git", "sha1")
    assert found.head() == git(repo, "rev-parse", "HEAD").strip()


# ---- making a copy ----------------------------------------------------------------------

def test_a_copy_is_on_its_branch_at_the_hosts_head_borrowing_the_hosts_objects(repo, state):
    base = git(repo, "rev-parse", "HEAD").strip()
    branch = new_copy(state, repo)
    assert (branch.name, branch.branch, branch.base) == ("alpha", "coi/alpha", base)
    assert branch.copy == copies.workspace_root(state, repo) / "alpha"
    assert agent(branch, "symbolic-ref", "HEAD").strip() == "refs/heads/coi/alpha"
    assert agent(branch, "rev-parse", "HEAD").strip() == base
    assert agent(branch, "status", "--porcelain") == ""
    assert (branch.copy / "src" / "app.py").read_text() == "print('v1')\n"
    dot = branch.copy / ".git"
    assert (dot / "objects" / "info" / "alternates").read_text() == copies.ALTERNATE + "\n"
    assert (dot / "objects" / copies.ALTERNATE).resolve() == (repo / ".git" / "objects").resolve()
    assert not [p for p in (dot / "objects").rglob("*") if p.is_file() and "info" not in p.parts]  # borrowed
    # The host has the branch (it keeps every borrowed object reachable there).
    assert git(repo, "rev-parse", "refs/heads/coi/alpha").strip() == base
    # The view: coi's own bare repository over the copy's and the host's objects.
    assert (branch.view / "objects" / "info" / "alternates").read_text().split() == [
        str(dot / "objects"), str(repo / ".git" / "objects")]
    record = json.loads(branch.meta.read_text())
    assert (record["name"], record["base"], record["workspace"]) == ("alpha", base, str(repo))
    assert copies.find(state, repo, "alpha") == branch == copies.find(state, repo, None)
    assert copies.read_tip(branch) == base


def test_the_copy_gets_the_persons_identity(repo, state):
    branch = new_copy(state, repo)
    assert agent(branch, "config", "user.name").strip() == "Host Person"
    assert agent(branch, "config", "user.email").strip() == "host@example.invalid"


def test_generated_names_are_unique_and_each_has_its_host_branch(repo, state):
    made = [copies.reserve(state, repo, None)[0] for _ in range(4)]
    names = {b.name for b in made}
    assert len(names) == 4
    assert all(copies.check_name(n) == n for n in names)
    refs = set(git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/coi/").split())
    assert refs == {f"refs/heads/coi/{n}" for n in names}
    with pytest.raises(UsageError, match="4 branch sessions"):
        copies.find(state, repo, None)


def test_a_taken_name_is_refused(repo, state):
    new_copy(state, repo)
    with pytest.raises(ConflictError, match="already exists"):
        copies.reserve(state, repo, "alpha")
    git(repo, "branch", "coi/beta")  # the person's own branch of that name
    with pytest.raises(ConflictError, match="already exists"):
        copies.reserve(state, repo, "coi/beta")


def test_find_names_what_is_missing(repo, state):
    with pytest.raises(NotFoundError, match="no branch sessions"):
        copies.find(state, repo, None)
    with pytest.raises(NotFoundError, match="no branch session nope"):
        copies.find(state, repo, "nope")


def test_carry_brings_staged_unstaged_and_untracked_changes_and_leaves_the_host_alone(repo, state):
    write(repo / ".gitignore", "*.log\n")
    host_commit(repo, {}, "ignore logs")
    write(repo / "README", "staged\n")
    git(repo, "add", "README")
    write(repo / "src" / "app.py", "print('unstaged')\n")
    write(repo / "draft.txt", "untracked\n")
    write(repo / "debug.log", "ignored\n")
    index = (repo / ".git" / "index").read_bytes()
    objects = sorted(p.relative_to(repo) for p in (repo / ".git" / "objects").rglob("*"))
    status = git(repo, "status", "--porcelain")

    branch = new_copy(state, repo, carry=True)
    assert (branch.copy / "README").read_text() == "staged\n"
    assert (branch.copy / "src" / "app.py").read_text() == "print('unstaged')\n"
    assert (branch.copy / "draft.txt").read_text() == "untracked\n"
    assert not (branch.copy / "debug.log").exists()
    assert agent(branch, "rev-parse", "HEAD").strip() == branch.base  # uncommitted, on the base
    assert sorted(agent(branch, "status", "--porcelain").splitlines()) == [
        " M README", " M src/app.py", "?? draft.txt"]
    # The host repository: same index, same objects, same changes.
    assert (repo / ".git" / "index").read_bytes() == index
    assert sorted(p.relative_to(repo) for p in (repo / ".git" / "objects").rglob("*")) == objects
    assert git(repo, "status", "--porcelain") == status
    assert copies.tip(branch) == branch.base  # the carried objects are the copy's own


def test_forget_removes_the_copy_view_record_and_host_branch(repo, state):
    branch = new_copy(state, repo)
    copies.forget(branch, copies.repository(repo))
    assert not branch.copy.exists() and not branch.view.exists() and not branch.meta.exists()
    assert not copies.repository(repo).has_ref(branch.ref)


# ---- reading the tip as data ---------------------------------------------------------

@pytest.fixture
def branch(repo, state) -> copies.Branch:
    return new_copy(state, repo)


def loose(branch: copies.Branch) -> Path:
    return branch.copy / ".git" / "refs" / "heads" / "coi" / branch.name


def test_tip_from_the_loose_ref(branch):
    assert copies.read_tip(branch) == branch.base
    loose(branch).write_text("  " + "a" * 40 + "  \n")
    assert copies.read_tip(branch) == "a" * 40


def test_tip_from_packed_refs_when_there_is_no_loose_ref(branch):
    loose(branch).unlink()
    assert copies.read_tip(branch) is None
    packed = branch.copy / ".git" / "packed-refs"
    packed.write_text("# pack-refs with: peeled fully-peeled sorted\n"
                      f"{'b' * 40} refs/heads/coi/alphabet\n{'c' * 40} refs/heads/main\n")
    assert copies.read_tip(branch) is None  # other refs only
    packed.write_text(packed.read_text() + f"{'d' * 40} refs/heads/coi/alpha\n^{'e' * 40}\n")
    assert copies.read_tip(branch) == "d" * 40


def test_tip_written_by_git_pack_refs_is_read(branch, repo):
    copies.fill(branch, carry=False)
    head = agent_commit(branch, {"x": "x\n"}, "x")
    agent(branch, "pack-refs", "--all")
    assert not loose(branch).exists()
    assert copies.read_tip(branch) == head


@pytest.mark.parametrize("content", [
    b"", b"ref: refs/heads/main\n", b"z" * 40, b"a" * 39, b"A" * 40, b"a" * 41, b"a" * 40 + b" junk",
    b"a" * 64, b"\x00" * 40, b"a" * 40 + b"\n" + b"b" * 40])
def test_garbage_in_the_ref_is_no_tip(branch, content):
    loose(branch).write_bytes(content)
    assert copies.read_tip(branch) is None


def test_an_oversize_ref_is_read_only_in_part_and_is_no_tip(branch):
    loose(branch).write_bytes(b"a" * 40 + b"x" * (4 << 20))
    assert copies.read_tip(branch) is None


def test_a_sha256_branch_wants_64_hex_digits(branch):
    wide = dataclasses.replace(branch, object_format="sha256")
    assert copies.read_tip(wide) is None
    loose(branch).write_text("f" * 64 + "\n")
    assert copies.read_tip(wide) == "f" * 64
    assert copies.read_tip(branch) is None


@pytest.mark.parametrize("what", [".git", "refs", "heads", "coi", "ref", "packed-refs"])
def test_links_are_not_followed(branch, tmp_path, what):
    """The agent points part of the path elsewhere (at a repository with a tip of its
    choosing): coi reads no tip through a link."""
    dot = branch.copy / ".git"
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "refs" / "heads" / "coi").mkdir(parents=True)
    write(elsewhere / "refs" / "heads" / "coi" / "alpha", "f" * 40 + "\n")
    write(elsewhere / "packed-refs", f"{'f' * 40} refs/heads/coi/alpha\n")
    targets = {".git": (dot, elsewhere), "refs": (dot / "refs", elsewhere / "refs"),
               "heads": (dot / "refs" / "heads", elsewhere / "refs" / "heads"),
               "coi": (dot / "refs" / "heads" / "coi", elsewhere / "refs" / "heads" / "coi"),
               "ref": (loose(branch), elsewhere / "refs" / "heads" / "coi" / "alpha"),
               "packed-refs": (dot / "packed-refs", elsewhere / "packed-refs")}
    link, target = targets[what]
    if what == "packed-refs":
        loose(branch).unlink()
    else:
        os.rename(link, tmp_path / "moved")
    link.symlink_to(target)
    assert copies.read_tip(branch) is None


@pytest.mark.parametrize("where", ["ref", "packed-refs"])
def test_a_fifo_or_directory_is_no_tip_and_does_not_block(branch, where):
    path = loose(branch) if where == "ref" else branch.copy / ".git" / "packed-refs"
    loose(branch).unlink()
    os.mkfifo(path)
    assert copies.read_tip(branch) is None
    path.unlink()
    path.mkdir()
    assert copies.read_tip(branch) is None


def test_an_object_store_the_agent_packed_and_indexed_is_read(repo, state):
    """What git itself makes in the copy's object store (packs, indexes, commit graphs)
    is no reason to refuse it; links and other alternates are (tests/security)."""
    branch = new_copy(state, repo, carry=False)
    agent_commit(branch, {"a": "a\n"}, "one")
    agent(branch, "gc", "-q")
    agent(branch, "commit-graph", "write", "--reachable", "--split")
    agent(branch, "multi-pack-index", "write")
    head = agent_commit(branch, {"b": "b\n"}, "two")
    assert copies.tip(branch) == head
    assert review.status(branch).problem is None
    (branch.copy / ".git" / "objects" / "info" / "alternates").unlink()  # the agent's loss, not a danger
    assert copies.tip(branch) == head


def test_tip_refuses_what_is_no_commit_of_the_view(branch):
    loose(branch).write_text("a" * 40 + "\n")  # no such object
    with pytest.raises(CoiError, match="not a commit coi can read"):
        copies.tip(branch)
    loose(branch).unlink()
    with pytest.raises(CoiError, match="deleted or renamed"):
        copies.tip(branch)


# ---- review: status, diff, log ----------------------------------------------------------------

def test_status_counts_commits_and_uncommitted_files(repo, state):
    branch = new_copy(state, repo)
    assert review.status(branch).to_json()["ahead"] == 0
    head = agent_commit(branch, {"src/app.py": "print('v2')\n"}, "agent: v2")
    write(branch.copy / "NOTES.md", "notes\n")
    write(branch.copy / "README", "edited\n")
    (branch.copy / "src" / "app.py").unlink()
    got = review.status(branch)
    assert (got.head, got.ahead, got.uncommitted, got.problem) == (head, 1, 3, None)
    data = got.to_json()
    assert data["branch"] == "coi/alpha" and data["state"] == "no container"


def test_status_of_an_unreadable_copy_says_why(repo, state):
    branch = new_copy(state, repo)
    loose(branch).unlink()
    got = review.status(branch)
    assert got.head is None and "deleted or renamed" in got.problem
    assert [s.problem for s in review.statuses([branch, branch])] == [got.problem, got.problem]


def test_diff_has_committed_and_uncommitted_work(repo, state):
    branch = new_copy(state, repo)
    head = agent_commit(branch, {"src/app.py": "print('v2')\n"}, "agent: v2")
    write(branch.copy / "NOTES.md", "notes\n")
    write(branch.copy / "README", "hello\nmore\n")
    got = review.diff(branch)
    assert got.head == head
    assert [c.to_json() for c in got.committed] == [{"status": "M", "path": "src/app.py"}]
    assert {(c.status, c.path) for c in got.uncommitted} == {("A", "NOTES.md"), ("M", "README")}
    patch = got.patch.decode()
    assert "+print('v2')" in patch and "+notes" in patch and "+more" in patch
    committed = review.diff(branch, committed_only=True).patch.decode()
    assert "+print('v2')" in committed and "notes" not in committed
    stat = review.diff(branch, stat=True).patch.decode()
    assert "NOTES.md" in stat and "@@" not in stat
    assert json.loads(json.dumps(got.to_json()))["uncommitted"]
    # The copy's own index is not the view's: the agent's staging changes nothing here.
    agent(branch, "add", "-A")
    assert {(c.status, c.path) for c in review.diff(branch).uncommitted} == {("A", "NOTES.md"), ("M", "README")}


def test_log_lists_the_sessions_commits_newest_first(repo, state):
    branch = new_copy(state, repo)
    assert review.log(branch) == (branch.base, [])
    agent_commit(branch, {"a": "a\n"}, "one")
    head = agent_commit(branch, {"b": "b\n"}, "two\n\nbody")
    tip, commits = review.log(branch)
    assert tip == head
    assert [c.subject for c in commits] == ["two", "one"]
    assert commits[0].sha == head and commits[0].author == "Host Person" and commits[0].date[:2] == "20"


# ---- merge and discard --------------------------------------------------------------------

def test_merge_fast_forwards_and_leaves_uncommitted_work_in_the_copy(repo, state):
    branch = new_copy(state, repo)
    head = agent_commit(branch, {"src/app.py": "print('v2')\n"}, "agent: v2")
    write(branch.copy / "NOTES.md", "notes\n")
    got = review.merge(branch)
    assert (got.outcome, got.commits, got.head, got.into, got.left_uncommitted) == (
        "fast-forward", 1, head, "main", 1)
    assert (repo / "src" / "app.py").read_text() == "print('v2')\n" and not (repo / "NOTES.md").exists()
    assert review.merge(branch).outcome == "up to date"


@pytest.mark.parametrize("mode, outcome, first_parent_commits", [
    ("merge", "merge commit", 3), ("squash", "squashed", 3), ("rebase", "rebased", 4)])
def test_merge_modes_when_the_host_moved_on(repo, state, mode, outcome, first_parent_commits):
    branch = new_copy(state, repo)
    agent_commit(branch, {"a": "a\n"}, "one")
    agent_commit(branch, {"b": "b\n"}, "two")
    host_commit(repo, {"host.txt": "host\n"}, "host work")
    got = review.merge(branch, mode=mode)
    assert (got.outcome, got.commits) == (outcome, 2)
    assert len(git(repo, "log", "--first-parent", "--format=%s").split("\n")) - 1 == first_parent_commits
    assert (repo / "a").exists() and (repo / "b").exists() and (repo / "host.txt").exists()
    assert git(repo, "status", "--porcelain") == ""


def test_merge_refuses_a_dirty_tree_and_a_conflict_changing_nothing(repo, state):
    branch = new_copy(state, repo)
    agent_commit(branch, {"README": "agent\n"}, "agent: readme")
    write(repo / "README", "dirty\n")
    with pytest.raises(ConflictError, match="uncommitted changes"):
        review.merge(branch)
    assert (repo / "README").read_text() == "dirty\n"
    host = host_commit(repo, {"README": "host\n"}, "host: readme")
    for mode in ("merge", "squash", "rebase"):
        with pytest.raises(ConflictError, match="conflicts in README.*nothing was changed"):
            review.merge(branch, mode=mode)
        assert git(repo, "rev-parse", "HEAD").strip() == host
        assert git(repo, "status", "--porcelain") == "" and (repo / "README").read_text() == "host\n"


def test_rebase_refuses_merge_commits(repo, state):
    branch = new_copy(state, repo)
    agent(branch, "checkout", "-qb", "side")
    agent_commit(branch, {"side": "s\n"}, "side")
    agent(branch, "checkout", "-q", "coi/alpha")
    agent_commit(branch, {"main": "m\n"}, "main")
    agent(branch, "merge", "-q", "--no-edit", "side")
    with pytest.raises(ConflictError, match="merge commits"):
        review.merge(branch, mode="rebase")


def test_bring_back_sets_the_host_branch_to_the_copys_tip(repo, state):
    branch = new_copy(state, repo)
    head = agent_commit(branch, {"a": "a\n"}, "one")
    assert review.bring_back(branch) == head
    assert git(repo, "rev-parse", "coi/alpha").strip() == head
    assert git(repo, "rev-parse", "HEAD").strip() == branch.base  # nothing else moved


def test_discard_says_what_is_lost_and_removes_everything(repo, state):
    branch = new_copy(state, repo)
    agent_commit(branch, {"a": "a\n"}, "one")
    write(branch.copy / "b", "b\n")
    lost = review.what_is_lost(branch)
    assert (lost.unmerged, lost.uncommitted) == (1, 1)
    got = review.discard(branch)
    assert got.to_json() == {"name": "alpha", "branch": "coi/alpha", "unmerged_commits": 1, "uncommitted": 1,
                             "notes": []}
    assert not branch.copy.exists() and not branch.view.exists() and not branch.meta.exists()
    assert "coi/alpha" not in git(repo, "branch", "--list")
    assert copies.all_branches(state, repo) == []


def test_merged_work_is_not_counted_as_lost(repo, state):
    branch = new_copy(state, repo)
    agent_commit(branch, {"a": "a\n"}, "one")
    review.merge(branch)
    assert review.what_is_lost(branch).unmerged == 0


def test_discard_refuses_a_branch_checked_out_on_the_host(repo, state):
    branch = new_copy(state, repo)
    git(repo, "checkout", "-q", "coi/alpha")
    with pytest.raises(ConflictError, match="checked out"):
        review.discard(branch)
    assert branch.copy.exists()
