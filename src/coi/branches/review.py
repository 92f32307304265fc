"""A branch session's work, seen and taken from the host: its state, diff and log (read
through the view), the branch brought back with ``git fetch``, merged, or discarded.

Nothing here runs git in the copy. Work reaches the host repository only as
``refs/heads/coi/<NAME>``, fetched from the view with object checks on (``fsckObjects``),
and ``coi merge`` runs with hooks off: the merged files are the agent's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coi.branches import git
from coi.branches.copies import (Branch, Repository, forget, repository, snapshot, tip, uncommitted, view_git,
                                 view_text)
from coi.errors import CoiError, ConflictError

# Files that make git run things or fetch from elsewhere on checkout: a branch that
# changes them is merged by the person, with git, not by coi.
CONTROL_FILES = (".gitattributes", ".gitmodules", ".lfsconfig")


@dataclass(frozen=True)
class Change:
    status: str  # git's letter: A, M, D, R, T, ?? (untracked)
    path: str

    def to_json(self) -> dict[str, str]:
        return {"status": self.status, "path": self.path}


@dataclass(frozen=True)
class Status:
    """What ``coi list`` shows of a branch session."""

    branch: Branch
    head: str | None
    ahead: int | None  # commits on the branch since its base
    uncommitted: int | None  # files that differ from the branch's last commit
    problem: str | None = None  # why the copy could not be read
    container: str | None = None
    state: str = "no container"  # Running, Stopped, or no container

    def to_json(self) -> dict[str, Any]:
        return {**self.branch.to_json(), "head": self.head, "ahead": self.ahead, "uncommitted": self.uncommitted,
                "container": self.container, "state": self.state, "problem": self.problem}


def status(branch: Branch) -> Status:
    try:
        head = tip(branch)
        ahead = int(view_text(branch, ["rev-list", "--count", f"{branch.base}..{head}"]))
        return Status(branch, head, ahead, len(uncommitted(branch, head)))
    except CoiError as exc:
        return Status(branch, None, None, None, problem=exc.message)


def statuses(branches: list[Branch]) -> list[Status]:
    """``status`` of each, side by side (each is a few git processes)."""
    if len(branches) < 2:
        return [status(b) for b in branches]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(branches))) as pool:
        return list(pool.map(status, branches))


# ---- diff and log -----------------------------------------------------------------------

@dataclass(frozen=True)
class Diff:
    branch: Branch
    head: str
    committed: list[Change]
    uncommitted: list[Change]
    patch: bytes  # git's patch, base -> the copy's files (or -> the last commit with committed_only)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.branch.name, "branch": self.branch.branch, "base": self.branch.base, "head": self.head,
                "committed": [c.to_json() for c in self.committed],
                "uncommitted": [c.to_json() for c in self.uncommitted],
                "patch": self.patch.decode("utf-8", "replace")}


def diff(branch: Branch, *, committed_only: bool = False, stat: bool = False) -> Diff:
    """Committed and uncommitted work against the session's base."""
    head = tip(branch)
    files = snapshot(branch, head)
    target = head if committed_only else files
    shape = ["--stat"] if stat else ["--patch"]
    patch = view_git(branch, ["diff", "--no-color", "--no-ext-diff", "--no-textconv", "-M", *shape,
                              branch.base, target]).stdout
    return Diff(branch, head, _changes(branch, branch.base, head), _changes(branch, head, files), patch)


def _changes(branch: Branch, old: str, new: str) -> list[Change]:
    out = view_git(branch, ["diff", "--name-status", "-z", "--no-renames", old, new]).stdout.split(b"\0")
    return [Change(out[i].decode(), out[i + 1].decode("utf-8", "replace")) for i in range(0, len(out) - 1, 2)]


@dataclass(frozen=True)
class Commit:
    sha: str
    author: str
    date: str
    subject: str

    def to_json(self) -> dict[str, str]:
        return {"sha": self.sha, "author": self.author, "date": self.date, "subject": self.subject}


def log(branch: Branch) -> tuple[str, list[Commit]]:
    """(tip, the session's commits since its base, newest first)."""
    head = tip(branch)
    out = view_git(branch, ["log", "-z", "--no-color", "--format=%H%x1f%an%x1f%aI%x1f%s",
                            f"{branch.base}..{head}"]).stdout
    commits = []
    for record in out.split(b"\0"):
        if record:
            sha, author, date, subject = (record.decode("utf-8", "replace").split("\x1f", 3) + ["", "", ""])[:4]
            commits.append(Commit(sha, author, date, subject))
    return head, commits


