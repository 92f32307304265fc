"""The files API of an instance: read, write and delete files and trees. Mixed into
``Incus``, whose ``call`` and ``raw`` it uses."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping
from urllib.parse import quote

from coi.errors import ConflictError, TooLargeError
from coi.incus.failures import _raise_for
from coi.incus.wire import _MAX_ERROR_BODY, _MAX_LISTING, BodyLimit


class Files:
    """``Incus``'s file methods (``self`` is the client)."""

    def _files_path(self, name: str) -> str:
        return f"/1.0/instances/{quote(name, safe='')}/files"

    def push_file(self, name: str, path: str, content: bytes, *, uid: int = 0, gid: int = 0,
                  mode: int = 0o644) -> None:
        self.call("POST", self._files_path(name), f"write {path} in container {name}",
                  params={"path": path}, body=content,
                  headers={"X-Incus-type": "file", "X-Incus-uid": str(uid), "X-Incus-gid": str(gid),
                           "X-Incus-mode": f"{mode:04o}", "X-Incus-write": "overwrite",
                           "Content-Type": "application/octet-stream"})

    def make_dir(self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        try:
            self.call("POST", self._files_path(name), f"create {path} in container {name}",
                      params={"path": path}, body=b"",
                      headers={"X-Incus-type": "directory", "X-Incus-uid": str(uid),
                               "X-Incus-gid": str(gid), "X-Incus-mode": f"{mode:04o}"})
        except ConflictError:
            pass  # already there

    def pull_file(self, name: str, path: str, *, max_bytes: int | None = None) -> tuple[bytes, dict[str, Any]]:
        """Content and ``{"type", "mode", "uid", "gid"}`` of one file.

        For a directory the content is empty and ``entries`` lists its names.
        With ``max_bytes``, content larger than that is refused (TooLargeError)
        without being read; a directory listing is then bounded too (64 MiB).
        """
        what = f"read {path} in container {name}"
        try:
            resp = self.raw("GET", self._files_path(name), params={"path": path},
                            limit=None if max_bytes is None else _files_limit(max_bytes))
        except TooLargeError as exc:
            raise TooLargeError(f"{what}: {exc.message}") from None
        if resp.status >= 400:
            _raise_for(resp.status, resp.json(), what)
        h = {k.lower(): v for k, v in resp.headers.items()}
        info: dict[str, Any] = {
            "type": h.get("x-incus-type", "file"),
            "mode": int(h.get("x-incus-mode", "0644"), 8),
            "uid": int(h.get("x-incus-uid", "0")),
            "gid": int(h.get("x-incus-gid", "0")),
        }
        if info["type"] == "directory":
            info["entries"] = sorted(resp.json().get("metadata") or [])
            return b"", info
        return resp.body, info

    def push_tree(self, name: str, local: Path, remote: str, *, uid: int | None = None,
                  gid: int | None = None) -> None:
        """Copy a host file or directory tree into the instance, keeping modes.

        Owner: ``uid``/``gid`` when given, else root.
        """
        for src, dst in _walk_local(local, PurePosixPath(remote)):
            if src.is_symlink():
                continue  # never copy what a link points at, which may be outside the tree
            st = src.lstat()
            mode = stat.S_IMODE(st.st_mode)
            owner = {"uid": uid or 0, "gid": gid or 0}
            if src.is_dir():
                self.make_dir(name, str(dst), mode=mode, **owner)
            elif src.is_file():
                self.push_file(name, str(dst), src.read_bytes(), mode=mode, **owner)

    def pull_tree(self, name: str, remote: str, local: Path) -> None:
        """Copy a file or directory tree out of the instance, keeping modes."""
        content, info = self.pull_file(name, remote)
        if info["type"] == "directory":
            local.mkdir(parents=True, exist_ok=True)
            for entry in info["entries"]:
                self.pull_tree(name, str(PurePosixPath(remote) / entry), local / entry)
            os.chmod(local, info["mode"])
        elif info["type"] == "file":
            local.write_bytes(content)
            os.chmod(local, info["mode"])
        # symlinks and special files are skipped on purpose: nothing from the
        # container may point a host path somewhere else.

    def delete_file(self, name: str, path: str) -> None:
        self.call("DELETE", self._files_path(name), f"delete {path} in container {name}",
                  params={"path": path})



def _files_limit(max_bytes: int) -> BodyLimit:
    """Body bounds of one files-API read: ``max_bytes`` for content, fixed ones otherwise."""
    def limit(status: int, headers: Mapping[str, str]) -> int:
        if status >= 300:
            return _MAX_ERROR_BODY
        kind = next((v for k, v in headers.items() if k.lower() == "x-incus-type"), "file")
        return _MAX_LISTING if kind == "directory" else max_bytes
    return limit


def _walk_local(local: Path, remote: PurePosixPath) -> Iterator[tuple[Path, PurePosixPath]]:
    """Pairs (host path, container path), parents before children."""
    yield local, remote
    if local.is_dir() and not local.is_symlink():
        for child in sorted(local.iterdir()):
            yield from _walk_local(child, remote / child.name)
