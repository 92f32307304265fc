"""The proxy case's timing script, run inside a bench container (``python3 netprobe.py SPEC``).

SPEC is JSON: ``address`` (the test host), ``tls_name`` (the SNI and Host of the TLS
connections), ``http_name`` (the Host of the plain ones), ``refused_name`` (a name
the allowlist does not list), ``ca`` (the lab CA's PEM file in the container),
``connects`` (connections of each kind counted), ``warmup`` (uncounted ones first),
``downloads`` (downloads of /big of each kind) and ``big_bytes`` (its size).

It times, with ``time.perf_counter``:

- ``tls_setup``: TCP connect to port 443 + the TLS handshake (SNI ``tls_name``,
  the certificate verified against the lab CA);
- ``http_request``: TCP connect to port 80 + ``GET /`` (Host ``http_name``) + the
  whole answer (``hello <name>``, checked);
- ``https_download`` and ``http_download``: connect (+ handshake) + ``GET /big`` +
  every byte of the body (the count checked);

and asks once, over HTTP, with Host ``refused_name``: ``refused_check`` is the
status and the body's first line (200 from the test host without coi's proxy, 403
from the proxy with it). It prints one JSON object; any failure is an exception
(exit code 1). Standard library only, no threads.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time

TIMEOUT = 60.0


def read_response(sock, buf: bytearray) -> tuple[int, bytes, int]:
    """(status, the first bytes of the body, body length) of one HTTP answer with a
    Content-Length; the body is read to its end into ``buf`` (reused, never kept)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed in the headers after {len(head)} bytes")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                   if line.lower().startswith("content-length:")), None)
    if length is None:
        raise ValueError(f"no Content-Length in the answer: {lines[0]}")
    first, got = rest[:200], len(rest)
    view = memoryview(buf)
    while got < length:
        n = sock.recv_into(view, min(len(view), length - got))
        if not n:
            raise ConnectionError(f"connection closed after {got} of {length} body bytes")
        if len(first) < 200:
            first += bytes(view[:min(n, 200 - len(first))])
        got += n
    return status, first, got


def connect(address: str, port: int, ctx: ssl.SSLContext | None, name: str):
    sock = socket.create_connection((address, port), timeout=TIMEOUT)
    if ctx is None:
        return sock
    try:
        return ctx.wrap_socket(sock, server_hostname=name)  # the handshake happens here
    except BaseException:
        sock.close()
        raise


def get(address: str, port: int, ctx: ssl.SSLContext | None, name: str, path: str,
        buf: bytearray) -> tuple[int, bytes, int]:
    with connect(address, port, ctx, name) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        return read_response(sock, buf)


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    address = spec["address"]
    ctx = ssl.create_default_context(cafile=spec["ca"])
    buf = bytearray(1 << 20)
    out: dict[str, object] = {"tls_setup": [], "http_request": [], "https_download": [], "http_download": []}
    for i in range(spec["warmup"] + spec["connects"]):
        t0 = time.perf_counter()
        sock = connect(address, 443, ctx, spec["tls_name"])
        tls = time.perf_counter() - t0
        sock.close()
        t0 = time.perf_counter()
        status, first, _ = get(address, 80, None, spec["http_name"], "/", buf)
        http = time.perf_counter() - t0
        if status != 200 or first != f"hello {spec['http_name']}\n".encode():
            raise RuntimeError(f"GET http://{spec['http_name']}/ answered {status} {first[:100]!r}")
        if i >= spec["warmup"]:
            out["tls_setup"].append(tls)
            out["http_request"].append(http)
    for _ in range(spec["downloads"]):
        for key, port, tls_ctx, name in (("https_download", 443, ctx, spec["tls_name"]),
                                         ("http_download", 80, None, spec["http_name"])):
            t0 = time.perf_counter()
            status, _, size = get(address, port, tls_ctx, name, "/big", buf)
            seconds = time.perf_counter() - t0
            if status != 200 or size != spec["big_bytes"]:
                raise RuntimeError(f"{key}: status {status}, {size} bytes (expected {spec['big_bytes']})")
            out[key].append(seconds)
    status, first, _ = get(address, 80, None, spec["refused_name"], "/", buf)
    out["refused_check"] = [status, first.decode("utf-8", "replace").split("\n", 1)[0]]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
