"""Where a branch session's copy lives, how coi makes it, and how coi reads it afterwards
without trusting it.

One workspace's copies live under ``<state>/branches/<workspace hash>/``:

- ``<NAME>/``: the copy, a repository of its own on branch ``coi/<NAME>``, mounted at
  ``/workspace``. Its objects directory borrows the host repository's objects through
  the relative alternate ``../../../.coi-repo/objects``, which resolves in the container
  to the read-only mount ``/.coi-repo/objects`` and on the host to the link below.
- ``.coi-repo``: a link to the host repository's git directory.
- ``.meta/<NAME>.json``: what coi knows of the session (workspace, base commit, ...).
- ``.meta/<NAME>.git``: the copy's *view*, a bare repository of coi's own whose objects
  are the copy's and the host's (alternates coi wrote). Every read of the copy's work
  goes through it; the copy's own config, hooks and index are never used on the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from coi import naming
from coi.branches import git
from coi.errors import CoiError, ConflictError, NotFoundError, UsageError

PREFIX = "coi/"  # every session's branch is coi/<NAME>


CONTAINER_OBJECTS = "/.coi-repo/objects"  # the host repository's objects in the container (read-only)


ALTERNATE = "../../../.coi-repo/objects"  # from <copy>/.git/objects: the same place in both worlds


_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


_HEX = {"sha1": re.compile(rb"[0-9a-f]{40}"), "sha256": re.compile(rb"[0-9a-f]{64}")}


def check_name(name: str) -> str:
    """NAME (``coi/NAME`` is taken too), checked to make a plain branch and directory name."""
    name = name.removeprefix(PREFIX)
    if not _NAME.fullmatch(name) or name.endswith("-"):
        raise UsageError(f"branch name {name!r} is not allowed",
                         "use lower-case letters, digits and '-', at most 40 (the branch is coi/NAME)")
    return name


# ---- the host repository ---------------------------------------------------------------

@dataclass(frozen=True)
class Repository:
    """The host repository a workspace is: its top, its (common) git directory, its objects."""

    top: Path
    git_dir: Path
    object_format: str

    @property
    def objects(self) -> Path:
        return self.git_dir / "objects"

    def git(self, args: list[str], **kw: Any):
        """git in the host repository: the person's own config, with coi's hooks-off flags."""
        return git.run(args, cwd=self.top, isolated=False, **kw)

    def head(self) -> str:
        proc = self.git(["rev-parse", "--verify", "-q", "HEAD^{commit}"], check=False)
        if proc.returncode != 0:
            raise CoiError(f"the repository {self.top} has no commit yet", "commit something first: a branch starts "
                           "from HEAD")
        return proc.stdout.decode().strip()

    def has_ref(self, ref: str) -> bool:
        return self.git(["rev-parse", "--verify", "-q", ref], check=False).returncode == 0


def repository(workspace: Path) -> Repository:
    """The git repository whose top is ``workspace``; anything else is a clear error."""
    proc = git.run(["rev-parse", "--show-toplevel", "--git-common-dir", "--show-object-format"],
                   cwd=workspace, isolated=False, check=False)
    if proc.returncode != 0:
        raise UsageError(f"branch sessions need a git repository, and {workspace} is not one",
                         "run 'git init' and commit there, or start the session without --branch")
    top, common, fmt = proc.stdout.decode().splitlines()[:3]
    if os.path.realpath(top) != os.path.realpath(workspace):
        raise UsageError(f"branch sessions need the top of a repository: {workspace} is inside {top}",
                         f"run coi in {top}, or start the session without --branch")
    git_dir = Path(os.path.realpath(Path(workspace, common)))
    if (git_dir / "objects" / "info" / "alternates").exists():
        raise CoiError(f"{top} borrows objects from another repository (objects/info/alternates); "
                       "coi cannot share them with a session", "git repack -a -d there, then try again")
    return Repository(Path(top), git_dir, fmt or "sha1")


# ---- one workspace's copies ------------------------------------------------------------

@dataclass(frozen=True)
class Branch:
    """A branch session's copy and what coi recorded of it."""

    name: str
    workspace: Path
    base: str  # the commit the session started from
    created_at: str
    root: Path  # <state>/branches/<hash>
    git_dir: Path  # the host repository's git directory when the copy was made
    object_format: str = "sha1"

    @property
    def branch(self) -> str:
        return PREFIX + self.name

    @property
    def ref(self) -> str:
        return "refs/heads/" + self.branch

    @property
    def copy(self) -> Path:
        return self.root / self.name

    @property
    def view(self) -> Path:
        return self.root / ".meta" / f"{self.name}.git"

    @property
    def meta(self) -> Path:
        return self.root / ".meta" / f"{self.name}.json"

    @property
    def objects(self) -> Path:
        """The host repository's objects: mounted read-only into the session."""
        return self.git_dir / "objects"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "branch": self.branch, "workspace": str(self.workspace), "base": self.base,
                "created_at": self.created_at, "path": str(self.copy)}


