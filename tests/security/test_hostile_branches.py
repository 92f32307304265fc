"""A hostile agent against branch sessions: its copy, ``.git`` included, is the agent's,
and coi reads, reviews, merges and deletes it on the host.

The agent writes hooks of every name, a git config full of commands (fsmonitor, hooks
path, filters, diff and merge drivers, pager, aliases, includes, ssh and credential
commands, ...), attributes that name them, nested repositories with the same, terminal
escapes in commit subjects, author names, file names and contents, links where coi
expects directories, and alternates or links that borrow objects from the person's other
repositories. Every planted command would ``touch`` a marker file; none may exist after
coi ran on the host, the host repository's config and hooks stay as they were, and what
coi prints has no raw control characters.

The local tests play the agent on the host, in the copy coi made (what the container can
do: the copy is its /workspace), and run coi's host side through the Python API and the
CLI (``coi list`` and ``coi discard`` against a fake Incus daemon). The real tests
(``real`` in their names: ``-k 'not real'`` leaves them out) have the same agent run in a
container with ``coi run --branch``, as a normal user against the real daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import coi
from coi.branches import copies, review
from coi.errors import CoiError
from fake_incus import sync

pytestmark = pytest.mark.security


# ---- the hostile agent -------------------------------------------------------------------

HOOKS = ("applypatch-msg", "pre-applypatch", "post-applypatch", "pre-commit", "pre-merge-commit",
         "prepare-commit-msg", "commit-msg", "post-commit", "pre-rebase", "post-checkout", "post-merge",
         "pre-push", "pre-receive", "update", "proc-receive", "post-receive", "post-update",
         "reference-transaction", "push-to-checkout", "pre-auto-gc", "post-rewrite", "sendemail-validate",
         "fsmonitor-watchman", "post-index-change", "p4-changelist", "p4-prepare-changelist",
         "p4-post-changelist", "p4-pre-submit")

# A window title (OSC), clear screen (CSI), a carriage return, and the same as C1 codes:
# as printf writes it in the agent's shell, and as Python text.
NASTY_SH = r"x\033]0;pwned\007 \033[2J \r \302\2332J \302\2350;pwned\302\234 y"
NASTY = "x\x1b]0;pwned\x07 \x1b[2J \r \x9b2J \x9d0;pwned\x9c y"

ATTRIBUTES = "* filter=evil diff=evil merge=evil\\nesc-* -diff\\n"  # printf format


def _plant_function(marker: str) -> str:
    """``plant GIT_DIR LABEL``: hooks of every name there and in a hooks path of its own,
    attributes, and a config (with an include) whose every command touches ``marker-LABEL-*``."""
    hooks = " ".join(HOOKS)
    return f"""
