"""Incus: the only package of coi that talks to the daemon.

Owns: the REST API over the daemon's unix socket (``client``, ``files``, on the small
HTTP/1.1 client of ``wire``), the mapping of every daemon failure to a typed
``coi.errors`` exception, and the ``IncusClient`` protocol that services are typed
with (the real client and the tests' ``FakeIncus`` both satisfy it).

Must not: decide anything about sessions, images or the network (it does what it is
asked, one request at a time), print, or import any other coi package than
``coi.errors`` and ``coi.wait``.
"""

from typing import Any

from coi.incus.client import ExecResult, Incus
from coi.incus.failures import EXEC_NOT_STARTED, GROUP_HINT, SETUP_HINT
from coi.incus.wire import DEFAULT_SOCKET, socket_path

__all__ = ["DEFAULT_SOCKET", "EXEC_NOT_STARTED", "GROUP_HINT", "SETUP_HINT", "ExecResult", "Incus", "IncusClient",
           "socket_path"]


def __getattr__(name: str) -> Any:
    """``IncusClient`` is for type hints and tests: loaded only when asked for."""
    if name == "IncusClient":
        from coi.incus.protocol import IncusClient

        return IncusClient
    raise AttributeError(f"module 'coi.incus' has no attribute {name!r}")