def workspace_root(state_dir: Path, workspace: Path) -> Path:
    return state_dir / "branches" / naming.workspace_hash(str(workspace))


def _load(meta: Path, root: Path) -> Branch | None:
    try:
        data = json.loads(meta.read_text())
        return Branch(name=check_name(data["name"]), workspace=Path(data["workspace"]), base=data["base"],
                      created_at=data.get("created_at", ""), root=root, git_dir=Path(data["git_dir"]),
                      object_format=data.get("object_format", "sha1"))
    except (OSError, ValueError, KeyError, TypeError, CoiError):
        return None


def all_branches(state_dir: Path, workspace: Path | None = None) -> list[Branch]:
    """Every recorded copy (of ``workspace`` only, when given), by workspace then name."""
    top = state_dir / "branches"
    roots = [workspace_root(state_dir, workspace)] if workspace else sorted(top.glob("*")) if top.is_dir() else []
    found = []
    for root in roots:
        for meta in sorted((root / ".meta").glob("*.json")):
            branch = _load(meta, root)
            if branch and (workspace is None or branch.workspace == workspace):
                found.append(branch)
    return found


def find(state_dir: Path, workspace: Path, name: str | None) -> Branch:
    """The named copy of ``workspace``, or its only one when no name is given."""
    if name is not None:
        branch = _load(workspace_root(state_dir, workspace) / ".meta" / f"{check_name(name)}.json",
                       workspace_root(state_dir, workspace))
        if branch is None or branch.workspace != workspace:
            raise NotFoundError(f"no branch session {name} in {workspace}", "see 'coi list' for the branches")
        return branch
    mine = all_branches(state_dir, workspace)
    if not mine:
        raise NotFoundError(f"no branch sessions in {workspace}", "start one with: coi shell --branch")
    if len(mine) > 1:
        raise UsageError(f"{workspace} has {len(mine)} branch sessions: {', '.join(b.name for b in mine)}",
                         "name one, e.g. coi diff " + mine[0].name)
    return mine[0]


# ---- making a copy -------------------------------------------------------------------

_ADJECTIVES = ("amber", "brave", "brisk", "calm", "clever", "crisp", "eager", "fair", "fond", "gentle",
               "glad", "golden", "happy", "jolly", "keen", "kind", "lively", "lucky", "merry", "mild",
               "neat", "nimble", "noble", "plain", "proud", "quick", "quiet", "rapid", "ready", "sharp",
               "shy", "steady", "sunny", "swift", "tidy", "vivid", "warm", "wise", "witty", "young")


_NOUNS = ("badger", "beaver", "bison", "crane", "dingo", "eagle", "falcon", "ferret", "finch", "gecko",
          "heron", "ibis", "koala", "lark", "lemur", "lynx", "marten", "moose", "newt", "ocelot",
          "otter", "owl", "panda", "puffin", "quail", "raven", "robin", "salmon", "seal", "sparrow",
          "stoat", "swan", "tapir", "toucan", "trout", "viper", "walrus", "wombat", "wren", "yak")


def generated_name() -> str:
    import secrets

    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"


