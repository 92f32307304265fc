"""A person's git repository for the branch-session tests (real git, no Incus): one commit
on main, ``README`` and ``src/app.py``, made with the test's ``git`` runner."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def first_commit(repo: Path, git: Callable[..., str]) -> Path:
    """``repo`` made a repository with one commit on main; ``git(cwd, *args)`` runs git."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q", "--initial-branch=main")
    write(repo / "README", "hello\n")
    write(repo / "src" / "app.py", "print('v1')\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    return repo
