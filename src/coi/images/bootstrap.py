"""Local base images: a Debian root filesystem built with mmdebstrap from the
host's own Debian mirror and imported into Incus, for hosts where no remote
image server answers.

The image is cached under an alias and reused while its build inputs (suite,
package list, customisation script, coi's bootstrap version) are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shlex
import subprocess
import tarfile
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from coi.errors import CoiError, NotFoundError
from coi.images.log import Log

if TYPE_CHECKING:
    from coi.incus import IncusClient

SUITES = ("bookworm", "trixie")
PACKAGES = ("systemd-sysv", "systemd-resolved", "dbus", "udev", "iproute2", "sudo", "ca-certificates",
            "libnss-resolve")
BOOTSTRAP_VERSION = "1"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def alias_for(suite: str) -> str:
    """The local alias the bootstrap base of ``suite`` is cached under."""
    return f"coi-base-debian-{suite}"


def parse_base(base: str) -> str:
    """The Debian suite of a ``bootstrap:debian/<suite>`` reference."""
    prefix = "bootstrap:debian/"
    suite = base[len(prefix):] if base.startswith(prefix) else ""
    if suite not in SUITES:
        raise CoiError(f"unknown bootstrap base {base!r}",
                       "use one of " + ", ".join(f"bootstrap:debian/{s}" for s in SUITES))
    return suite


def _customize_script() -> Path:
    return Path(str(resources.files("coi") / "data" / "bootstrap-customize.sh"))


def inputs_hash(suite: str, mirror: str) -> str:
    """What the image depends on; a change means a rebuild."""
    h = hashlib.sha256()
    for part in (BOOTSTRAP_VERSION, suite, mirror, " ".join(PACKAGES), _customize_script().read_text()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def host_debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host itself uses (deb822 or one-line sources)."""
    candidates = sorted(sources_dir.glob("sources.list.d/*.sources")) + [sources_dir / "sources.list"]
    for path in candidates:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _metadata_tar(suite: str, properties: dict[str, str]) -> bytes:
    """The image's metadata (``metadata.yaml`` and the hostname templates) as a tar archive."""
    arch = platform.machine()
    props = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in properties.items())  # JSON strings are YAML
    files = {
        "metadata.yaml": (
            f"architecture: {arch}\ncreation_date: {int(time.time())}\nproperties:\n{props}"
            "templates:\n"
            "  /etc/hostname:\n    when: [create, copy]\n    template: hostname.tpl\n"
            "  /etc/hosts:\n    when: [create, copy]\n    template: hosts.tpl\n"
        ),
        "templates/hostname.tpl": "{{ instance.name }}\n",
        "templates/hosts.tpl": "127.0.0.1 localhost\n127.0.1.1 {{ instance.name }}\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ensure_base(client: IncusClient, suite: str, *, log: Log,
                force: bool = False, workdir: Path | None = None) -> str:
    """Alias of the bootstrap base for ``suite``, building and importing it if needed."""
    alias = alias_for(suite)
    mirror = host_debian_mirror()
    digest = inputs_hash(suite, mirror)
    if not force:
        try:
            image = client.image_by_alias(alias)
            if (image.get("properties") or {}).get("coi.inputs") == digest:
                return alias
            log(f"Base image {alias} is out of date; rebuilding")
        except NotFoundError:
            pass
    log(f"Building base image {alias} with mmdebstrap from {mirror} (done once, then cached)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="coi-bootstrap-", dir=workdir) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        argv = [
            "mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
            "--architectures=" + _ARCH.get(platform.machine(), platform.machine()),
            "--customize-hook=sh " + shlex.quote(str(_customize_script())) + ' "$1"',
            suite, str(rootfs), mirror,
        ]
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise CoiError(f"building the {suite} root filesystem failed:\n{tail}",
                           "check that the Debian mirror answers and mmdebstrap is installed (sudo coi setup)")
        properties = {"os": "debian", "release": suite, "description": f"Debian {suite} (coi bootstrap)",
                      "coi.inputs": digest, "coi.kind": "base"}
        meta = Path(tmp) / "metadata.tar"
        meta.write_bytes(_metadata_tar(suite, properties))
        log(f"Importing base image {alias} into Incus")
        fingerprint = client.import_split_image(meta, rootfs, properties=properties)
    old = None
    try:
        old = client.image_alias(alias)["target"]
    except NotFoundError:
        pass
    client.point_alias(alias, fingerprint)
    if old and old != fingerprint:
        client.delete_image(old)
    log(f"Base image {alias} ready in {time.monotonic() - started:.0f}s")
    return alias

