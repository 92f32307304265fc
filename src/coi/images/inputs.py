"""What the coi image is made from: its build script, agent tools, code uid, base and
the host's CA certificates, hashed so that a change means a rebuild."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from coi.errors import UsageError
from coi.images import bootstrap
from coi.images.refs import DEFAULT_BASE
from coi.tools import TOOLS as AGENT_TOOLS

IMAGE_FORMAT = "2"  # bump when the way the coi image is built changes outside the script
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")

# The agent tools the coi image can carry, in the image's order (COI_TOOLS, coi.tools,
# the inputs hash): tool -> (registry, package), from coi.tools, the one list of them.
IMAGE_ORDER = ("claude", "codex", "gemini", "opencode", "aider")
TOOL_PACKAGES: dict[str, tuple[str, str]] = {name: AGENT_TOOLS[name].package for name in IMAGE_ORDER}


def coi_script() -> Path:
    """The coi image's build script (package data of ``coi``: ``coi/data/coi-image.sh``)."""
    return Path(str(resources.files("coi") / "data" / "coi-image.sh"))


def sha(parts: Iterable[bytes]) -> str:
    """A short digest of ``parts`` that tells ``[b"ab"]`` from ``[b"a", b"b"]``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def host_ca_files(directory: Path = HOST_CA_DIR) -> list[Path]:
    """The host's extra CA certificates (``update-ca-certificates`` input)."""
    try:
        return sorted(p for p in directory.rglob("*.crt") if p.is_file())
    except OSError:
        return []


def coi_inputs_hash(*, tools: Iterable[str], config: Any, base: str | None = None,
                    script: bytes | None = None, ca_files: Iterable[Path] | None = None) -> str:
    """What the coi image is made from; a different value means a rebuild.

    The script, tools, code uid, base (for a bootstrap base also its own
    inputs) and the host CA certificates copied into the image.
    """
    base_ref = (base if base is not None else config.build.base) or DEFAULT_BASE
    parts = [IMAGE_FORMAT.encode(), script if script is not None else coi_script().read_bytes(),
             " ".join(normalise_tools(tools)).encode(), str(config.incus.code_uid).encode(),
             base_ref.encode()]
    if base_ref.startswith("bootstrap:"):
        suite = bootstrap.parse_base(base_ref)
        parts.append(bootstrap.inputs_hash(suite, bootstrap.host_debian_mirror()).encode())
    for path in (host_ca_files() if ca_files is None else ca_files):
        parts.append(path.name.encode() + b"\0" + path.read_bytes())
    return sha(parts)


def normalise_tools(tools: Iterable[str]) -> list[str]:
    """Agent tools in a stable order, without duplicates (``all``: every one); unknown names are refused."""
    wanted = [t.strip() for t in tools if t.strip()]
    if "all" in wanted:  # coi build --tools all
        wanted = [t for t in wanted if t != "all"] + list(TOOL_PACKAGES)
    unknown = [t for t in wanted if t not in TOOL_PACKAGES]
    if unknown:
        raise UsageError(f"unknown agent tool {unknown[0]!r}",
                         "choose from " + ", ".join(TOOL_PACKAGES))
    if not wanted:
        raise UsageError("no agent tool given", "choose from " + ", ".join(TOOL_PACKAGES))
    return sorted(set(wanted), key=list(TOOL_PACKAGES).index)
