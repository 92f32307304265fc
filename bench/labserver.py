"""The proxy case's test host, run by bench/lab.py inside its network namespace:

    python3 labserver.py ADDRESS CERTS_DIR ANSWERS_JSON

On ADDRESS: HTTP on port 80 and HTTPS on port 443 for every name with a
certificate in CERTS_DIR (``NAME.pem`` and ``NAME.key``, signed by the lab's CA;
the certificate is chosen by SNI), and DNS on UDP port 53, answering A queries
from ANSWERS_JSON (``{"name": ["address", ...]}``, read on every query; NXDOMAIN
for any other name). Every GET answers ``hello <Host>``; ``/big`` answers
BIG_BYTES of zeros (with Content-Length) for throughput. Standard library only;
runs until it is killed.
"""

from __future__ import annotations

import http.server
import json
import socket
import socketserver
import ssl
import struct
import sys
import threading
from pathlib import Path

BIG_BYTES = 200 * 1024 * 1024
CHUNK = memoryview(bytes(1 << 20))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_BYTES))
            self.end_headers()
            left = BIG_BYTES
            while left:
                part = CHUNK[:min(left, len(CHUNK))]
                self.wfile.write(part)
                left -= len(part)
            return
        body = ("hello " + (self.headers.get("Host") or "").split(":")[0] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def tls_handler(context: ssl.SSLContext) -> type[Handler]:
    class TlsHandler(Handler):
        """The handshake in the connection's own thread (never in the accept loop, which a
        client that connects and sends nothing would otherwise hold up)."""

        def setup(self) -> None:
            self.request.settimeout(60)
            self.request = context.wrap_socket(self.request, server_side=True)
            super().setup()

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self.request.close()
    return TlsHandler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def server_bind(self) -> None:
        """HTTPServer's, without its reverse lookup of the address (``socket.getfqdn``: seconds
        of DNS timeouts in a namespace without a resolver)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        pass  # a client that went away mid-handshake (the bench's port probe) is no error here


def contexts(certs: Path) -> ssl.SSLContext:
    """The default context, with an SNI callback that picks the name's certificate."""
    by_name = {}
    for pem in sorted(certs.glob("*.pem")):
        if pem.name != "ca.pem":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pem, certs / f"{pem.stem}.key")
            by_name[pem.stem] = ctx
    if not by_name:
        raise SystemExit(f"no certificates in {certs}")
    default = next(iter(by_name.values()))

    def pick(sslobj, name, _ctx):
        if name in by_name:
            sslobj.context = by_name[name]
    default.sni_callback = pick
    return default


def dns(address: str, answers: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    while True:
        data, peer = sock.recvfrom(512)
        try:
            qid, _flags, _qd = struct.unpack("!HHH", data[:6])
            pos, labels = 12, []
            while data[pos]:
                labels.append(data[pos + 1:pos + 1 + data[pos]].decode())
                pos += 1 + data[pos]
            question = data[12:pos + 5]
            try:
                table = json.loads(answers.read_text())
            except (OSError, ValueError):
                table = {}
            ips = table.get(".".join(labels).lower()) or []
            ips = [ips] if isinstance(ips, str) else ips
        except (IndexError, struct.error, UnicodeDecodeError):
            continue
        head = struct.pack("!HHHHHH", qid, 0x8180 if ips else 0x8183, 1, len(ips), 0, 0)
        body = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 1, 4) + socket.inet_aton(ip) for ip in ips)
        sock.sendto(head + question + body, peer)


def main(argv: list[str]) -> int:
    address, certs, answers = argv[0], Path(argv[1]), Path(argv[2])
    plain = Server((address, 80), Handler)
    tls = Server((address, 443), tls_handler(contexts(certs)))
    threading.Thread(target=dns, args=(address, answers), daemon=True).start()
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    tls.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