# ---- bringing the work back ---------------------------------------------------------------

def bring_back(branch: Branch, repo: Repository | None = None) -> str:
    """``refs/heads/coi/<NAME>`` in the host repository set to the copy's tip: a ``git fetch``
    from the view, objects checked. Returns the tip."""
    repo = repo or repository(branch.workspace)
    head = tip(branch)
    view_git(branch, ["update-ref", branch.ref, head])
    proc = repo.git(["-c", "fetch.fsckObjects=true", "-c", "transfer.fsckObjects=true", "fetch", "-q",
                     "--no-tags", "--no-write-fetch-head", "--no-auto-gc", "--no-recurse-submodules",
                     str(branch.view), f"+{branch.ref}:{branch.ref}"], check=False)
    if proc.returncode != 0:
        raise CoiError(f"could not bring {branch.branch} back into {repo.top}: {git.first_line(proc.stderr)}",
                       f"is {branch.branch} checked out there? switch to another branch and try again")
    return head


@dataclass(frozen=True)
class Merged:
    branch: Branch
    into: str  # the host's branch (or "HEAD" when detached)
    mode: str  # merge, squash, rebase
    outcome: str  # fast-forward, merge commit, squashed, rebased, up to date
    commits: int  # commits brought in
    head: str  # the host's HEAD afterwards
    left_uncommitted: int  # files the copy has that no commit holds (not merged)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.branch.name, "branch": self.branch.branch, "into": self.into, "mode": self.mode,
                "outcome": self.outcome, "commits": self.commits, "head": self.head,
                "uncommitted_not_merged": self.left_uncommitted}


def merge(branch: Branch, *, mode: str = "merge") -> Merged:
    """The session's commits into the host's current branch. A dirty tree, a change to git's
    control files or a conflict refuses, with nothing changed and what to run instead."""
    repo = repository(branch.workspace)
    head = bring_back(branch, repo)
    left = len(uncommitted(branch, head))
    into = git.text(["symbolic-ref", "--short", "-q", "HEAD"], cwd=repo.top, isolated=False, check=False) or "HEAD"
    dirty = repo.git(["status", "--porcelain", "--untracked-files=no"]).stdout.splitlines()
    if dirty:
        raise ConflictError(f"{repo.top} has uncommitted changes ({len(dirty)} file(s)); coi merges only into a "
                            "clean tree", f"commit or stash them, then run: coi merge {branch.name}")
    before = repo.head()
    count = int(git.text(["rev-list", "--count", f"{before}..{head}"], cwd=repo.top, isolated=False))
    if count == 0:
        return Merged(branch, into, mode, "up to date", 0, before, left)
    control = sorted(p for p in _touched(repo, before, head) if p.rsplit("/", 1)[-1].lower() in CONTROL_FILES)
    if control:
        raise ConflictError(f"{branch.branch} changes {', '.join(control)}, which make git run or fetch things on "
                            "checkout; coi does not merge that", f"review it (coi diff {branch.name}) and merge it "
                            f"yourself: git merge {branch.branch}")
    outcome = _MODES[mode](repo, branch, before, head, count)
    return Merged(branch, into, mode, outcome, count, repo.head(), left)


def _touched(repo: Repository, before: str, head: str) -> set[str]:
    """Every path the branch changes: since the merge base, and in any one of its commits (a
    rebase checks each out: a file added and removed again is on disk meanwhile). Names as
    git stores them (``-z``: quoted ones would hide ``dir/.gitattributes``), no renames (a
    file moved away is changed too)."""
    out = b"\0".join(repo.git(args).stdout for args in (
        ["diff", "--name-only", "--no-renames", "-z", f"{before}...{head}"],
        ["log", "--format=", "--name-only", "--no-renames", "-z", f"{before}..{head}"]))
    return {p.decode("utf-8", "replace") for p in out.split(b"\0") if p.strip(b"\n")}


def _merge(repo: Repository, branch: Branch, before: str, head: str, count: int) -> str:
    _attempt(repo, branch, ["merge", "-q", "--no-edit", branch.ref], undo=["merge", "--abort"], how="git merge",
             before=before)
    return "fast-forward" if repo.head() == head else "merge commit"


