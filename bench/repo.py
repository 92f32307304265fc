"""The branch case's workspace: a git repository with many files and a long history,
generated here (deterministically, in one ``git fast-import``) so every run copies the same.

    /opt/coi/bin/python bench/repo.py PATH [--files N] [--mb M]

By default the history holds about 1 GiB of incompressible object data over a few
hundred commits, and HEAD's tree 100,000 small files in a few hundred directories; the
working tree is checked out and clean. Blob contents come from SHAKE-256 of their path
and version, so the same parameters always give the same commits (and the same HEAD).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

FILES = 100_000  # files in HEAD's tree
HISTORY_MIB = 1024  # object data over the whole history (MiB)
COMMITS = 300
FILES_PER_DIR = 250  # 100,000 files: 400 directories, in 20 groups
DIRS_PER_GROUP = 20
SMALL_MIN, SMALL_SPREAD = 512, 3072  # a small file: 512 B to 3.5 KiB, about 2 KiB on average
ASSETS = 8  # larger files, each commit replaces one; the last commit removes them all
MARKER = "coi-bench-repo.json"  # in .git: outside the working tree, so status stays clean
GENERATOR = 1  # bump when the shape changes: a cached repository of another version is made again
SEED = b"coi-bench-branch-repo"
EPOCH = 1_700_000_000  # the first commit's time; one hour between commits
IDENT = "coi bench <bench@coi.invalid>"

Log = Callable[[str], None]


class RepoError(RuntimeError):
    """Generating the repository failed; the message has git's own words."""


@dataclass
class RepoInfo:
    """What the generated repository is, and what making it cost."""

    path: str
    files: int
    history_mib: int
    commits: int
    head: str
    generate_seconds: float  # fast-import and checkout, when it was made
    import_seconds: float
    checkout_seconds: float
    blob_bytes: int  # object data written as blobs (all versions)
    cached: bool = False  # reused in this run rather than made
    count_objects: dict[str, str] = field(default_factory=dict)  # git count-objects -vH
    pack_bytes: int = 0  # size-pack of git count-objects -v, in bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _blob(path: str, version: int, size: int) -> bytes:
    """Incompressible, deterministic content of one version of one file."""
    return hashlib.shake_256(SEED + b"\0" + path.encode() + b"\0" + str(version).encode()).digest(size)


def _small_size(index: int, version: int) -> int:
    digest = hashlib.blake2b(f"{index}:{version}".encode(), digest_size=4).digest()
    return SMALL_MIN + int.from_bytes(digest, "big") % SMALL_SPREAD


def _small_path(index: int) -> str:
    d, f = divmod(index, FILES_PER_DIR)
    return f"lib{d // DIRS_PER_GROUP:02d}/mod{d % DIRS_PER_GROUP:02d}/file{f:03d}.bin"


