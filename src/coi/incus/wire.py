"""HTTP/1.1 on the daemon's unix socket: the socket's path, the connection and its replies.
Just what the Incus API needs, no third-party code."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

DEFAULT_SOCKET = "/var/lib/incus/unix.socket"


def socket_path(env: Mapping[str, str] | None = None) -> str:
    """The daemon socket: ``INCUS_SOCKET``, else ``$INCUS_DIR/unix.socket``."""
    env = os.environ if env is None else env
    if env.get("INCUS_SOCKET"):
        return env["INCUS_SOCKET"]
    if env.get("INCUS_DIR"):
        return os.path.join(env["INCUS_DIR"], "unix.socket")
    return DEFAULT_SOCKET


class _BadReply(Exception):
    """The daemon's answer is not the HTTP/1.1 it should be."""


class _BodyTooLarge(Exception):
    """A reply body is over the caller's limit; the rest of it was not read."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


_MAX_LINE = 65536


# The most body bytes to accept for a reply, given its status and headers (None: any).
BodyLimit = Callable[[int, Mapping[str, str]], "int | None"]


# Bounds of the files API when a caller limits file content (pull_file's max_bytes):
# a directory listing (~250,000 long names) and an error reply have their own.
_MAX_LISTING = 64 << 20


_MAX_ERROR_BODY = 1 << 20


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    will_close: bool = False

    def json(self) -> dict[str, Any]:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            return {}


class _UnixConnection:
    """HTTP/1.1 on the daemon's unix socket: just what the Incus API needs (keep-alive,
    Content-Length and chunked bodies, streamed uploads). ``http.client`` would
    do, but it imports the ``email`` package and ``ssl``: 20 ms on every command."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self._path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._in: Any = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock, self._in = sock, sock.makefile("rb")

    def close(self) -> None:
        for part in (self._in, self.sock):
            if part is not None:
                part.close()
        self.sock = self._in = None

    def exchange(self, method: str, url: str, body: bytes | Iterable[bytes] | None,
                 headers: Mapping[str, str], limit: BodyLimit | None = None) -> _Response:
        """Send one request and read its reply; a body over ``limit`` raises _BodyTooLarge
        with the rest of it unread (the caller must close the connection)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        head = {"Host": "incus", "Accept-Encoding": "identity", **headers}
        if isinstance(body, (bytes, bytearray)):
            head["Content-Length"] = str(len(body))
        elif body is None and method in ("POST", "PUT", "PATCH"):
            head["Content-Length"] = "0"
        lines = [f"{method} {url} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if isinstance(body, (bytes, bytearray)):
            self.sock.sendall(body)
        elif body is not None:  # streamed; the caller sent Content-Length
            for chunk in body:
                self.sock.sendall(chunk)
        return self._read_response(method, limit)

    def _line(self) -> bytes:
        line = self._in.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _BadReply("header line too long")
        return line

    def _read_response(self, method: str, limit: BodyLimit | None = None) -> _Response:
        status_line = self._line()
        if not status_line:
            raise ConnectionResetError("the daemon closed the connection")
        version, _, rest = status_line.decode("latin-1").partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise _BadReply(f"bad status line {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while (line := self._line()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip()] = value.strip()
        h = {k.lower(): v.lower() for k, v in headers.items()}
        status = int(code)
        will_close = h.get("connection") == "close" or version == "HTTP/1.0"
        most = limit(status, headers) if limit else None
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif h.get("transfer-encoding") == "chunked":
            body = self._read_chunked(most)
        elif "content-length" in h:
            size = int(h["content-length"])
            if most is not None and size > most:
                raise _BodyTooLarge(most)  # refused before a byte of it is read
            body = self._read_exactly(size)
        else:  # delimited by the end of the connection
            body, will_close = self._in.read(-1 if most is None else most + 1), True
            if most is not None and len(body) > most:
                raise _BodyTooLarge(most)
        return _Response(status, headers, body, will_close)

    def _read_exactly(self, size: int) -> bytes:
        if size < 0:
            raise _BadReply(f"negative body size {size}")
        data = self._in.read(size)
        if len(data) != size:
            raise _BadReply(f"body ended after {len(data)} of {size} bytes")
        return data

    def _read_chunked(self, most: int | None = None) -> bytes:
        """A chunked body; past ``most`` bytes in all, _BodyTooLarge before the next chunk is read."""
        parts = []
        total = 0
        while True:
            size = int(self._line().split(b";", 1)[0].strip() or b"x", 16)
            total += size
            if most is not None and total > most:
                raise _BodyTooLarge(most)
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self._read_exactly(size))
            self._line()