def reserve(state_dir: Path, workspace: Path, name: str | None) -> tuple[Branch, Repository]:
    """A new, empty copy for ``name`` (or a generated name), and the host repository: the
    copy's directory, its repository on ``coi/<NAME>`` at the host's HEAD, its view and its
    record, and the branch in the host repository. The files come with ``fill``."""
    repo = repository(workspace)
    base = repo.head()
    root = workspace_root(state_dir, workspace)
    (root / ".meta").mkdir(parents=True, exist_ok=True, mode=0o700)
    _link_repository(root, repo)
    for attempt in range(50):
        wanted = check_name(name) if name else generated_name() if attempt < 40 else f"{generated_name()}-{attempt}"
        taken = (root / ".meta" / f"{wanted}.json").exists() or repo.has_ref(f"refs/heads/{PREFIX}{wanted}")
        if taken and name:
            raise ConflictError(f"branch {PREFIX}{wanted} already exists in {repo.top}",
                                f"pick another name, or delete it first: git branch -D {PREFIX}{wanted}")
        if taken:
            continue
        try:
            (root / wanted).mkdir(mode=0o755)
        except FileExistsError:  # another session took the name a moment ago
            if name:
                raise ConflictError(f"branch session {wanted} is being created by another coi") from None
            continue
        branch = Branch(name=wanted, workspace=workspace, base=base, root=root, git_dir=repo.git_dir,
                        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        object_format=repo.object_format)
        try:
            _init(branch, repo)
        except BaseException:
            forget(branch, repo)
            raise
        return branch, repo
    raise ConflictError("no free branch name found", "name the branch: --branch NAME")


def _link_repository(root: Path, repo: Repository) -> None:
    link = root / ".coi-repo"
    if os.path.islink(link) and os.readlink(link) == str(repo.git_dir):
        return
    tmp = root / f".coi-repo.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(repo.git_dir)
    os.replace(tmp, link)


def _init(branch: Branch, repo: Repository) -> None:
    """The host's branch, the view and the record of a reserved copy (its files: ``fill``)."""
    fmt = f"--object-format={branch.object_format}"
    # The host's branch first: it keeps every object the copy borrows reachable there.
    repo.git(["update-ref", "--no-deref", "-m", "coi: branch session", branch.ref, branch.base, ""])
    git.run(["init", "-q", "--bare", fmt, f"--initial-branch={branch.branch}", str(branch.view)], isolated=True)
    (branch.view / "objects" / "info" / "alternates").write_text(
        f"{branch.copy / '.git' / 'objects'}\n{repo.objects}\n")
    tmp = branch.meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({**branch.to_json(), "git_dir": str(branch.git_dir),
                               "object_format": branch.object_format}, indent=2) + "\n")
    os.replace(tmp, branch.meta)


def _new_repository(path: Path, *, object_format: str, branch: str, commit: str) -> None:
    """An empty repository at ``path`` on ``branch`` at ``commit``, borrowing the host's objects."""
    git.run(["init", "-q", f"--object-format={object_format}", f"--initial-branch={branch}", str(path)],
            isolated=True)
    dot = path / ".git"
    (dot / "objects" / "info" / "alternates").write_text(ALTERNATE + "\n")
    ref = dot / "refs" / "heads" / branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit + "\n")


def _identity(repo: Repository) -> str:
    """The person's git identity for the agent's commits (coi's own when they have none)."""
    found = dict(line.split(" ", 1) for line in git.text(
        ["config", "--get-regexp", r"^user\.(name|email)$"], cwd=repo.top, isolated=False,
        check=False).splitlines() if " " in line)
    name = found.get("user.name", "coi agent").replace("\n", " ")
    email = found.get("user.email", "agent@coi.invalid").replace("\n", " ")
    return f"[user]\n\tname = {json.dumps(name)}\n\temail = {json.dumps(email)}\n"