plant() {{
  d=$1; w=$2; m={marker}-$2
  top=$(cd "$d" && pwd)
  mkdir -p "$d/hooks" "$d/evil-hooks" "$d/info"
  for h in {hooks}; do
    printf '#!/bin/sh\\ntouch %s\\n' "$m-hook-$h" > "$d/hooks/$h"
    printf '#!/bin/sh\\ntouch %s\\n' "$m-hookspath-$h" > "$d/evil-hooks/$h"
    chmod +x "$d/hooks/$h" "$d/evil-hooks/$h"
  done
  printf '{ATTRIBUTES}' > "$d/info/attributes"
  printf '[filter "evil"]\\n\\tclean = "touch %s; cat"\\n[core]\\n\\tpager = "touch %s; cat"\\n' \\
    "$m-include-clean" "$m-include-pager" > "$d/evil-include.config"
  cat >> "$d/config" <<EOF
[core]
    fsmonitor = "touch $m-fsmonitor"
    hooksPath = "$top/evil-hooks"
    pager = "touch $m-pager; cat"
    editor = "touch $m-editor"
    askPass = "touch $m-askpass"
    sshCommand = "touch $m-ssh-command"
    gitProxy = "touch $m-git-proxy"
    alternateRefsCommand = "touch $m-alternate-refs-command"
[filter "evil"]
    clean = "touch $m-filter-clean; cat"
    smudge = "touch $m-filter-smudge; cat"
    process = "touch $m-filter-process"
[diff "evil"]
    textconv = "touch $m-textconv; cat"
    command = "touch $m-diff-command"
[diff]
    external = "touch $m-diff-external"
[merge "evil"]
    driver = "touch $m-merge-driver %A"
[alias]
    st = "!touch $m-alias-st"
    lg = "!touch $m-alias-lg"
[include]
    path = evil-include.config
[includeIf "gitdir:/"]
    path = evil-include.config
[uploadpack]
    packObjectsHook = "touch $m-pack-objects-hook"
[credential]
    helper = "!touch $m-credential-helper"
[gpg]
    program = "touch $m-gpg-program"
[log]
    showSignature = true
[sequence]
    editor = "touch $m-sequence-editor"
[protocol]
    allow = always
[remote "origin"]
    url = "ext::touch $m-ext-remote"
    fetch = +refs/heads/*:refs/remotes/origin/*
[submodule]
    recurse = true
[fetch]
    recurseSubmodules = true
EOF
}}
"""


def hostile_script(marker: str, *, attributes: bool = False) -> str:
    """The agent, as a shell script run in its copy: commits work with terminal escapes in
    it and a nested repository (and ``.gitattributes`` when ``attributes``), then, when no
    git of its own runs any more, plants commands everywhere coi might run one."""
    assert re.fullmatch(r"[A-Za-z0-9/._-]+", marker), marker
    commit_attributes = (f"printf '{ATTRIBUTES}' > .gitattributes && git add .gitattributes && "
                         "git commit -q -m 'agent: attributes'" if attributes else ":")
    return f"""set -eu
nasty=$(printf '{NASTY_SH}')
# ---- the agent's work, committed
printf 'clear%s\\nline two\\r+forged added line\\n' "$nasty" > "esc-$nasty.txt"
printf 'print("v2")\\n' > src/app.py
ln -s /etc/passwd passwd-link
git add -A
git -c "user.name=Evil$nasty Agent" commit -q -m "agent$nasty: one"
mkdir -p vendor/lib scratch
(cd vendor/lib && git init -q && printf 'v1\\n' > f && git add f &&
 git -c user.name=n -c user.email=n@example.invalid commit -q -m nested)
(cd scratch && git init -q && printf 'v1\\n' > f && git add f &&
 git -c user.name=n -c user.email=n@example.invalid commit -q -m scratch)
git add vendor/lib 2>/dev/null
git commit -q -m "agent: vendor$nasty"
{commit_attributes}
# ---- from here on no git runs in the copy: all that follows waits for coi on the host
printf '{ATTRIBUTES}' >> .gitattributes
printf 'v2\\n' > vendor/lib/f  # as long as before: only its content tells git it changed
printf 'v2\\n' > scratch/f
printf 'changed\\n' >> README
printf 'uncommitted%s\\n' "$nasty" > "new-$nasty.txt"
{_plant_function(marker)}
plant .git top
plant vendor/lib/.git nested
plant scratch/.git scratch
"""


# ---- what coi prints ---------------------------------------------------------------------

_RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # control characters but tab and newline


def assert_printable(output: bytes | str, what: str) -> None:
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    found = sorted(set(_RAW.findall(text)))
    assert not found, f"{what} printed raw control characters {found!r}: {text!r}"


# ---- the host: the person's repository, coi's state, the CLI -------------------------------

from gitrepos import first_commit, write  # noqa: E402

_SRC = str(Path(coi.__file__).resolve().parent.parent)
_BOOT = f"import sys; sys.path.insert(0, {_SRC!r}); from coi.cli.main import main; raise SystemExit(main())"


def git(cwd: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout


@dataclass
class Host:
    """The person's side: their repository, home and coi state; markers planted commands touch."""

    repo: Path
    home: Path
    state: Path
    pwned: Path  # planted commands touch files here
    socket: str  # the fake Incus daemon

    @property
    def marker(self) -> str:
        return str(self.pwned / "m")

    def fired(self) -> list[str]:
        return sorted(p.name for p in self.pwned.iterdir())

    def coi(self, *args: str, code: int | None = 0, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """``coi ARGS`` in the repository, as the person runs it; what it prints is checked
        to have no raw control characters."""
        env = {"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"), "PATH": os.environ["PATH"],
               "LANG": "C.UTF-8", "COI_SESSIONS_DIR": str(self.state), "INCUS_SOCKET": self.socket,
               "COI_CONTAINER_PREFIX": "coi-test-"}
        proc = subprocess.run([sys.executable, "-I", "-c", _BOOT, *args], cwd=self.repo, env=env,
                              capture_output=True, timeout=timeout)
        assert_printable(proc.stdout, f"coi {' '.join(args)} (stdout)")
        assert_printable(proc.stderr, f"coi {' '.join(args)} (stderr)")
        assert "Traceback" not in proc.stderr.decode("utf-8", "replace"), proc.stderr
        if code is not None:
            assert proc.returncode == code, (proc.stdout, proc.stderr)
        return proc

    def fingerprint(self) -> dict[str, bytes]:
        """The host repository's config and hooks, byte for byte."""
        dot = self.repo / ".git"
        found = {"config": (dot / "config").read_bytes()}
        for hook in sorted((dot / "hooks").iterdir()):
            found[f"hooks/{hook.name}"] = hook.read_bytes()
        return found


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, daemon) -> Host:
    home = tmp_path / "home"
    write(home / ".gitconfig", "[user]\n\tname = Host Person\n\temail = host@example.invalid\n")
    monkeypatch.setenv("HOME", str(home))  # coi's host-side git in this process reads it
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    repo = first_commit(tmp_path / "ws", git)
    daemon.on("GET", "/1.0/instances", sync([]))  # no container has any copy
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    return Host(repo, home, tmp_path / "state", pwned, daemon.path)


def new_copy(host: Host, name: str = "evil") -> copies.Branch:
    branch, _ = copies.reserve(host.state, host.repo, name)
    copies.fill(branch, carry=False)
    return branch


def as_agent(branch: copies.Branch, script: str) -> None:
    """``script`` run in the copy the way the agent runs it in its container (no config of the host's)."""
    proc = subprocess.run(["sh", "-c", script], cwd=branch.copy, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "HOME": "/nonexistent", "LANG": "C.UTF-8",
                               "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"})
    assert proc.returncode == 0, proc.stderr


def hostile(host: Host, *, attributes: bool = False) -> copies.Branch:
    branch = new_copy(host)
    as_agent(branch, hostile_script(host.marker, attributes=attributes))
    assert host.fired() == []  # planting ran nothing: whatever fires later is coi's doing
    return branch


def host_commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        write(repo / name, text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD").strip()


def agent_commits(branch: copies.Branch, *commits: dict[str, str | None]) -> str:
    """Commits in the copy (a None removes the file), before anything is planted."""
    for i, files in enumerate(commits):
        for name, text in files.items():
            if text is None:
                (branch.copy / name).unlink()
            else:
                write(branch.copy / name, text)
        as_agent(branch, f"git add -A && git commit -q -m 'agent {i}'")
    return git(branch.copy, "rev-parse", "HEAD").strip()


# ---- reading a hostile copy ------------------------------------------------------------------

def test_reviewing_a_hostile_copy_runs_nothing_and_prints_no_raw_escapes(host):
    branch = hostile(host)
    before = host.fingerprint()

    # The Python API: what coi list, diff, log, discard and a session's end do.
    state = review.status(branch)
    assert (state.problem, state.ahead) == (None, 2)
    assert state.uncommitted >= 4  # .gitattributes, README, new-*, scratch/
    review.statuses([branch, branch])
    found = review.diff(branch)
    assert f"esc-{NASTY}.txt" in {c.path for c in found.committed}
    assert f"new-{NASTY}.txt" in {c.path for c in found.uncommitted}
    review.diff(branch, committed_only=True)
    review.diff(branch, stat=True)
    head, commits = review.log(branch)
    assert [c.subject for c in commits] == [f"agent: vendor{NASTY}", f"agent{NASTY}: one"]
    assert commits[1].author == f"Evil{NASTY} Agent"
    review.what_is_lost(branch)
    assert review.bring_back(branch) == head
    assert host.fired() == []

    # The CLI: everything the agent wrote is shown escaped, and still shown.
    patch = host.coi("diff", "evil").stdout.decode()
    assert "+clear" in patch and "\\x1b[2J" in patch  # the agent's attributes hide nothing
    assert "+line two\\x0d+forged added line" in patch  # a carriage return makes no line of its own
    assert "\\x1b]0;pwned\\x07" in host.coi("diff", "evil", "--committed").stdout.decode()
    host.coi("diff", "evil", "--stat")
    data = json.loads(host.coi("diff", "evil", "--format", "json").stdout)
    assert {"vendor/lib", f"esc-{NASTY}.txt", "passwd-link"} <= {c["path"] for c in data["committed"]}
    assert f"new-{NASTY}.txt" in {c["path"] for c in data["uncommitted"]}
    log = host.coi("log", "evil").stdout.decode()
    assert "agentx\\x1b]0;pwned\\x07 \\x1b[2J \\x0d \\x9b2J" in log and "Evilx\\x1b" in log
    assert [c["subject"] for c in json.loads(host.coi("log", "evil", "--format", "json").stdout)["commits"]] == [
        c.subject for c in commits]
    [listed] = json.loads(host.coi("list", "--format", "json").stdout)["branch_sessions"]
    assert (listed["name"], listed["ahead"], listed["problem"]) == ("evil", 2, None)
    assert "coi/evil" in host.coi("list").stdout.decode()

    assert host.fired() == []
    assert host.fingerprint() == before


@pytest.mark.parametrize("mode", ["merge", "squash", "rebase"])
def test_merging_and_discarding_a_hostile_copy_runs_nothing(host, mode):
    branch = hostile(host)
    host_commit(host.repo, {"host.txt": "host\n"}, "host work")  # no fast-forward: git really merges
    before = host.fingerprint()
    flags = {"merge": [], "squash": ["--squash"], "rebase": ["--rebase"]}[mode]
    merged = host.coi("merge", "evil", *flags).stdout.decode()
    assert "Merged coi/evil into main: 2 commit(s)" in merged
    assert (host.repo / f"esc-{NASTY}.txt").is_file() and (host.repo / "host.txt").is_file()
    assert not (host.repo / ".gitattributes").exists()  # the uncommitted one stays in the copy
    assert git(host.repo, "status", "--porcelain") == ""
    assert host.fired() == []
    assert host.fingerprint() == before

    assert "Discarded coi/evil" in host.coi("discard", "evil", "--force").stdout.decode()
    assert not branch.copy.exists() and not branch.view.exists()
    assert host.fired() == []
    assert host.fingerprint() == before


def test_a_hostile_copy_with_committed_attributes_is_reviewed_but_not_merged(host):
    branch = hostile(host, attributes=True)
    before = host.fingerprint()
    head = git(host.repo, "rev-parse", "HEAD")
    assert review.status(branch).ahead == 3
    assert ".gitattributes" in {c.path for c in review.diff(branch).committed}
    assert "+* filter=evil diff=evil merge=evil" in host.coi("diff", "evil").stdout.decode()
    host.coi("log", "evil")
    host.coi("list")
    for flags in ([], ["--squash"], ["--rebase"]):
        refused = host.coi("merge", "evil", *flags, code=1).stderr.decode()
        assert "changes .gitattributes" in refused and "git merge coi/evil" in refused
        assert git(host.repo, "rev-parse", "HEAD") == head and git(host.repo, "status", "--porcelain") == ""
    host.coi("discard", "evil", "--force")
    assert host.fired() == []
    assert host.fingerprint() == before


def test_patches_and_messages_show_control_characters_escaped(capsys):
    """What coi prints of an agent's: a patch line by line (a lone carriage return or another
    line break shown, not obeyed; a CRLF file's line ends are no news), messages with their
    own newlines kept."""
    from coi.cli.render import render_patch
    from coi.cli.ui import UI

    ui = UI()
    render_patch(ui, "+crlf\r\n+one\rtwo\n+\x1b]0;t\x07\x0b\x0c\x85\u2028end\n".encode(), color=False)
    ui.error("first\nsecond \x1b[2J\x9b", "hint \r\x07")
    ui.warn("warned \x1b[31m")
    out, err = capsys.readouterr()
    assert out.split("\n") == ["+crlf", "+one\\x0dtwo", "+\\x1b]0;t\\x07\\x0b\\x0c\\x85\u2028end", ""]
    assert err == ("Error: first\nsecond \\x1b[2J\\x9b\nHint: hint \\x0d\\x07\n"
                   "Warning: warned \\x1b[31m\n")


# ---- git's control files ----------------------------------------------------------------------

CONTROL = "* filter=hostlfs diff=hostlfs merge=hostlfs\n"


@pytest.mark.parametrize("variant", [
    "top", "nested", "non-ascii directory", "escapes in the directory", "upper case", "added then removed",
    "moved away", ".gitmodules", ".lfsconfig"])
@pytest.mark.parametrize("mode", ["merge", "squash", "rebase"])
def test_a_branch_that_changes_gits_control_files_is_not_merged(host, variant, mode):
    """Attributes that name a filter of the person's own (git-lfs, git-crypt: here one that
    touches a marker) would run it on checkout; a refused merge checks nothing out."""
    git(host.repo, "config", "filter.hostlfs.smudge", f"touch {host.pwned}/host-smudge; cat")
    git(host.repo, "config", "filter.hostlfs.clean", f"touch {host.pwned}/host-clean; cat")
    git(host.repo, "config", "merge.hostlfs.driver", f"touch {host.pwned}/host-merge-driver")
    branch = new_copy(host)
    commits = {
        "top": [{".gitattributes": CONTROL, "a.txt": "a\n"}],
        "nested": [{"docs/.gitattributes": CONTROL, "docs/a.txt": "a\n"}],
        "non-ascii directory": [{"dé/.gitattributes": CONTROL, "dé/a.txt": "a\n"}],
        "escapes in the directory": [{f"d{NASTY}/.gitattributes": CONTROL, f"d{NASTY}/a.txt": "a\n"}],
        "upper case": [{".GitAttributes": CONTROL, "a.txt": "a\n"}],
        "added then removed": [{".gitattributes": CONTROL, "a.txt": "a\n"}, {".gitattributes": None, "a.txt": "b\n"}],
        "moved away": [{".gitattributes": CONTROL, "a.txt": "a\n"}, {".gitattributes": None, "kept": CONTROL}],
        ".gitmodules": [{".gitmodules": '[submodule "x"]\n\tpath = x\n\turl = ../evil\n', "a.txt": "a\n"}],
        ".lfsconfig": [{".lfsconfig": "[lfs]\n\turl = http://127.0.0.1:9/\n", "a.txt": "a\n"}],
    }[variant]
    agent_commits(branch, *commits)
    host_commit(host.repo, {"host.txt": "host\n"}, "host work")
    head = git(host.repo, "rev-parse", "HEAD")
    before = host.fingerprint()
    flags = {"merge": [], "squash": ["--squash"], "rebase": ["--rebase"]}[mode]
    refused = host.coi("merge", "evil", *flags, code=1).stderr.decode()
    assert "coi does not merge that" in refused, refused
    assert "review it (coi diff evil) and merge it yourself: git merge coi/evil" in refused
    assert git(host.repo, "rev-parse", "HEAD") == head
    assert git(host.repo, "status", "--porcelain") == "" and not (host.repo / "a.txt").exists()
    assert host.fired() == []
    assert host.fingerprint() == before


@pytest.mark.parametrize("where", [".git", ".GIT", "sub/.git", "sub/.Git"])
def test_a_commit_that_holds_a_git_directory_is_not_brought_back(host, where):
    """A tree made by hand (git mktree) with a git directory in it: written out on the host,
    its hooks and config would be the repository's own, or a nested one's that git runs
    ``git status`` in. The fetch checks objects (fsck): nothing of it reaches the host."""
    branch = new_copy(host)
    hook = f"#!/bin/sh\ntouch {host.marker}-committed-hook\n"
    config = f'[core]\n\tfsmonitor = "touch {host.marker}-committed-fsmonitor"\n'
    *outer, inner = where.split("/")
    lines = ["set -eu",
             f"hook=$(printf '%s' '{hook}' | git hash-object -w --stdin)",
             f"config=$(printf '%s' '{config}' | git hash-object -w --stdin)",
             "hooks=$(printf '100755 blob %s\\tpost-checkout\\n' \"$hook\" | git mktree)",
             "tree=$(printf '040000 tree %s\\thooks\\n100644 blob %s\\tconfig\\n' \"$hooks\" \"$config\" | git mktree)",
             *(f"tree=$(printf '040000 tree %s\\t{name}\\n' \"$tree\" | git mktree)" for name in [inner, *outer]),
             "git update-ref HEAD \"$(git commit-tree -p HEAD -m 'agent: a git directory' \"$tree\")\""]
    as_agent(branch, "\n".join(lines))
    assert where + "/hooks/post-checkout" in git(branch.copy, "ls-tree", "-r", "--name-only", "HEAD").split("\n")
    before = host.fingerprint()
    with pytest.raises(CoiError, match="could not bring coi/evil back"):
        review.bring_back(branch)
    assert "could not bring coi/evil back" in host.coi("merge", "evil", code=1).stderr.decode()
    assert git(host.repo, "rev-parse", "coi/evil").strip() == branch.base
    assert not (host.repo / "sub").exists() and git(host.repo, "status", "--porcelain") == ""
    assert host.fired() == []
    assert host.fingerprint() == before


# ---- .git is not a directory of the copy's ------------------------------------------------------

@pytest.mark.parametrize("variant", ["link to its own", "link to the host's", "gitdir file"])
def test_a_copy_whose_git_is_a_link_or_a_file_is_not_read(host, variant):
    branch = hostile(host)
    dot = branch.copy / ".git"
    os.rename(dot, branch.copy / "real-git")
    if variant == "link to its own":
        dot.symlink_to("real-git")
    elif variant == "link to the host's":
        dot.symlink_to(host.repo / ".git")
    else:
        dot.write_text("gitdir: real-git\n")
    before = host.fingerprint()
    host_objects = sorted((host.repo / ".git" / "objects").rglob("*"))

    assert "deleted or renamed" in review.status(branch).problem
    with pytest.raises(CoiError, match="deleted or renamed"):
        review.bring_back(branch)
    for args in (["diff", "evil"], ["log", "evil"], ["merge", "evil"], ["merge", "evil", "--rebase"]):
        assert "deleted or renamed" in host.coi(*args, code=1).stderr.decode()
    [listed] = json.loads(host.coi("list", "--format", "json").stdout)["branch_sessions"]
    assert "deleted or renamed" in listed["problem"]
    host.coi("list")
    host.coi("discard", "evil", "--force")
    assert not os.path.lexists(branch.copy)
    assert host.fired() == []
    assert host.fingerprint() == before
    assert sorted((host.repo / ".git" / "objects").rglob("*")) == host_objects
    assert git(host.repo, "rev-parse", "HEAD")


# ---- objects of the person's other repositories ---------------------------------------------

@pytest.fixture
def secret(tmp_path: Path) -> tuple[Path, str]:
    """Another repository of the person's: its objects both packed and loose, and its commit."""
    path = tmp_path / "secret"
    path.mkdir()
    git(path, "init", "-q")
    write(path / "key.txt", "the person's secret\n")
    git(path, "add", "-A")
    git(path, "-c", "user.name=P", "-c", "user.email=p@example.invalid", "commit", "-qm", "secret")
    git(path, "repack", "-a", "-q")  # a pack, and the loose objects kept
    return path / ".git" / "objects", git(path, "rev-parse", "HEAD").strip()


@pytest.mark.parametrize("variant", ["alternates", "objects link", "pack link", "loose links"])
def test_objects_of_other_repositories_are_not_brought_in(host, secret, variant):
    """The agent names a commit of another repository (it saw the id somewhere: a submodule,
    a public project) as its tip and points its object store there: were it read, the
    session's end would copy that repository's objects into this one, where the next
    session reads them (the host repository's objects are mounted into every session)."""
    objects, commit = secret
    branch = new_copy(host)
    mine = branch.copy / ".git" / "objects"
    if variant == "alternates":
        with open(mine / "info" / "alternates", "a") as fh:
            fh.write(f"{objects}\n")
    elif variant == "objects link":
        shutil.rmtree(mine)
        mine.symlink_to(objects)
    elif variant == "pack link":
        shutil.rmtree(mine / "pack")
        (mine / "pack").symlink_to(objects / "pack")
    else:
        for sub in objects.iterdir():
            if len(sub.name) == 2 and not (mine / sub.name).exists():
                (mine / sub.name).symlink_to(sub)
    (branch.copy / ".git" / "refs" / "heads" / "coi" / "evil").write_text(commit + "\n")

    assert "object" in review.status(branch).problem
    with pytest.raises(CoiError):
        review.bring_back(branch)
    for args in (["diff", "evil"], ["log", "evil"], ["merge", "evil"]):
        host.coi(*args, code=1)
    assert subprocess.run(["git", "cat-file", "-e", commit], cwd=host.repo, capture_output=True).returncode != 0
    host.coi("discard", "evil", "--force")
    assert (objects / "pack").is_dir() and any(objects.iterdir())  # the links went, not what they named


def test_an_alternates_fifo_blocks_nothing(host):
    branch = new_copy(host)
    alternates = branch.copy / ".git" / "objects" / "info" / "alternates"
    alternates.unlink()
    os.mkfifo(alternates)
    for args in (["diff", "evil"], ["log", "evil"], ["merge", "evil"]):
        host.coi(*args, code=1, timeout=30)
    [listed] = json.loads(host.coi("list", "--format", "json", timeout=30).stdout)["branch_sessions"]
    assert listed["problem"]


def test_a_fifo_where_git_reads_a_file_ends_in_an_error_not_a_hang(host, monkeypatch):
    from coi.branches import review
    from coi.errors import CoiError

    monkeypatch.setattr(copies, "COPY_TIMEOUT", 3.0)
    branch = new_copy(host)
    os.mkfifo(branch.copy / ".gitignore")  # git opens it to read the ignore rules, and waits
    assert "did not finish" in (review.status(branch).problem or "")
    with pytest.raises(CoiError, match="did not finish"):
        review.diff(branch)


# ---- git's own messages about the agent's files ------------------------------------------------

def test_conflicts_in_files_with_escapes_in_their_names_are_reported_escaped(host):
    git(host.repo, "config", "core.quotePath", "false")  # git writes bytes above 0x7f as they are
    branch = new_copy(host)
    name = f"clash{NASTY}.txt"
    write(branch.copy / name, "agent\n")
    as_agent(branch, f"git add -A && git commit -q -m \"$(printf '{NASTY_SH}')\"")
    host_commit(host.repo, {name: "host\n"}, "host: clash")
    head = git(host.repo, "rev-parse", "HEAD")
    for flags in ([], ["--squash"], ["--rebase"]):
        refused = host.coi("merge", "evil", *flags, code=1).stderr.decode()
        assert "conflicts in" in refused and "nothing was changed" in refused
        assert git(host.repo, "rev-parse", "HEAD") == head and git(host.repo, "status", "--porcelain") == ""


def test_a_git_error_that_quotes_a_file_name_is_printed_escaped(host):
    """git names the nested repository without a commit in its error, as the agent named it."""
    branch = new_copy(host)
    empty = branch.copy / f"empty{NASTY}"
    empty.mkdir()
    as_agent(branch, f"cd \"$(printf 'empty{NASTY_SH}')\" && git init -q")
    failed = host.coi("diff", "evil", code=1).stderr.decode()
    assert "does not have a commit checked out" in failed
    host.coi("list")


# ---- deleting a copy --------------------------------------------------------------------

def test_discard_deletes_the_links_in_a_copy_not_what_they_point_to(host, tmp_path):
    branch = hostile(host)
    victim = write(tmp_path / "victim" / "precious.txt", "keep me\n")
    for name, target in (("file-link", victim), ("dir-link", victim.parent), ("repo-link", host.repo),
                         ("vendor/lib/.git/objects/pack-link", victim.parent)):
        (branch.copy / name).symlink_to(target)
    host.coi("discard", "evil", "--force")
    assert not branch.copy.exists() and not branch.meta.exists()
    assert victim.read_text() == "keep me\n"
    assert git(host.repo, "rev-parse", "HEAD") and (host.repo / "README").is_file()
    assert "coi/evil" not in git(host.repo, "branch", "--list")
    assert host.fired() == []


# ---- the real daemon: the agent in its container -------------------------------------------

@pytest.fixture
def real_repo(session_user, workspace):
    """The workspace as the test user's repository, one commit on main (as tests/e2e do)."""
    home_config = session_user.home / ".gitconfig"
    home_config.write_text("[user]\n\tname = Host Person\n\temail = host@example.invalid\n")
    os.chown(home_config, session_user.uid, session_user.gid)
    write(workspace / "README", "hello\n")
    write(workspace / "src" / "app.py", "print('v1')\n")
    subprocess.run(["chown", "-R", f"{session_user.uid}:{session_user.gid}", str(workspace)], check=True)
    for args in (["init", "-q", "--initial-branch=main"], ["add", "-A"], ["commit", "-qm", "first"]):
        real_git(session_user, workspace, *args)
    yield workspace
    home_config.unlink(missing_ok=True)


@pytest.fixture
def real_marker(session_user):
    """A path under the test user's home on the host (no such directory in the container)."""
    prefix = session_user.home / f"coi-pwned-{uuid.uuid4().hex[:8]}"
    yield prefix
    for path in session_user.home.glob(prefix.name + "*"):
        path.unlink()


def real_fired(prefix: Path) -> list[str]:
    return sorted(p.name for p in prefix.parent.glob(prefix.name + "*"))


def real_git(user, repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(user.argv(["git", *args]), cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc


def real_coi(user, repo: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = user.run(list(args), cwd=repo)
    assert_printable(proc.stdout, f"coi {' '.join(args)} (stdout)")
    assert_printable(proc.stderr, f"coi {' '.join(args)} (stderr)")
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc


def real_fingerprint(repo: Path) -> dict[str, bytes]:
    dot = repo / ".git"
    return {"config": (dot / "config").read_bytes(),
            **{f"hooks/{h.name}": h.read_bytes() for h in sorted((dot / "hooks").iterdir())}}


def test_real_hostile_agent_runs_nothing_on_the_host(session_user, real_repo, real_marker):
    before = real_fingerprint(real_repo)
    proc = session_user.run(["run", "--branch", "evil", "--", "sh", "-c", hostile_script(str(real_marker))],
                            cwd=real_repo)
    assert proc.returncode == 0, proc.stderr
    assert real_fired(real_marker) == []  # the session's end brought the branch back: nothing ran
    assert real_git(session_user, real_repo, "rev-parse", "coi/evil").stdout.strip()

    real_coi(session_user, real_repo, "diff", "evil")
    real_coi(session_user, real_repo, "diff", "evil", "--stat")
    data = json.loads(real_coi(session_user, real_repo, "diff", "evil", "--format", "json").stdout)
    assert f"esc-{NASTY}.txt" in {c["path"] for c in data["committed"]}
    assert "\\x1b]0;pwned\\x07" in real_coi(session_user, real_repo, "log", "evil").stdout
    log = json.loads(real_coi(session_user, real_repo, "log", "evil", "--format", "json").stdout)
    assert log["commits"][-1]["subject"] == f"agent{NASTY}: one"
    real_coi(session_user, real_repo, "list")
    [listed] = [b for b in json.loads(real_coi(session_user, real_repo, "list", "--format", "json").stdout)
                ["branch_sessions"] if (b["name"], b["workspace"]) == ("evil", str(real_repo))]
    assert listed["problem"] is None and listed["ahead"] == 2
    assert "Merged coi/evil" in real_coi(session_user, real_repo, "merge", "evil").stdout
    assert (real_repo / f"esc-{NASTY}.txt").is_file()
    real_coi(session_user, real_repo, "discard", "evil", "--force")
    assert real_fired(real_marker) == []
    assert real_fingerprint(real_repo) == before


def test_real_hostile_agent_cannot_merge_gits_control_files(session_user, real_repo, real_marker):
    before = real_fingerprint(real_repo)
    script = hostile_script(str(real_marker), attributes=True)
    proc = session_user.run(["run", "--branch", "evil", "--", "sh", "-c", script], cwd=real_repo)
    assert proc.returncode == 0, proc.stderr
    head = real_git(session_user, real_repo, "rev-parse", "HEAD").stdout
    for flags in ([], ["--squash"], ["--rebase"]):
        refused = real_coi(session_user, real_repo, "merge", "evil", *flags, code=1).stderr
        assert "coi does not merge that" in refused and "git merge coi/evil" in refused
        assert real_git(session_user, real_repo, "rev-parse", "HEAD").stdout == head
    real_coi(session_user, real_repo, "diff", "evil")
    real_coi(session_user, real_repo, "discard", "evil", "--force")
    assert real_fired(real_marker) == []
    assert real_fingerprint(real_repo) == before


def test_real_agent_cannot_bring_in_objects_of_other_repositories(session_user, real_repo):
    secret = session_user.home / "workspaces" / f"secret-{uuid.uuid4().hex[:8]}"
    secret.mkdir(parents=True)
    try:
        write(secret / "key.txt", "the person's secret\n")
        subprocess.run(["chown", "-R", f"{session_user.uid}:{session_user.gid}", str(secret)], check=True)
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "secret"]):
            real_git(session_user, secret, *args)
        commit = real_git(session_user, secret, "rev-parse", "HEAD").stdout.strip()
        script = (f"ref=$(git symbolic-ref HEAD) && "
                  f"printf '%s\\n' {secret / '.git' / 'objects'} >> .git/objects/info/alternates && "
                  f"printf '%s\\n' {commit} > \".git/$ref\"")
        proc = session_user.run(["run", "--branch", "evil", "--", "sh", "-c", script], cwd=real_repo)
        assert proc.returncode == 0, proc.stderr
        assert "was not brought back" in proc.stderr
        assert real_git(session_user, real_repo, "cat-file", "-e", commit, check=False).returncode != 0
        real_coi(session_user, real_repo, "merge", "evil", code=1)
        assert real_git(session_user, real_repo, "cat-file", "-e", commit, check=False).returncode != 0
        real_coi(session_user, real_repo, "discard", "evil", "--force")
    finally:
        shutil.rmtree(secret, ignore_errors=True)