def _squash(repo: Repository, branch: Branch, before: str, head: str, count: int) -> str:
    _attempt(repo, branch, ["merge", "-q", "--squash", branch.ref], undo=["reset", "-q", "--merge"],
             how="git merge --squash", before=before)
    subjects = git.text(["log", "--format=* %s", f"{before}..{head}"], cwd=repo.top, isolated=False)
    message = f"{branch.branch}: {count} commit(s) squashed\n\n{subjects}\n"
    _attempt(repo, branch, ["commit", "-q", "--no-verify", "-F", "-"], undo=["reset", "-q", "--merge"],
             how="git merge --squash", before=before, input=message.encode())
    return "squashed"


def _rebase(repo: Repository, branch: Branch, before: str, head: str, count: int) -> str:
    merges = git.text(["rev-list", "--merges", f"{before}..{head}"], cwd=repo.top, isolated=False)
    if merges:
        raise ConflictError(f"{branch.branch} has merge commits, which --rebase cannot replay",
                            f"use coi merge {branch.name} or coi merge --squash {branch.name}")
    _attempt(repo, branch, ["cherry-pick", "--allow-empty", f"{before}..{head}"], undo=["cherry-pick", "--abort"],
             how="git cherry-pick", before=before)
    return "rebased"


_MODES = {"merge": _merge, "squash": _squash, "rebase": _rebase}


def _attempt(repo: Repository, branch: Branch, args: list[str], *, undo: list[str], how: str, before: str,
             input: bytes | None = None) -> None:
    """``git ARGS`` in the host repository; when it fails, ``undo`` puts everything back (HEAD
    at ``before`` again, checked) and the error says what conflicted and how to do it by hand."""
    proc = repo.git(args, check=False, input=input)
    if proc.returncode == 0:
        return
    conflicted = git.text(["diff", "--name-only", "--diff-filter=U"], cwd=repo.top, isolated=False, check=False)
    repo.git(undo, check=False)
    now = repo.head()
    if now != before:
        raise CoiError(f"could not merge {branch.branch}, and undoing it left HEAD at {now[:12]}",
                       f"it was at {before[:12]}: check 'git status', then 'git reset --keep {before[:12]}'")
    files = conflicted.split()
    what = f"conflicts in {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}" if files \
        else git.first_line(proc.stderr or proc.stdout)
    raise ConflictError(f"could not merge {branch.branch}: {what}; nothing was changed",
                        f"resolve it by hand ({how} {branch.branch}), or ask the agent to rebase: "
                        f"coi shell --branch {branch.name} --resume")


# ---- discarding -------------------------------------------------------------------------

@dataclass(frozen=True)
class Discarded:
    branch: Branch
    unmerged: int  # the session's commits no other branch of the host has
    uncommitted: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.branch.name, "branch": self.branch.branch, "unmerged_commits": self.unmerged,
                "uncommitted": self.uncommitted, "notes": self.notes}


def what_is_lost(branch: Branch) -> Discarded:
    """What discarding would throw away: commits not on the host's other branches, and
    uncommitted files."""
    state = status(branch)
    unmerged = 0
    if state.head:
        try:
            repo = repository(branch.workspace)
            refs = git.text(["for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/"], cwd=repo.top,
                            isolated=False).splitlines()
            others = [f"^{line.split()[0]}" for line in refs if line.split()[-1] != branch.ref]
            # The view reads the host's objects too, so the host's tips resolve there.
            unmerged = int(view_text(branch, ["rev-list", "--count", state.head, *others]))
        except (CoiError, ValueError):
            unmerged = state.ahead or 0
    return Discarded(branch, unmerged, state.uncommitted or 0)


def discard(branch: Branch) -> Discarded:
    """The copy, its view and record, and the host's ``coi/<NAME>`` branch deleted."""
    lost = what_is_lost(branch)
    notes = []
    try:
        repo: Repository | None = repository(branch.workspace)
    except CoiError as exc:
        repo = None
        notes.append(f"the host branch was left alone: {exc.message}")
    if repo is not None:
        current = git.text(["symbolic-ref", "-q", "HEAD"], cwd=repo.top, isolated=False, check=False)
        if current == branch.ref:
            raise ConflictError(f"{branch.branch} is checked out in {repo.top}",
                                f"switch to another branch first, then: coi discard {branch.name}")
    forget(branch, repo)
    return Discarded(branch, lost.unmerged, lost.uncommitted, notes)