def fill(branch: Branch, *, carry: bool, spare: bool = False, exclude: Sequence[str] = ()) -> None:
    """The new copy's files: the base checked out (with ``carry``, the host's uncommitted
    changes, staged, unstaged and untracked, not ignored, arrive as uncommitted changes;
    ``exclude``, git pathspecs, leaves paths out of them: the masked ones).

    With ``spare`` the workspace's spare copy is taken when there is one (a rename, and
    only the files that differ are written); ``refill_spare`` makes the next one.
    """
    repo = repository(branch.workspace)
    have = _take_spare(branch) if spare else None  # the commit its files are at
    if have is None:
        _new_repository(branch.copy, object_format=branch.object_format, branch=branch.branch, commit=branch.base)
    dot = branch.copy / ".git"
    with open(dot / "config", "a") as fh:
        # minimal: the index coi writes on the host stays valid in the container, where
        # files show other owners (the mount maps them to code).
        fh.write("[core]\n\tcheckStat = minimal\n" + _identity(repo))
    tree = _working_tree(repo, objects=dot / "objects", scratch=branch.view, exclude=exclude) if carry \
        else branch.base
    if tree != have:  # only what differs is written
        git.run(["-c", "checkout.workers=0", "read-tree", "-u", "--reset", tree], cwd=branch.copy, isolated=True)
    if tree != branch.base:
        git.run(["reset", "-q", "--no-refresh", branch.base], cwd=branch.copy, isolated=True)
    shutil.copyfile(dot / "index", branch.view / "index")  # the view's index starts with valid stat data
    _mark_index(branch, branch.base)


# ---- the spare copy ---------------------------------------------------------------------
# One checked-out copy per workspace, kept ready under <root>/.spare: a branch session takes
# it with a rename, so its start does not wait for a checkout of every file. It is made by
# a background process (``python -I -m coi.branches.spare``) that holds <root>/.spare.lock.
# The spare is coi's alone: it is never mounted before it becomes a session's copy.

SPARE = ".spare"


SPARE_BRANCH = "coi-spare"