def _write_history(out: BinaryIO, *, files: int, history_mib: int, commits: int, log: Log) -> int:
    """The fast-import stream: commit k adds the next slice of small files, rewrites a
    few earlier ones (all in one directory, so few trees change) and replaces one asset
    sized to bring the total to ``history_mib``. Returns the blob bytes written."""
    budget = history_mib << 20
    average = SMALL_MIN + SMALL_SPREAD // 2
    mods_per_commit = max(1, files // 1000)
    written = 0
    added = 0
    versions: dict[int, int] = {}
    started = time.perf_counter()

    def file(path: str, data: bytes) -> None:
        nonlocal written
        out.write(b"M 100644 inline %s\ndata %d\n" % (path.encode(), len(data)))
        out.write(data)
        out.write(b"\n")
        written += len(data)

    for k in range(commits):
        last = k == commits - 1
        message = f"commit {k + 1} of {commits}\n".encode()
        out.write(b"commit refs/heads/main\n")
        for role in (b"author", b"committer"):
            out.write(b"%s %s %d +0000\n" % (role, IDENT.encode(), EPOCH + 3600 * k))
        out.write(b"data %d\n%s" % (len(message), message))
        before = added
        target = files if last else files * (k + 1) // commits
        while added < target:
            versions[added] = 0
            file(_small_path(added), _blob(_small_path(added), 0, _small_size(added, 0)))
            added += 1
        if before > mods_per_commit and not last:
            # a run of files of earlier commits, from the start of one directory
            start = int.from_bytes(hashlib.blake2b(b"%d" % k, digest_size=4).digest(), "big") % before
            start -= start % FILES_PER_DIR
            for index in range(start, min(start + mods_per_commit, before)):
                versions[index] += 1
                file(_small_path(index), _blob(_small_path(index), versions[index],
                                               _small_size(index, versions[index])))
        if last:
            out.write(b"D assets\n")
        else:
            # what the small files still to come will take, and the rest for this asset
            rest = (files - added) * average + (commits - 1 - k) * mods_per_commit * average
            size = (budget - written - rest) // (commits - 1 - k)
            if size > 0:
                path = f"assets/blob{k % ASSETS}.bin"
                file(path, _blob(path, k, size))
        out.write(b"\n")
        if (k + 1) % max(1, commits // 10) == 0 or last:
            log(f"  repository: {k + 1}/{commits} commits, {added:,} files, {written / (1 << 20):,.0f} MiB "
                f"({time.perf_counter() - started:.1f} s)")
    out.write(b"done\n")
    return written


def _env() -> dict[str, str]:
    """Neither the person's nor the system's git config: the same repository everywhere."""
    return {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _git(path: Path, args: list[str], *, text: bool = False) -> subprocess.CompletedProcess:
    """git in the generated repository; a failure is a RepoError with git's message."""
    proc = subprocess.run(["git", "-C", str(path), *args], env=_env(), capture_output=True, text=text)
    if proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise RepoError(f"git {' '.join(args)} exited {proc.returncode}: {err.strip()[-500:]}")
    return proc


def count_objects(path: Path) -> tuple[dict[str, str], int]:
    """``git count-objects -vH`` as a dict, and the pack's size in bytes (from ``-v``)."""
    def parse(text: str) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    human = parse(_git(path, ["count-objects", "-vH"], text=True).stdout)
    exact = parse(_git(path, ["count-objects", "-v"], text=True).stdout)
    return human, int(exact.get("size-pack", "0")) * 1024


def _cached(path: Path, wanted: dict[str, int]) -> RepoInfo | None:
    try:
        data = json.loads((path / ".git" / MARKER).read_text())
        if {k: data.get(k) for k in wanted} != wanted:
            return None
        head = _git(path, ["rev-parse", "--verify", "-q", "HEAD^{commit}"], text=True).stdout.strip()
        if head != data["head"]:
            return None
        info = RepoInfo(**{k: v for k, v in data.items() if k != "generator"})
    except (OSError, ValueError, KeyError, TypeError, RepoError):
        return None
    info.cached = True
    return info


def ensure(path: Path, *, files: int = FILES, history_mib: int = HISTORY_MIB, commits: int = COMMITS,
           log: Log | None = None) -> RepoInfo:
    """The repository at ``path``: reused when a marker says it was made with these
    parameters (and HEAD is still the commit it made), otherwise made again from nothing."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    commits = max(2, min(commits, files))
    wanted = {"generator": GENERATOR, "files": files, "history_mib": history_mib, "commits": commits}
    found = _cached(path, wanted)
    if found is not None:
        log(f"  repository: reusing {path} ({files:,} files, {history_mib} MiB of history)")
        return found
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    log(f"  repository: generating {files:,} files, {history_mib} MiB of history, {commits} commits in {path}")
    t0 = time.perf_counter()
    _git(path, ["init", "-q", "--initial-branch=main"])
    # Level 0: the data is incompressible anyway, and zlib would spend most of the time on it.
    # Depth 0: no delta attempts against the previous blob (random data has none).
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: fast-import can never block on it
        proc = subprocess.Popen(["git", "-C", str(path), "-c", "core.compression=0", "-c", "pack.compression=0",
                                 "fast-import", "--quiet", "--depth=0", "--done"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=err, env=_env())
        assert proc.stdin is not None
        written = 0
        try:
            written = _write_history(proc.stdin, files=files, history_mib=history_mib, commits=commits, log=log)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # fast-import stopped: its exit code and message say why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.wait() != 0:
            err.seek(0)
            raise RepoError(f"git fast-import exited {proc.returncode}: "
                            f"{err.read().decode(errors='replace').strip()[-500:]}")
    t1 = time.perf_counter()
    log(f"  repository: history written ({t1 - t0:.1f} s); checking out HEAD")
    _git(path, ["-c", "checkout.workers=0", "read-tree", "-u", "--reset", "HEAD"])
    t2 = time.perf_counter()
    if _git(path, ["status", "--porcelain", "--untracked-files=all"], text=True).stdout.strip():
        raise RepoError(f"the generated repository {path} is not clean after the checkout")
    human, pack = count_objects(path)
    head = _git(path, ["rev-parse", "HEAD"], text=True).stdout.strip()
    info = RepoInfo(path=str(path), files=files, history_mib=history_mib, commits=commits, head=head,
                    generate_seconds=round(t2 - t0, 3), import_seconds=round(t1 - t0, 3),
                    checkout_seconds=round(t2 - t1, 3), blob_bytes=written, count_objects=human, pack_bytes=pack)
    (path / ".git" / MARKER).write_text(json.dumps({"generator": GENERATOR, **info.to_json()}, indent=2) + "\n")
    log(f"  repository: ready in {t2 - t0:.1f} s (import {t1 - t0:.1f} s, checkout {t2 - t1:.1f} s); "
        f"pack {human.get('size-pack', '?')}, {human.get('in-pack', '?')} objects, HEAD {head[:12]}")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/repo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="where (made again unless its marker matches)")
    p.add_argument("--files", type=int, default=FILES, help=f"files in HEAD (default {FILES:,})")
    p.add_argument("--mb", type=int, default=HISTORY_MIB, help=f"MiB of history (default {HISTORY_MIB})")
    p.add_argument("--commits", type=int, default=COMMITS, help=f"commits (default {COMMITS})")
    args = p.parse_args(argv)
    info = ensure(args.path.resolve(), files=args.files, history_mib=args.mb, commits=args.commits)
    print(json.dumps(info.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
