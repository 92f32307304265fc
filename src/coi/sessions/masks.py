"""Secret masking: workspace files that match ``[security] masked_paths`` appear empty and
read-only in the container, each behind a disk device whose source is an empty file (or
directory) of coi's own.

How a pattern matches (docs/security.md, "Secret masking"):

- It is matched against the path relative to the workspace, ``/`` between the parts, case
  sensitive. ``*``, ``?`` and ``[...]`` match within one part (never a ``/``); ``**`` as a
  whole part matches any number of parts, none included.
- A pattern without a ``/`` (``*.pem``) matches that name at any depth; one with a ``/``
  at its start or in its middle (``/.env``, ``config/*.key``) is anchored at the top.
- A trailing ``/`` matches directories only. A matching directory is masked as a whole
  (one empty, read-only directory over it; nothing in it is looked at): ``secrets/**``
  matches the directory ``secrets`` itself.
- ``!pattern`` (the user's own config only) unmasks what earlier patterns matched; the
  last pattern that matches a path decides.

The scan of the workspace on the host never follows a link (every directory is opened
with ``O_NOFOLLOW`` from its parent), does not look inside version-control directories and
installed dependencies (``SKIPPED_DIRS``; only a pattern naming such a directory by its
exact name reaches inside), and stops after ``MAX_ENTRIES`` entries. A link that matches
is resolved the way the container sees it (the workspace at /workspace): a target inside
the workspace is masked, a link that leads elsewhere is left alone (in the container it
leads into the container's own files, never the host's). A regular file whose content
git already holds (the index has its exact blob, in a ``.git`` inside the workspace) is
not masked: the agent could read it from ``.git`` anyway.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from dataclasses import dataclass, field
from fnmatch import translate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from coi.errors import CoiError
from coi.sessions.spec import MASK_DEVICE, WORKSPACE

if TYPE_CHECKING:
    from coi.incus import IncusClient

# Version-control internals and installed dependencies: nothing of the person's own to mask,
# and a masked certificate bundle there (certifi's cacert.pem) would break the agent's tools.
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "site-packages", "vendor", "__pycache__"})


MAX_ENTRIES = 200_000  # directory entries one scan looks at (about 0.1 s here)


MAX_DEPTH = 64  # directory levels below the workspace


MAX_MASKS = 100  # one disk device each: more would slow every start down


_HASHED_LIMIT = 64 << 20  # files larger than this are masked without asking git


_SHOWN = 5  # masked paths named in the start line


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# ---- patterns ----------------------------------------------------------------------------

_ANY = "**"


@dataclass(frozen=True)
class _Part:
    """One part of a pattern: a literal name, a glob within one name, or ``**``."""

    text: str
    regex: re.Pattern[str] | None  # None: literal

    def matches(self, name: str) -> bool:
        return self.regex.fullmatch(name) is not None if self.regex else name == self.text

    def names(self, name: str) -> bool:
        """Whether this part names ``name`` exactly (what reaches into a skipped directory)."""
        return self.regex is None and name == self.text


@dataclass(frozen=True)
class Pattern:
    text: str
    parts: tuple[_Part, ...]
    negated: bool
    dir_only: bool


def parse(text: str) -> Pattern:
    """``text`` as a pattern (the config has checked it: no empty, ``.`` or ``..`` parts)."""
    negated = text.startswith("!")
    body = text[1:] if negated else text
    dir_only = body.endswith("/")
    body = body.removesuffix("/")
    anchored = "/" in body
    names = body.removeprefix("/").split("/")
    if not anchored:
        names = [_ANY, *names]
    parts: list[_Part] = []
    for name in names:
        if name == _ANY and parts and parts[-1].text == _ANY:
            continue  # a/**/**/b is a/**/b
        glob = name != _ANY and any(c in name for c in "*?[")
        parts.append(_Part(name, re.compile(translate(name)) if glob else None))
    return Pattern(text, tuple(parts), negated, dir_only)


def _match(parts: tuple[_Part, ...], names: tuple[str, ...], skipped: tuple[bool, ...], i: int = 0,
           j: int = 0) -> bool:
    """Whether ``parts`` match all of ``names``; a skipped directory among them is matched
    only by a literal part that names it (never by ``**`` or a glob)."""
    while i < len(parts):
        part = parts[i]
        if part.text == _ANY and part.regex is None:
            for k in range(j, len(names) + 1):
                if _match(parts, names, skipped, i + 1, k):
                    return True
                if k < len(names) and skipped[k]:
                    return False
            return False
        if j == len(names) or not part.matches(names[j]) or (skipped[j] and not part.names(names[j])):
            return False
        i, j = i + 1, j + 1
    return j == len(names)


def _reaches(parts: tuple[_Part, ...], names: tuple[str, ...], skipped: tuple[bool, ...], i: int = 0,
             j: int = 0) -> bool:
    """Whether ``parts`` could match a path below the directory ``names``."""
    while j < len(names):
        if i == len(parts):
            return False
        part = parts[i]
        if part.text == _ANY and part.regex is None:
            for k in range(j, len(names)):
                if _reaches(parts, names, skipped, i + 1, k):
                    return True
                if skipped[k]:
                    return False
            return True  # ** takes the rest of the directory's parts, and more below
        if not part.matches(names[j]) or (skipped[j] and not part.names(names[j])):
            return False
        i, j = i + 1, j + 1
    return i < len(parts)


def _by_name(pattern: Pattern) -> bool:
    """A pattern that matches a name at any depth (``**/NAME``), files and directories alike."""
    return len(pattern.parts) == 2 and pattern.parts[0].text == _ANY and pattern.parts[1].text != _ANY \
        and not pattern.dir_only


class Matcher:
    """The ordered patterns of ``[security] masked_paths``.

    The common case is fast: without negations, the patterns that match a name at any
    depth (all the defaults but ``secrets/**``) are one regular expression on the name."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(parse(p) for p in patterns)
        self._positive = tuple(p for p in self.patterns if not p.negated)
        self._anywhere = any(_by_name(p) for p in self._positive)  # reaches below every directory
        if any(p.negated for p in self.patterns):
            self._names, self._rest = None, self.patterns
        else:
            names = [p.parts[1] for p in self.patterns if _by_name(p)]
            self._names = re.compile("|".join(part.regex.pattern if part.regex else re.escape(part.text) + r"\Z"
                                              for part in names)) if names else None
            self._rest = tuple(p for p in self.patterns if not _by_name(p))

    @property
    def masks_anything(self) -> bool:
        return bool(self._positive)

    def masked(self, names: tuple[str, ...], *, is_dir: bool, skipped: tuple[bool, ...] | None = None) -> bool:
        """Whether the path ``names`` (its parts) is masked: the last pattern that matches decides.
        ``skipped``: which of its parent directories are in ``SKIPPED_DIRS``."""
        if self._names is not None and not (skipped and any(skipped)) and self._names.match(names[-1]):
            return True
        flags = (*(skipped or (False,) * (len(names) - 1)), False)
        verdict = False
        for pattern in self._rest:
            if (is_dir or not pattern.dir_only) and _match(pattern.parts, names, flags):
                verdict = not pattern.negated
        return verdict

    def reaches_below(self, names: tuple[str, ...], skipped: tuple[bool, ...]) -> bool:
        """Whether a pattern could mask something inside the directory ``names``."""
        if self._anywhere and not any(skipped):
            return True
        return any(_reaches(p.parts, names, skipped) for p in self._positive)


# ---- the scan ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Mask:
    """One masked path: ``rel`` (parts joined with ``/``), a directory or a file, and the
    matching link it was reached through, if any."""

    rel: str
    is_dir: bool
    via: str | None = None

    @property
    def shown(self) -> str:
        text = self.rel + ("/" if self.is_dir else "")
        return f"{self.via} -> {text}" if self.via else text


@dataclass(frozen=True)
class Scan:
    """What one scan of a workspace found."""

    masks: tuple[Mask, ...] = ()
    in_git: tuple[str, ...] = ()  # matching files whose content git holds: not masked
    unmaskable: tuple[str, ...] = ()  # names coi cannot hand to Incus safely (shown escaped)
    elsewhere: tuple[str, ...] = ()  # matching links that lead out of the workspace
    entries: int = 0
    truncated: bool = False
    seconds: float = 0.0


NOTHING = Scan()


@dataclass
class _Walk:
    matcher: Matcher
    root: int  # the workspace, open
    found: dict[str, Mask] = field(default_factory=dict)
    unmaskable: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    entries: int = 0
    truncated: bool = False


def scan(workspace: Path, patterns: Iterable[str]) -> Scan:
    """The paths of ``workspace`` to mask (see the module's docstring); nothing outside the
    workspace is opened or read."""
    started = time.monotonic()
    matcher = Matcher(patterns)
    if not matcher.masks_anything:
        return NOTHING
    root = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walk = _Walk(matcher, root)
    try:
        _visit(walk, root, (), ())
        masks = _outermost(walk.found.values())
        in_git = _known_to_git(workspace, root, [m for m in masks if not m.is_dir])
    finally:
        os.close(root)
    kept = []
    for mask in masks:
        if mask.rel in in_git:
            continue
        if _maskable(mask.rel):
            kept.append(mask)
        else:
            walk.unmaskable.append(_escaped(mask.rel))
    return Scan(tuple(kept), tuple(sorted(in_git)), tuple(walk.unmaskable), tuple(walk.elsewhere), walk.entries,
                walk.truncated, time.monotonic() - started)


def _visit(walk: _Walk, fd: int, names: tuple[str, ...], skipped: tuple[bool, ...]) -> None:
    """The entries of the directory ``fd`` (at ``names``), then its directories, depth first."""
    try:
        with os.scandir(fd) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError:
        return  # gone, or not ours to read (made by root in a container)
    below: list[str] = []
    for entry in entries:
        walk.entries += 1
        if walk.entries > MAX_ENTRIES:
            walk.truncated = True
            return
        here = (*names, entry.name)
        try:
            if entry.is_symlink():
                _link(walk, here, skipped)
            elif entry.is_dir(follow_symlinks=False):
                if walk.matcher.masked(here, is_dir=True, skipped=skipped):
                    walk.found["/".join(here)] = Mask("/".join(here), True)
                elif walk.matcher.reaches_below(here, (*skipped, entry.name in SKIPPED_DIRS)):
                    below.append(entry.name)
            elif entry.is_file(follow_symlinks=False) and walk.matcher.masked(here, is_dir=False, skipped=skipped):
                walk.found["/".join(here)] = Mask("/".join(here), False)
        except OSError:
            continue  # changed under the scan
    if len(names) >= MAX_DEPTH:
        walk.truncated = walk.truncated or bool(below)
        return
    for name in below:
        try:
            child = os.open(name, _NOFOLLOW_DIR, dir_fd=fd)
        except OSError:
            continue  # replaced by a link, or gone
        try:
            _visit(walk, child, (*names, name), (*skipped, name in SKIPPED_DIRS))
        finally:
            os.close(child)
        if walk.truncated:
            return


def _link(walk: _Walk, here: tuple[str, ...], skipped: tuple[bool, ...]) -> None:
    """A link whose name matches: its target masked when the container finds it in the workspace."""
    matcher = walk.matcher
    if not (matcher.masked(here, is_dir=False, skipped=skipped) or matcher.masked(here, is_dir=True, skipped=skipped)):
        return
    target = resolve(walk.root, here)
    if target is None:
        walk.elsewhere.append(_escaped("/".join(here)))
        return
    parts, is_dir = target
    if matcher.masked(here, is_dir=is_dir, skipped=skipped):
        rel = "/".join(parts)
        walk.found.setdefault(rel, Mask(rel, is_dir, via="/".join(here)))


def resolve(root: int, names: tuple[str, ...], *, hops: int = 40) -> tuple[tuple[str, ...], bool] | None:
    """Where the path ``names`` leads inside the container, where the workspace (``root``, an
    open directory) is /workspace: (its parts, whether a directory) when that is a file or a
    directory of the workspace, None when it leads elsewhere (or nowhere). Only ``lstat``
    and ``readlink`` are used, each from a directory opened without following links."""
    pending = list(names)
    done: list[str] = []
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if not done:
                return None  # above /workspace: the container's own files
            done.pop()
            continue
        parent = _open_dir(root, done)
        if parent is None:
            return None
        try:
            st = os.lstat(name, dir_fd=parent)
            target = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(st.st_mode) else None
        except OSError:
            return None
        finally:
            if parent != root:
                os.close(parent)
        if target is not None:
            hops -= 1
            if hops < 0:
                return None
            if target.startswith("/"):
                inside = target.rstrip("/") == WORKSPACE or target.startswith(WORKSPACE + "/")
                if not inside:
                    return None  # the container's own files (or another mount the person chose)
                done, pending = [], target[len(WORKSPACE):].split("/") + pending
            else:
                pending = target.split("/") + pending
        elif stat.S_ISDIR(st.st_mode):
            done.append(name)
        elif stat.S_ISREG(st.st_mode) and not pending:
            return tuple([*done, name]), False
        else:
            return None  # a special file, or a file used as a directory
    return (tuple(done), True) if done else None  # never the whole workspace


def _open_dir(root: int, names: list[str]) -> int | None:
    fd = root
    for name in names:
        try:
            child = os.open(name, _NOFOLLOW_DIR, dir_fd=fd)
        except OSError:
            child = None
        if fd != root:
            os.close(fd)
        if child is None:
            return None
        fd = child
    return fd


def _outermost(masks: Iterable[Mask]) -> list[Mask]:
    """Masks in path order, without those inside a masked directory (reached through a link)."""
    kept: list[Mask] = []
    dirs: set[str] = set()
    for mask in sorted(masks, key=lambda m: m.rel.split("/")):
        parts = mask.rel.split("/")
        if not any("/".join(parts[:i]) in dirs for i in range(1, len(parts))):
            kept.append(mask)
            if mask.is_dir:
                dirs.add(mask.rel)
    return kept


def _maskable(rel: str) -> bool:
    """A path Incus can take as a mount target: valid UTF-8, no control characters."""
    return not any(ord(c) < 0x20 or ord(c) == 0x7F or 0xDC80 <= ord(c) <= 0xDCFF for c in rel)


def _escaped(rel: str) -> str:
    """``rel`` fit for one line: invalid bytes and control characters as escapes."""
    text = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---- what git already holds ----------------------------------------------------------------

def _known_to_git(workspace: Path, root: int, files: list[Mask]) -> set[str]:
    """The files whose exact content is a blob of the index of ``<workspace>/.git``: the agent
    reads the same from ``.git`` in the container, so a mask would hide nothing. Anything
    unclear (no repository of its own, borrowed objects, git missing or slow) says none.

    git reads the workspace's index only: it runs in a blank repository of coi's, so no
    configuration of the project's (includes, a FIFO) is read. The index is the project's
    text too, but a file counts only when its content hashes to the id listed there, which
    whoever wrote the index knew already."""
    if not files or not _own_repository(root):
        return set()
    import tempfile

    from coi.branches import git

    # Named when they are few (the usual case); a long list would not fit an argv.
    named = ["--", *(m.rel for m in files)] if len(files) <= 1000 else []
    with tempfile.TemporaryDirectory(prefix="coi-masks-") as blank:
        _blank_repository(Path(blank), _object_format(root))
        try:
            proc = git.run(["--literal-pathspecs", "ls-files", "--stage", "-z", *named], cwd=workspace,
                           git_dir=Path(blank), work_tree=workspace, isolated=True, check=False, timeout=3,
                           env={"GIT_INDEX_FILE": str(workspace / ".git" / "index"), "GIT_NO_LAZY_FETCH": "1"})
        except CoiError:
            return set()
    if proc.returncode != 0:
        return set()
    staged: dict[str, str] = {}
    for record in proc.stdout.split(b"\0"):
        meta, _, path = record.partition(b"\t")
        fields = meta.split(b" ")
        if len(fields) == 3 and fields[2] == b"0" and fields[0] in (b"100644", b"100755"):
            staged[path.decode("utf-8", "surrogateescape")] = fields[1].decode("ascii", "replace")
    return {m.rel for m in files if m.rel in staged and _blob_id(root, m.rel, staged[m.rel]) == staged[m.rel]}


def _own_repository(root: int) -> bool:
    """Whether the workspace is a git repository with its objects inside it (so the container
    sees them): ``.git`` and ``.git/objects`` directories, an index, no ``commondir``, no
    alternates."""
    def kind(path: str) -> int | None:
        try:
            return stat.S_IFMT(os.lstat(path, dir_fd=root).st_mode)
        except OSError:
            return None
    return kind(".git") == stat.S_IFDIR and kind(".git/objects") == stat.S_IFDIR and \
        kind(".git/index") == stat.S_IFREG and kind(".git/commondir") is None and \
        kind(".git/objects/info/alternates") is None


def _object_format(root: int) -> str:
    """sha256 when ``.git/config`` says so (read as text, without following links), else sha1."""
    try:
        fd = os.open(".git/config", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=root)
    except OSError:
        return "sha1"
    try:
        text = os.read(fd, 1 << 16).decode("utf-8", "replace") if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)
    return "sha256" if re.search(r"^\s*objectformat\s*=\s*sha256\s*$", text, re.I | re.M) else "sha1"


def _blank_repository(path: Path, object_format: str) -> None:
    """An empty git directory of coi's own at ``path``, whose only config is the object format."""
    for sub in ("objects", "refs"):
        (path / sub).mkdir()
    (path / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "config").write_text("[core]\n\trepositoryformatversion = 1\n"
                                 f"[extensions]\n\tobjectformat = {object_format}\n")


def _blob_id(root: int, rel: str, like: str) -> str | None:
    """git's object id of the file ``rel`` (sha1 or sha256, as long as ``like``), read
    without following links; None when it is not a regular file or too large."""
    *dirs, name = rel.split("/")
    parent = _open_dir(root, dirs)
    if parent is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return None
    finally:
        if parent != root:
            os.close(parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _HASHED_LIMIT:
            return None
        digest = hashlib.sha256() if len(like) == 64 else hashlib.sha1()
        digest.update(b"blob %d\0" % st.st_size)
        left = st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                return None  # shrank while read
            digest.update(chunk)
            left -= len(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


# ---- the devices ------------------------------------------------------------------------

@dataclass(frozen=True)
class Sources:
    """coi's empty file and empty directory that masks are mounted from."""

    file: Path
    directory: Path


def sources(state_dir: Path, workspace_hash: str) -> Sources:
    """``<state>/masks/<workspace hash>/{empty,empty.d}``, made (or made again) empty: root in
    a container can remount its masks writable and fill them; every start begins afresh."""
    base = state_dir / "masks" / workspace_hash
    for path in (base.parent, base):
        try:
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CoiError(f"cannot make {path} for masked files: {exc.strerror or exc}") from None
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise CoiError(f"{path} is not a directory of yours; coi keeps its mask files there",
                           f"remove {path}")
    file, directory = base / "empty", base / "empty.d"
    if not _is_empty(file, directory=False):
        _set_aside(file)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
        try:
            os.fchmod(fd, 0o444)  # whatever the umask
        finally:
            os.close(fd)
    if not _is_empty(directory, directory=True):
        _set_aside(directory)
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o555)
    return Sources(file, directory)


def _is_empty(path: Path, *, directory: bool) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if st.st_uid != os.geteuid():
        return False
    if not directory:
        return stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o444
    if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o555:
        return False
    try:
        fd = os.open(path, _NOFOLLOW_DIR)
    except OSError:
        return False
    try:
        with os.scandir(fd) as listing:
            return next(iter(listing), None) is None
    finally:
        os.close(fd)


def _set_aside(path: Path) -> None:
    """Whatever is at ``path`` out of the way: renamed (a container that has it mounted keeps
    it), then removed as far as we can. Only the renamed entry itself is changed (it lies in
    a directory no container sees); rmtree follows no link in what a container put inside,
    and what root made there may not be ours to delete."""
    import shutil

    if not os.path.lexists(path):
        return
    aside = path.with_name(f".stale-{os.urandom(6).hex()}")
    os.rename(path, aside)
    if stat.S_ISDIR(os.lstat(aside).st_mode):
        os.chmod(aside, 0o700)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def device_name(rel: str) -> str:
    return MASK_DEVICE + hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def devices(masks: Iterable[Mask], src: Sources) -> dict[str, dict[str, str]]:
    """One read-only disk device per mask, from coi's empty file or directory."""
    return {device_name(m.rel): {"type": "disk", "source": str(src.directory if m.is_dir else src.file),
                                 "path": f"{WORKSPACE}/{m.rel}", "readonly": "true"} for m in masks}


def refresh(client: IncusClient, name: str, wanted: Mapping[str, Mapping[str, str]]) -> None:
    """A reused container's masks made what this start wants: stale ones removed, new or
    changed ones added (while it runs, Incus mounts and unmounts them live)."""
    inst = client.instance(name)
    have = {d: s for d, s in (inst.get("devices") or {}).items() if d.startswith(MASK_DEVICE)}
    for device in sorted(set(have) - set(wanted)):
        client.remove_device(name, device)
    changed = {d: dict(s) for d, s in wanted.items() if have.get(d) != s}
    if changed:
        client.update_instance(name, devices=changed)


# ---- what the person is told ----------------------------------------------------------------

def summary(shown: Sequence[str]) -> str | None:
    """The start line naming the masked paths (the first few), or None when there are none."""
    if not shown:
        return None
    listed = ", ".join(shown[:_SHOWN]) + (f" and {len(shown) - _SHOWN} more" if len(shown) > _SHOWN else "")
    return f"Masked {len(shown)} path(s), empty and read-only in the container: {listed}"


def too_many(found: Scan) -> CoiError:
    first = ", ".join(m.shown for m in found.masks[:_SHOWN])
    return CoiError(f"{len(found.masks)} paths of the workspace match [security] masked_paths ({first}, ...); "
                    f"coi masks at most {MAX_MASKS}",
                    "mask their directory at once ('certs/**'), or narrow [security] masked_paths in your own "
                    "config (coi config show lists it)")


def notes(found: Scan) -> Iterable[tuple[str, str]]:
    """(level, line) of what a scan did not mask, and why."""
    if found.unmaskable:
        yield "warn", (f"not masked (a control character or invalid UTF-8 in the name): "
                       f"{', '.join(found.unmaskable[:_SHOWN])}")
    if found.truncated:
        yield "warn", (f"masking looked at the first {MAX_ENTRIES} entries ({MAX_DEPTH} levels) of the workspace; "
                       "files beyond them are not masked")
    if found.in_git:
        yield "detail", f"Not masked (git holds the same content): {', '.join(found.in_git[:_SHOWN])}"
    if found.elsewhere:
        yield "detail", (f"Not masked (links that lead out of the workspace): {', '.join(found.elsewhere[:_SHOWN])}")
    yield "detail", f"Masking: {found.entries} entries looked at in {found.seconds * 1000:.0f} ms"


def git_excludes(patterns: Iterable[str]) -> list[str]:
    """``git add`` pathspecs that leave every masked path out of a branch session's carried
    changes (negations are not followed: what they would unmask stays out)."""
    out: list[str] = []
    for text in patterns:
        if text.startswith("!"):
            continue
        body = text.removesuffix("/")
        glob = body.removeprefix("/") if "/" in body else f"**/{body}"
        out += [f":(exclude,glob){glob}", f":(exclude,glob){glob}/**"]
    return out


def plan(state_dir: Path, workspace: Path, patterns: Iterable[str], workspace_hash: str) -> tuple[Scan, dict[str, Any]]:
    """The scan of ``workspace`` and its devices; too many masks are refused here, before
    anything exists."""
    found = scan(workspace, patterns)
    if len(found.masks) > MAX_MASKS:
        raise too_many(found)
    if not found.masks:
        return found, {}
    return found, devices(found.masks, sources(state_dir, workspace_hash))