def _take_spare(branch: Branch) -> str | None:
    """The spare as ``branch``'s copy, on ``coi/NAME``: the commit its files are at, or None
    when there is no spare ready."""
    import fcntl

    spare = branch.root / SPARE
    with open(branch.root / ".spare.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a spare is being made: no waiting for it
        commit = _read_under(spare, [".git", "refs", "heads", SPARE_BRANCH], 512)
        if commit is None or not _HEX["sha1"].match(commit.strip()) or not (spare / ".git" / "index").is_file():
            return None
        os.rename(spare, branch.copy)  # over the empty directory reserve made
    dot = branch.copy / ".git"
    (dot / "refs" / "heads" / SPARE_BRANCH).unlink()
    (dot / "refs" / "heads" / "coi").mkdir(parents=True, exist_ok=True)
    (dot / "refs" / "heads" / "coi" / branch.name).write_text(branch.base + "\n")
    (dot / "HEAD").write_text(f"ref: {branch.ref}\n")
    return commit.strip().decode()


def refill_spare(state_dir: Path, workspace: Path) -> None:
    """Start the background process that makes the workspace's next spare, unless one runs.

    The spare's lock is taken here and handed to the process (the same open file), so
    that from this call's return until the spare is ready the lock is held: whoever waits
    for the lock waits for the spare.
    """
    import fcntl
    import subprocess
    import sys

    with open(workspace_root(state_dir, workspace) / ".spare.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # one is being made (or taken) right now
        subprocess.Popen([sys.executable, "-I", "-m", "coi.branches.spare", str(state_dir), str(workspace),
                          str(lock.fileno())], pass_fds=(lock.fileno(),), cwd="/", stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def make_spare(state_dir: Path, workspace: Path, *, locked: bool = False) -> None:
    """The workspace's spare, checked out at the host's HEAD (nothing when one is there or
    being made). ``locked``: the caller holds the spare's lock already."""
    import fcntl

    root = workspace_root(state_dir, workspace)
    if not locked:
        with open(root / ".spare.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            make_spare(state_dir, workspace, locked=True)
        return
    if (root / SPARE).exists():
        return
    repo = repository(workspace)
    _link_repository(root, repo)
    for stale in root.glob(".spare.tmp-*"):
        _remove_tree(stale)
    tmp = root / f".spare.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _new_repository(tmp, object_format=repo.object_format, branch=SPARE_BRANCH, commit=repo.head())
        git.run(["-c", "checkout.workers=0", "read-tree", "-u", "--reset", SPARE_BRANCH], cwd=tmp, isolated=True)
        os.rename(tmp, root / SPARE)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def remove_spares(state_dir: Path) -> int:
    """Every workspace's spare gone (each waits for one being made); how many there were."""
    import fcntl

    removed = 0
    for spare in sorted((state_dir / "branches").glob(f"*/{SPARE}")):
        with open(spare.parent / ".spare.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _remove_tree(spare)
            removed += 1
    return removed


def _working_tree(repo: Repository, *, objects: Path, scratch: Path, exclude: Sequence[str] = ()) -> str:
    """A tree of the host's working tree as it is, written into ``objects`` (the host
    repository is not changed), but for ``exclude``: those paths stay as the index has them
    (an untracked one stays out), and none of their content is written."""
    index = scratch / "carry.index"
    if (repo.git_dir / "index").exists():
        shutil.copyfile(repo.git_dir / "index", index)
    env = {"GIT_INDEX_FILE": str(index), "GIT_OBJECT_DIRECTORY": str(objects),
           "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(repo.objects)}
    try:
        repo.git(["add", "-A", "--", ".", *exclude], env=env)
        return git.text(["write-tree"], cwd=repo.top, isolated=False, env=env)
    finally:
        index.unlink(missing_ok=True)


def forget(branch: Branch, repo: Repository | None = None) -> None:
    """Everything of a copy gone: its files, view, record and host branch (when it still
    points where coi left it or ``repo`` is given)."""
    _remove_tree(branch.copy)
    _remove_tree(branch.view)
    branch.meta.unlink(missing_ok=True)
    if repo is not None:
        repo.git(["update-ref", "-d", branch.ref], check=False)


class RemoveError(CoiError):
    """Part of a copy could not be deleted (files the container's root made)."""


def _remove_tree(path: Path) -> None:
    if not os.path.lexists(path):
        return
    problems: list[str] = []
    shutil.rmtree(path, onerror=lambda fn, p, exc: problems.append(p))  # links are removed, never followed
    if problems:
        raise RemoveError(f"could not delete {len(problems)} file(s) in {path} (made by root in the container?)",
                          f"delete them yourself: sudo rm -rf {path}")


# ---- reading a copy without trusting it ---------------------------------------------------

def read_tip(branch: Branch) -> str | None:
    """The commit ``coi/<NAME>`` points to in the copy, read as data: the loose ref or the
    packed-refs line, opened without following links; None when there is none."""
    pattern = _HEX.get(branch.object_format, _HEX["sha1"])
    loose = _read_under(branch.copy, [".git", "refs", "heads", "coi", branch.name], 512)
    if loose is not None:
        value = loose.strip()
        return value.decode() if pattern.fullmatch(value) else None
    packed = _read_under(branch.copy, [".git", "packed-refs"], 64 << 20)
    for line in (packed or b"").splitlines():
        value, _, ref = line.partition(b" ")
        if ref.strip() == branch.ref.encode() and pattern.fullmatch(value):
            return value.decode()
    return None


def _read_under(top: Path, parts: list[str], limit: int) -> bytes | None:
    """The file at ``top/parts...`` when every step is a real directory and the last a
    regular file (no links followed); None otherwise."""
    import stat

    fds: list[int] = []
    try:
        fds.append(os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))
        for part in parts[:-1]:
            fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1])
        fds.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


# How long one git command on a copy may take: the agent can make git block (a FIFO
# where git reads a file) or work for ever; coi gives up and says so.
COPY_TIMEOUT = 300.0


def view_git(branch: Branch, args: list[str], **kw: Any):
    """git in the copy's view, with coi's config only, and a time limit."""
    kw.setdefault("timeout", COPY_TIMEOUT)
    try:
        return git.run(args, git_dir=branch.view, isolated=True, **kw)
    except git.GitTimeout:
        (branch.view / "index.lock").unlink(missing_ok=True)  # the killed git's, in coi's own view
        raise


def view_text(branch: Branch, args: list[str], **kw: Any) -> str:
    """Standard output of ``view_git``, stripped."""
    return view_git(branch, args, **kw).stdout.decode("utf-8", "replace").strip()


def tip(branch: Branch) -> str:
    """The copy's branch tip, checked to be a commit the view can read (from an object store
    as coi made it)."""
    found = read_tip(branch)
    if found is None:
        raise CoiError(f"the copy of {branch.branch} has no branch {branch.branch} any more "
                       "(the agent deleted or renamed it)",
                       f"look in {branch.copy}, or discard it: coi discard {branch.name}")
    problem = _foreign_objects(branch.copy)
    if problem:
        raise CoiError(f"the copy of {branch.branch} {problem}, which would make coi read objects of other "
                       "repositories; coi does not read it", f"look in {branch.copy}, or discard it: "
                       f"coi discard {branch.name}")
    proc = view_git(branch, ["cat-file", "-t", found], check=False)
    if proc.stdout.strip() != b"commit":
        raise CoiError(f"{branch.branch} in the session's copy points to {found[:12]}, which is not a commit coi "
                       "can read", f"look in {branch.copy}, or discard it: coi discard {branch.name}")
    return found


def _foreign_objects(copy: Path) -> str | None:
    """What in the copy's object store is not as coi made it, or None. git follows links in
    an object store, reads what is there whatever it is and borrows from every alternate it
    names, so the view would read (and ``bring_back`` copy into the host repository, whose
    objects every session sees) objects of any repository the person can read. Checked on
    each read, not once: the agent can change it while its container runs (then it can
    also change it again right after this check)."""
    import stat

    objects = copy / ".git" / "objects"
    try:
        for path in (objects.parent, objects):
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return f"has {path.relative_to(copy)} as a link or file, not a directory"
        dirs = [objects]
        while dirs:
            with os.scandir(dirs.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(Path(entry.path))
                    elif not entry.is_file(follow_symlinks=False):
                        return f"has a link or special file in its object store ({os.path.relpath(entry.path, copy)})"
    except OSError as exc:
        return f"has an object store coi cannot read ({exc.strerror or exc})"
    alternates = _read_under(copy, [".git", "objects", "info", "alternates"], 4096) or b""
    if set(alternates.split()) - {ALTERNATE.encode()}:
        return "borrows objects from elsewhere (.git/objects/info/alternates)"
    return None


def snapshot(branch: Branch, head: str) -> str:
    """A tree of the copy's files as they are now (uncommitted work included), built in the
    view's own index; the copy's index and config are not used."""
    _sync_index(branch, head)
    _drop_gitlinks(branch)
    view_git(branch, ["add", "-A"], work_tree=branch.copy)
    return view_text(branch, ["write-tree"])


def _drop_gitlinks(branch: Branch) -> None:
    """Nested repositories out of the view's index before ``git add -A``: for one in the
    index, git runs ``git status`` inside it, with that repository's config (whose filters
    the agent wrote: they would run on the host). One not in the index is added afresh, from
    its HEAD alone."""
    listed = view_git(branch, ["ls-files", "--stage", "-z"], work_tree=branch.copy).stdout
    links = [entry.split(b"\t", 1)[1] for entry in listed.split(b"\0") if entry.startswith(b"160000 ")]
    if links:
        view_git(branch, ["update-index", "--force-remove", "-z", "--stdin"], work_tree=branch.copy,
                 input=b"\0".join(links) + b"\0")


def uncommitted(branch: Branch, head: str) -> list[tuple[str, str]]:
    """(status, path) of every file that differs from ``head`` in the copy (untracked included)."""
    _sync_index(branch, head)
    (branch.view / "HEAD").write_text(head + "\n")  # the view's HEAD: the tip, detached
    # dirty: a nested repository counts when its HEAD moved, not for its files; for those git
    # would run ``git status`` inside it, with that repository's config (see _drop_gitlinks).
    out = view_git(branch, ["status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames",
                            "--ignore-submodules=dirty"], work_tree=branch.copy).stdout
    changes = []
    for entry in out.split(b"\0"):
        if len(entry) > 3:
            changes.append((entry[:2].decode().strip() or "M", entry[3:].decode("utf-8", "replace")))
    return changes


def _sync_index(branch: Branch, head: str) -> None:
    """The view's index follows the tip (stat data kept for what is unchanged)."""
    mark = branch.view / "coi-index-tip"
    try:
        if mark.read_text().strip() == head:
            return
    except OSError:
        pass
    view_git(branch, ["read-tree", "--reset", head], work_tree=branch.copy)  # the index only (no -u)
    _mark_index(branch, head)


def _mark_index(branch: Branch, head: str) -> None:
    (branch.view / "coi-index-tip").write_text(head + "\n")
