"""git as coi runs it: an argv list, the caller's ``GIT_*`` variables dropped, hooks and
fsmonitor off, and, for everything that touches a session's copy, no configuration but
coi's own (``isolated``): no system or user config, no user attributes or excludes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from coi.errors import CoiError, NotFoundError

# On every git coi runs: nothing coi does runs a hook or an fsmonitor, in any repository.
_ALWAYS = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "protocol.allow=never",
           "-c", "protocol.file.allow=always", "-c", "gc.auto=0", "-c", "maintenance.auto=false")


# No configuration but what coi passes: the system and the user files are not read, nor
# the user's attributes and excludes files (their default places are under $HOME and
# $XDG_CONFIG_HOME, which point nowhere).
_ISOLATED = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_ATTR_NOSYSTEM": "1",
             "HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent"}


class GitError(CoiError):
    """A git command failed; the message carries git's own first line."""


class GitTimeout(GitError):
    """A git command ran past its time limit and was killed (its locks are left behind)."""


def git_missing() -> NotFoundError:
    return NotFoundError("git is not installed on this host", "install it: sudo apt install git")


def environment(*, isolated: bool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_PAGER": "cat", "PAGER": "cat", "LC_ALL": "C",
                "GIT_ADVICE": "0"})
    if isolated:
        env.update(_ISOLATED)
    env.update(extra or {})
    return env


def run(args: Sequence[str], *, cwd: Path | None = None, git_dir: Path | None = None,
        work_tree: Path | None = None, isolated: bool, env: Mapping[str, str] | None = None,
        input: bytes | None = None, check: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """``git ARGS`` (bytes out); a failure raises GitError with git's message unless not
    ``check``, and so does a run past ``timeout`` seconds (the process is killed)."""
    argv = ["git", *_ALWAYS]
    if git_dir is not None:
        argv.append(f"--git-dir={git_dir}")
    if work_tree is not None:
        argv.append(f"--work-tree={work_tree}")
    argv.extend(args)
    try:
        proc = subprocess.run(argv, cwd=cwd or git_dir or "/", input=input, capture_output=True,
                              env=environment(isolated=isolated, extra=env), timeout=timeout)
    except FileNotFoundError:
        raise git_missing() from None
    except subprocess.TimeoutExpired:
        raise GitTimeout(f"git {_verb(args)} did not finish in {timeout:g} s",
                       "a session's copy with a FIFO or an enormous file in it? look at it, or discard it") from None
    if check and proc.returncode != 0:
        raise GitError(f"git {_verb(args)} failed: {first_line(proc.stderr)}")
    return proc


def _verb(args: Sequence[str]) -> str:
    """The git command of ``args`` (past ``-c KEY=VALUE`` options)."""
    return next((a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-c")), "")


def text(args: Sequence[str], **kw) -> str:
    """Standard output of ``git ARGS``, stripped."""
    return run(args, **kw).stdout.decode("utf-8", "replace").strip()


def first_line(stderr: bytes) -> str:
    """git's message without its ``fatal:``/``error:`` prefix, one line."""
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        for prefix in ("fatal: ", "error: "):
            line = line.removeprefix(prefix)
        if line and not line.startswith(("hint:", "warning:")):
            return line
    return "(no message)"
