"""Credentials the egress proxy injects (``[[credentials]]``): the secret read on the host
from its source, and the placeholder the container gets instead.

The secret exists only on the host: in coi's process while it starts the session, and in
the proxy's policy file of the container (mode 0600, in the user's 0700 state directory).
The container sees ``coi-placeholder-<name>``; the proxy replaces it in the named header
of requests to the credential's hosts (and sets the header when a request lacks it).
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from coi.errors import CoiError

if TYPE_CHECKING:
    from coi.config import Credential

COMMAND_TIMEOUT = 30.0  # seconds a credential command (gh auth token) may take


# Where the agent finds the proxy's CA (coi pushes it there), for tools with a bundle of their own.
CA_PATH = "/usr/local/share/ca-certificates/coi-proxy.crt"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CA_ENV = {"NODE_EXTRA_CA_CERTS": CA_PATH, "REQUESTS_CA_BUNDLE": SYSTEM_BUNDLE, "SSL_CERT_FILE": SYSTEM_BUNDLE}


def placeholder(cred: Credential) -> str:
    return f"coi-placeholder-{cred.name}"


def container_variable(cred: Credential) -> str:
    """The variable that holds the placeholder in the container (the source's name by default)."""
    return cred.container_env or cred.env


def container_env(credentials: Iterable[Credential]) -> dict[str, str]:
    """What the agent's environment gets: placeholders, and where the proxy's CA is."""
    creds = list(credentials)
    if not creds:
        return {}
    return {**{container_variable(c): placeholder(c) for c in creds if container_variable(c)}, **CA_ENV}


def secret(cred: Credential, environ: Mapping[str, str] | None = None) -> str:
    """The credential's value, from its source; a clear error when there is none."""
    environ = os.environ if environ is None else environ
    if cred.env:
        value = environ.get(cred.env, "")
        where = f"${cred.env}"
    elif cred.file is not None:
        where = str(cred.file)
        try:
            value = cred.file.read_text()
        except OSError as exc:
            raise CoiError(f"credential {cred.name}: cannot read {where} ({exc.strerror or exc})") from None
    else:
        where = " ".join(cred.command)
        try:
            proc = subprocess.run(list(cred.command), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CoiError(f"credential {cred.name}: '{where}' did not run ({exc})") from None
        if proc.returncode != 0:
            raise CoiError(f"credential {cred.name}: '{where}' exited {proc.returncode}")
        value = proc.stdout
    value = value.strip()
    if not value or "\n" in value or "\r" in value:
        raise CoiError(f"credential {cred.name}: {where} gives {'nothing' if not value else 'more than one line'}",
                       "set the source, or remove the [[credentials]] entry")
    return value


def for_proxy(credentials: Iterable[Credential], environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The proxy's view of each credential: hosts, header, placeholder and the full value."""
    return [{"name": c.name, "hosts": list(c.hosts), "header": c.header, "placeholder": placeholder(c),
             "value": c.value.replace("{secret}", secret(c, environ))} for c in credentials]
