"""Images: building the coi image and custom images, and managing local images.

A build launches a throw-away builder container from a base image, runs named
steps in it (their output streamed to ``log`` and saved to
``<sessions_dir>/logs/build-<alias>.log``), stops it, publishes it under the
alias and deletes the builder. When a step fails, or the user presses Ctrl+C,
the builder and any image published on the way are removed, and an existing
image is only replaced once its successor has been published.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import re
import shlex
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from coi import __version__, bootstrap, naming
from coi.errors import CoiError, ConflictError, NotFoundError, OperationFailedError, UsageError
from coi.sessions import CONTAINER_CONFIG  # what every container from a coi image gets
from coi.wait import wait_for

Log = Callable[[str], None]


PROFILES = ["coi"]
COI_ALIAS = "coi"
DEFAULT_BASE = "bootstrap:debian/trixie"  # Debian 13, today's stable; bookworm stays selectable
REMOTE_SERVER = "https://images.linuxcontainers.org"
IMAGE_FORMAT = "2"  # bump when the way the coi image is built changes outside the script

# Agent tools the coi image can carry: tool -> (registry, package).
TOOL_PACKAGES: dict[str, tuple[str, str]] = {
    "claude": ("npm", "@anthropic-ai/claude-code"),
    "codex": ("npm", "@openai/codex"),
    "gemini": ("npm", "@google/gemini-cli"),
    "opencode": ("npm", "opencode-ai"),
    "aider": ("pypi", "aider-chat"),
}

# The steps of coi-image.sh, in order: (argument, what the user sees).
COI_STEPS: tuple[tuple[str, str], ...] = (
    ("packages", "Install base packages (git, curl, build tools, python3, tmux, ...)"),
    ("nodejs", "Install Node.js (22 or newer) and npm"),
    ("tmux", "Configure tmux for the agents"),
    ("gh", "Install the GitHub CLI"),
    ("docker", "Install Docker"),
    ("user", "Create user code"),
    ("power", "Install poweroff/shutdown/reboot for code"),
    ("tools", "Install agent tools"),
    ("verify", "Check that every tool runs"),
    ("cleanup", "Clean caches"),
)

DNS_PROBE = "deb.debian.org"  # a name every builder must resolve (its package mirror)
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
_ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_SCRIPT_PATH = "/root/coi-build-script"
_COI_SCRIPT_PATH = "/root/coi-image.sh"
_NETWORK_TIMEOUT = 90.0
_DNS_TIMEOUT = 20.0
_STOP_TIMEOUT = 60
# Resets what must differ per container; run as the last step of every build.
_FINALIZE = (
    "rm -f /root/coi-build-script /root/coi-image.sh; "
    "if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi; "
    "rm -f /var/lib/dbus/machine-id; "
    "if command -v apt-get >/dev/null; then apt-get clean; fi; sync"
)


class BuildError(CoiError):
    """A build step failed; the message names the step and the log file."""


_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl+C while the daemon creates a container or an image, so that
    what must be cleaned up afterwards is known; it takes effect right after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --- bases -------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """Where a builder comes from: a local alias, or a remote image with a fallback."""

    ref: str  # as the user gave it
    alias: str | None = None  # a local image alias
    remote: str | None = None  # alias on the remote image server
    fallback: str | None = None  # bootstrap reference used when the remote does not answer

    def source(self) -> dict[str, Any]:
        if self.remote is None:
            return {"type": "image", "alias": self.alias}
        return {"type": "image", "mode": "pull", "server": REMOTE_SERVER,
                "protocol": "simplestreams", "alias": self.remote}


def parse_base(ref: str | None, *, default: str = DEFAULT_BASE) -> Base:
    """What a ``--base`` / ``[build] base`` value names (pure: nothing is looked up).

    ``images:<alias>`` is a remote image (falling back to a bootstrap base),
    ``bootstrap:debian/<suite>`` a locally built Debian, anything else a local alias.
    """
    ref = (ref or "").strip() or default
    if ref.startswith("bootstrap:"):
        bootstrap.parse_base(ref)  # refuses unknown suites
        return Base(ref)
    if ref.startswith("images:"):
        remote = ref[len("images:"):].strip("/")
        if not remote:
            raise CoiError(f"image reference {ref!r} names no image", "for example: images:debian/12")
        return Base(ref, remote=remote, fallback=_fallback_for(remote))
    if not _ALIAS_RE.fullmatch(ref):
        raise CoiError(f"{ref!r} is not an image alias",
                       "use a local alias, images:<distro>/<release> or bootstrap:debian/<suite>")
    return Base(ref, alias=ref)


def _fallback_for(remote: str) -> str:
    """The bootstrap base closest to a remote alias (Debian 12 -> bookworm, else the default, trixie)."""
    parts = remote.lower().split("/")
    if parts[0] == "debian" and len(parts) > 1 and parts[1] in ("12", "bookworm"):
        return "bootstrap:debian/bookworm"
    return DEFAULT_BASE


def _local_base(client: Any, base: Base, log: Log) -> Base:
    """A base that is a local alias: bootstrap bases are built (once) here."""
    if base.ref.startswith("bootstrap:"):
        alias = bootstrap.ensure_base(client, bootstrap.parse_base(base.ref), log=log)
        return Base(base.ref, alias=alias)
    if base.alias and not client.image_exists(base.alias):
        hint = ("build it first with 'coi build'" if base.alias == COI_ALIAS
                else "see 'coi image list --all' for the local images")
        raise NotFoundError(f"base image {base.alias!r} does not exist", hint)
    return base


# --- hashes ------------------------------------------------------------------


def coi_script() -> Path:
    return Path(str(resources.files("coi") / "data" / "coi-image.sh"))


def _sha(parts: Iterable[bytes]) -> str:
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
    return _sha(parts)


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


# --- network inside the builder ---------------------------------------------


def resolv_is_stub_only(text: str) -> bool:
    """True when resolv.conf sends every query to a loopback stub (or names no server)."""
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                servers.append(ipaddress.ip_address(words[1].split("%")[0]))
            except ValueError:
                continue
    return all(s.is_loopback for s in servers)  # glibc asks 127.0.0.1 when none is named


def default_gateway(proc_net_route: str, device: str = "eth0") -> str | None:
    """The IPv4 default gateway of ``device`` from ``/proc/net/route`` text."""
    for line in proc_net_route.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[0] == device and cols[1] == "00000000":
            gateway = int(cols[2], 16)
            if gateway:
                return str(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
    return None


def _global_ipv4(state: Mapping[str, Any], device: str = "eth0") -> str | None:
    nic = ((state or {}).get("network") or {}).get(device) or {}
    for addr in nic.get("addresses") or []:
        if addr.get("family") == "inet" and addr.get("scope") == "global":
            return addr.get("address")
    return None


# --- one build ---------------------------------------------------------------


def log_path(config: Any, alias: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", alias)
    return Path(config.paths.sessions_dir) / "logs" / f"build-{safe}.log"


def _elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def human_size(size: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class _Build:
    """One builder's lifetime: steps, progress, log file, and clean-up.

    ``log`` gets one line per step (and the build's own messages); the steps'
    own output (apt, npm, pip) goes to the log file, and to ``output`` too
    (``--verbose``). ``progress`` shows a spinner with the elapsed time while a
    step runs (a terminal line that is rewritten; "" clears it).
    """

    client: Any
    alias: str
    log: Log
    log_file: Path
    total: int
    output: Log | None = None
    progress: Callable[[str], None] | None = None
    builder: str = field(default_factory=lambda: naming.builder_name(naming.container_prefix()))
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    number: int = 0
    current: str = ""
    dns_repaired: bool = False
    _fh: Any = None

    def open(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.log_file.open("w", encoding="utf-8")
        self._write(f"# coi {__version__}: build of image {self.alias}, started {_now_iso()}")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _write(self, line: str) -> None:
        if self._fh is not None:
            self._fh.write(line + "\n")
            self._fh.flush()

    def say(self, line: str) -> None:
        self._write(line)
        self.log(line)

    def step(self, title: str) -> None:
        self.number += 1
        self.current = title
        self.say(f"[{self.number}/{self.total}] {title}  ({_elapsed(time.monotonic() - self.started)} elapsed)")

    def fail(self, detail: str, hint: str | None = None) -> BuildError:
        message = f"build of image {self.alias} failed at step '{self.current}': {detail}; log: {self.log_file}"
        if self.output is None:  # not shown as it ran: the end of the log says why
            for line in self._tail(15):
                self.log("    | " + line)
        self._write("# " + message)
        return BuildError(message, hint or "fix the cause shown above (and in the log), then build again")

    def _tail(self, count: int) -> list[str]:
        try:
            lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if not line.startswith("# ")][-count:]

    @contextmanager
    def _spinner(self) -> Iterator[None]:
        """While a step runs: a spinner, the step and the time so far, redrawn a few times a second."""
        if self.progress is None:
            yield
            return
        import threading

        done = threading.Event()
        began = time.monotonic()

        def spin() -> None:
            frames = "|/-\\"
            i = 0
            while not done.wait(0.25):
                step = _elapsed(time.monotonic() - began)
                self.progress(f"{frames[i % 4]} [{self.number}/{self.total}] {self.current}  {step}")  # type: ignore[misc]
                i += 1
        ticker = threading.Thread(target=spin, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            self.progress("")

    # ---- running things in the builder ----

    def run(self, command: list[str], *, env: Mapping[str, str] | None = None, cwd: str = "/root",
            idempotent: bool = False) -> None:
        """Run ``command`` as root in the builder, streaming its output; raise on failure.

        An ``idempotent`` command is run again when Incus lost track of it
        (``EXEC_NOT_STARTED``); any other is never run twice.
        """
        from coi.incus import EXEC_NOT_STARTED

        with self._spinner():
            for _ in range(3 if idempotent else 1):
                code, lost = self._run_once(command, env=env, cwd=cwd, lost_marker=EXEC_NOT_STARTED)
                if not lost:
                    break
        if code != 0:
            raise self.fail(f"exit code {code}")

    def _run_once(self, command: list[str], *, env: Mapping[str, str] | None, cwd: str,
                  lost_marker: str) -> tuple[int, bool]:
        """Exit code, and whether Incus lost track of the command."""
        argv = self.client.exec_argv(self.builder, command, user=0, group=0, cwd=cwd, env=env, terminal=False)
        self._write("$ " + shlex.join(command))
        lost = False
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise self.fail(f"the '{argv[0]}' command is not installed",
                            "coi streams build steps through Incus's own client: run 'sudo coi setup'") from None
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lost = lost or lost_marker in line
                self._write(line)
                if self.output is not None:
                    self.output("    " + line)
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return code, code == 255 and lost

    def capture(self, command: list[str]) -> tuple[int, str]:
        result = self.client.exec(self.builder, command)
        return result.exit_code, result.stdout

    # ---- the builder's lifetime ----

    def launch(self, base: Base) -> Base:
        """Create and start the builder; a remote base that does not answer falls back."""
        self.step(f"Launch builder {self.builder} from {base.ref}")
        if base.remote is not None:
            try:
                self._create(base)
                return base
            except (KeyboardInterrupt, ConflictError):
                raise
            except CoiError as exc:
                self.say(f"Could not reach the image server for {base.ref} ({exc.message}); "
                         f"falling back to {base.fallback}")
                self._remove_builder()
                base = Base(base.fallback or DEFAULT_BASE)
        if base.alias is None:
            base = _local_base(self.client, base, self.say)
        self._create(base)
        return base

    def _create(self, base: Base) -> None:
        with _signals_deferred():
            self.client.create_instance(self.builder, source=base.source(), config=CONTAINER_CONFIG,
                                        profiles=PROFILES, start=True)

    def wait_network(self) -> None:
        """DHCP on eth0, then names resolve; repair a dead loopback resolver."""
        self.step("Wait for the network (DHCP and DNS)")
        try:
            address = wait_for(lambda: _global_ipv4(self.client.instance_state(self.builder)),
                               timeout=_NETWORK_TIMEOUT, what=f"an IPv4 address on eth0 of {self.builder}")
        except CoiError:
            raise self.fail(f"eth0 got no IPv4 address (DHCP) within {_NETWORK_TIMEOUT:g}s; "
                            "check the coi bridge with 'coi doctor'") from None
        self.say(f"    eth0: {address}")
        if self._resolves(timeout=_DNS_TIMEOUT, give_up_on_dead_stub=True):
            return
        _, resolv = self.capture(["cat", "/etc/resolv.conf"])
        if not resolv_is_stub_only(resolv):
            raise self.fail(f"names do not resolve ({DNS_PROBE}) although eth0 has address {address}")
        _, routes = self.capture(["cat", "/proc/net/route"])
        gateway = default_gateway(routes)
        if gateway is None:
            raise self.fail("names do not resolve and eth0 has no default gateway")
        self.say(f"DNS: the image's resolver is a local stub that does not answer; "
                 f"pointing /etc/resolv.conf at the bridge's resolver {gateway} (inside the image only)")
        code, _ = self.capture(["sh", "-c", 'rm -f /etc/resolv.conf && printf "nameserver %s\\n" "$1" '
                                "> /etc/resolv.conf", "sh", gateway])
        if code != 0 or not self._resolves(timeout=_DNS_TIMEOUT):
            raise self.fail(f"names still do not resolve after pointing /etc/resolv.conf at {gateway}")
        self.dns_repaired = True
        self.say("DNS repaired: names resolve through the bridge's resolver")

    def _resolves(self, *, timeout: float, give_up_on_dead_stub: bool = False) -> bool:
        """Poll ``getent hosts``; with ``give_up_on_dead_stub``, stop early when no stub runs."""
        def check() -> str | None:
            try:
                code, _ = self.capture(["getent", "hosts", DNS_PROBE])
                if code == 0:
                    return "ok"
                if give_up_on_dead_stub and self._stub_is_dead():
                    return "dead"
            except OperationFailedError:
                pass  # init still settling ("Failed to retrieve PID..."): ask again
            return None

        try:
            return wait_for(check, timeout=timeout, what=f"{DNS_PROBE} to resolve",
                            first_interval=0.1, max_interval=1.0) == "ok"
        except CoiError:
            return False

    def _stub_is_dead(self) -> bool:
        """resolv.conf names only a loopback stub and no resolver service is starting or running."""
        _, resolv = self.capture(["cat", "/etc/resolv.conf"])
        if not resolv_is_stub_only(resolv):
            return False
        code, _ = self.capture(["sh", "-c", "systemctl is-active --quiet systemd-resolved.service "
                                "|| systemctl is-active --quiet dnsmasq.service "
                                "|| systemctl is-active --quiet unbound.service"])
        return code != 0

    def finish(self, *, properties: Mapping[str, str], replace: bool, description: str) -> dict[str, Any]:
        """Finalise, stop, publish, point the alias (replacing the old image last), delete the builder."""
        self.step("Finalise, stop and publish the image")
        self.run(["sh", "-c", _FINALIZE], idempotent=True)
        try:
            self.client.stop(self.builder, timeout=_STOP_TIMEOUT)
        except CoiError:
            self.client.stop(self.builder, force=True)
        props = {**properties, "coi.build_id": self.build_id, "description": description}
        self.say("Publishing (Ctrl+C takes effect when the daemon has finished)")
        with _signals_deferred():
            fingerprint = self.client.publish(self.builder, properties=props, compression="none")
        try:
            _point_alias(self.client, self.alias, fingerprint, replace=replace, description=description)
        except BaseException:
            _delete_quietly(self.client.delete_image, fingerprint)
            raise
        self._remove_builder()
        self._unpack(fingerprint)
        image = self.client.image(fingerprint)
        seconds = time.monotonic() - self.started
        size = int(image.get("size") or 0)
        self.say(f"Image {self.alias} ready: fingerprint {fingerprint[:12]}, {human_size(size)}, "
                 f"built in {_elapsed(seconds)} (log: {self.log_file})")
        return {"alias": self.alias, "fingerprint": fingerprint, "size": size, "seconds": round(seconds, 1),
                "properties": dict(image.get("properties") or {}), "log": str(self.log_file),
                "dns_repaired": self.dns_repaired}

    def _unpack(self, fingerprint: str) -> None:
        """Create (and delete) a container from the new image, so the storage pool holds it
        unpacked: otherwise the first session after a build waits for that (13 s for coi)."""
        self.say("Unpacking the image on the storage pool (makes the first launch fast)")
        name = f"{self.builder}-unpack"
        try:
            with _signals_deferred():
                self.client.create_instance(name, source={"type": "image", "fingerprint": fingerprint},
                                            config=CONTAINER_CONFIG, profiles=PROFILES)
        except CoiError as exc:
            self.say(f"Warning: could not unpack the image ahead of time ({exc.message}); "
                     "the first launch will do it")
        finally:
            _delete_quietly(self.client.delete, name)

    def _remove_builder(self) -> None:
        try:
            inst = self.client.instance(self.builder)
        except NotFoundError:
            return
        if inst.get("status") != "Stopped":
            _delete_quietly(lambda: self.client.stop(self.builder, force=True))
        _delete_quietly(lambda: self.client.delete(self.builder))

    def abandon(self, interrupted: bool) -> None:
        """Remove the builder and any image this build published without an alias."""
        if interrupted:
            self.say(f"Interrupted: removing builder {self.builder}")
            self.client.close()  # the interrupted request may have left the connection half-read
        try:
            self._remove_builder()
            for image in self.client.images():
                if (image.get("properties") or {}).get("coi.build_id") == self.build_id and not image.get("aliases"):
                    _delete_quietly(self.client.delete_image, image["fingerprint"])
        except CoiError as exc:
            self.say(f"Warning: could not remove builder {self.builder}: {exc.message}")


def _delete_quietly(func: Callable[..., Any], *args: Any) -> None:
    """Best-effort clean-up: a thing already gone, or a daemon that refuses, must not hide the real error."""
    try:
        func(*args)
    except CoiError:
        pass


def _point_alias(client: Any, alias: str, fingerprint: str, *, replace: bool, description: str) -> None:
    """Give the new image the alias; the image it replaces is deleted when nothing else names it."""
    try:
        old = client.image_alias(alias)["target"]
    except NotFoundError:
        client.create_alias(alias, fingerprint, description)
        return
    if not replace:
        raise ConflictError(f"image {alias} already exists", "use --force to replace it")
    client.point_alias(alias, fingerprint)
    if old != fingerprint:
        try:
            others = [a["name"] for a in client.image(old).get("aliases") or [] if a["name"] != alias]
        except NotFoundError:
            return
        if not others:
            _delete_quietly(client.delete_image, old)


def _check_alias(alias: str) -> None:
    if not _ALIAS_RE.fullmatch(alias) or ":" in alias:
        raise UsageError(f"{alias!r} is not a valid image name",
                         "use letters, digits, '-', '_', '.' and '/' (no ':')")


def _refuse_existing(client: Any, alias: str, force: bool, command: str) -> None:
    if not force and client.image_exists(alias):
        raise ConflictError(f"image {alias} already exists", f"use '{command} --force' to replace it")


def _run_build(build: _Build, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    build.open()
    try:
        return body()
    except KeyboardInterrupt:
        build.abandon(interrupted=True)
        raise
    except BuildError:
        build.abandon(interrupted=False)
        raise
    except CoiError as exc:  # an Incus failure on the way: say which step, and where the log is
        build.abandon(interrupted=False)
        raise build.fail(exc.message, exc.hint) from None
    except BaseException:
        build.abandon(interrupted=False)
        raise
    finally:
        build.close()


# --- public builds -----------------------------------------------------------


def build_custom(client: Any, *, name: str, script: Path, base: str | None, force: bool, config: Any,
                 log: Log, output: Log | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build image ``name``: ``script`` run as root in a builder from ``base`` (default: coi)."""
    _check_alias(name)
    script = Path(script)
    try:
        content = script.read_bytes()
    except FileNotFoundError:
        raise CoiError(f"build script {script} does not exist") from None
    except IsADirectoryError:
        raise CoiError(f"build script {script} is a directory, not a file") from None
    except OSError as exc:
        raise CoiError(f"cannot read build script {script}: {exc.strerror or exc}") from None
    parsed = parse_base(base, default=COI_ALIAS)
    _refuse_existing(client, name, force, "coi build custom")
    if parsed.remote is None:
        parsed = _local_base(client, parsed, log)

    build = _Build(client, name, log, log_path(config, name), total=4, output=output, progress=progress)

    def body() -> dict[str, Any]:
        build.say(f"Building image {name} from {parsed.ref} with {script} (log: {build.log_file})")
        used = build.launch(parsed)
        build.wait_network()
        build.step(f"Run {script.name} as root")
        build.client.push_file(build.builder, _SCRIPT_PATH, content, mode=0o700)
        command = [_SCRIPT_PATH] if content.startswith(b"#!") else ["/bin/bash", _SCRIPT_PATH]
        build.run(command, env={"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"})
        properties = {"coi.kind": "custom", "coi.version": __version__, "coi.base": used.ref,
                      "coi.script": script.name, "coi.script_hash": _sha([content]),
                      "coi.inputs": _sha([content, used.ref.encode()]), "coi.built_at": _now_iso()}
        return build.finish(properties=properties, replace=force, description=f"coi custom image {name}")

    return _run_build(build, body)


def build_coi(client: Any, *, force: bool, tools: list[str], config: Any, log: Log, output: Log | None = None,
              progress: Callable[[str], None] | None = None, alias: str = COI_ALIAS) -> dict[str, Any]:
    """Build the ``coi`` image (under ``alias``): the tools of the contract plus the chosen agent tools."""
    parsed = parse_base(config.build.base)
    tools = normalise_tools(tools)
    _refuse_existing(client, alias, force, "coi build")
    if parsed.remote is None:
        parsed = _local_base(client, parsed, log)
    script = coi_script().read_bytes()
    inputs = coi_inputs_hash(tools=tools, config=config, script=script)
    ca_files = host_ca_files()
    build = _Build(client, alias, log, log_path(config, alias), total=3 + len(COI_STEPS), output=output,
                   progress=progress)
    env = {"CODE_UID": str(config.incus.code_uid), "COI_TOOLS": " ".join(tools), "HOME": "/root"}

    def body() -> dict[str, Any]:
        build.say(f"Building image {alias} from {parsed.ref} with tools {', '.join(tools)} "
                  f"(log: {build.log_file})")
        used = build.launch(parsed)
        build.wait_network()
        build.client.push_file(build.builder, _COI_SCRIPT_PATH, script, mode=0o700)
        for path in ca_files:
            build.client.push_file(build.builder, f"/usr/local/share/ca-certificates/coi-host-{path.name}",
                                   path.read_bytes(), mode=0o644)
        for arg, title in COI_STEPS:
            build.step(title + (f": {', '.join(tools)}" if arg == "tools" else ""))
            build.run(["/bin/bash", _COI_SCRIPT_PATH, arg], env=env)
        _, node = build.capture(["/usr/local/bin/node", "--version"])
        properties = {"coi.kind": "coi", "coi.version": __version__, "coi.base": used.ref,
                      "coi.node": node.strip(),
                      "coi.script_hash": _sha([script]), "coi.inputs": inputs, "coi.tools": ",".join(tools),
                      "coi.code_uid": str(config.incus.code_uid), "coi.built_at": _now_iso()}
        return build.finish(properties=properties, replace=force,
                            description=f"coi image ({', '.join(tools)})")

    return _run_build(build, body)


# --- managing images -----------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """One alias of a local image, as ``coi image list`` shows it."""

    alias: str
    fingerprint: str
    size: int
    created: str
    description: str
    properties: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"alias": self.alias, "fingerprint": self.fingerprint, "size": self.size,
                                "created": self.created, "description": self.description}
        data.update({k: v for k, v in self.properties.items() if k.startswith("coi.")})
        return data


def timestamp(text: str) -> float:
    """Seconds since the epoch of an Incus timestamp (RFC 3339, up to nanoseconds)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", text or "")
    if not match:
        return 0.0
    zone = match[3] or "Z"
    moment = _dt.datetime.fromisoformat(match[1] + ("+00:00" if zone == "Z" else zone))
    return moment.timestamp() + (int(match[2]) / 10 ** len(match[2]) if match[2] else 0.0)


def _image_rows(images: Iterable[Mapping[str, Any]], *, all: bool, prefix: str | None) -> list[ImageInfo]:
    rows = []
    for image in images:
        props = dict(image.get("properties") or {})
        if not all and "coi.kind" not in props:
            continue
        aliases = [a["name"] for a in image.get("aliases") or []] or ([""] if all and not prefix else [])
        for alias in aliases:
            if prefix and not alias.startswith(prefix):
                continue
            rows.append(ImageInfo(alias, image["fingerprint"], int(image.get("size") or 0),
                                  image.get("created_at") or "", props.get("description", ""), props))
    return sorted(rows, key=lambda r: (r.alias == "", r.alias, r.fingerprint))


def list_images(client: Any, *, all: bool = False, prefix: str | None = None) -> list[ImageInfo]:
    """coi-built images (every local image with ``all``), one row per alias."""
    return _image_rows(client.images(), all=all, prefix=prefix)


def image_exists(client: Any, alias: str) -> bool:
    return client.image_exists(alias)


def delete_image(client: Any, alias: str) -> str:
    """Delete the image named ``alias`` (only the alias when other aliases name it too)."""
    try:
        fingerprint = client.image_alias(alias)["target"]
    except NotFoundError:
        raise NotFoundError(f"image {alias} does not exist", "see 'coi image list --all'") from None
    others = [a["name"] for a in client.image(fingerprint).get("aliases") or [] if a["name"] != alias]
    if others:
        client.delete_alias(alias)
    else:
        client.delete_image(fingerprint)
    return fingerprint


def publish_container(client: Any, *, container: str, alias: str, description: str = "") -> ImageInfo:
    """Publish a stopped container as image ``alias``."""
    _check_alias(alias)
    inst = client.instance(container)
    if inst.get("status") != "Stopped":
        raise ConflictError(f"container {container} is {str(inst.get('status', 'running')).lower()}",
                            f"stop it first: coi container stop {container}")
    if client.image_exists(alias):
        raise ConflictError(f"image {alias} already exists", f"delete it first: coi image delete {alias}")
    description = description or f"published from container {container}"
    props = {"coi.kind": "published", "coi.version": __version__, "coi.source": container,
             "coi.built_at": _now_iso(), "description": description}
    fingerprint = client.publish(container, properties=props, compression="none")
    try:
        client.create_alias(alias, fingerprint, description)
    except BaseException:
        _delete_quietly(client.delete_image, fingerprint)
        raise
    image = client.image(fingerprint)
    return _image_rows([image], all=True, prefix=alias)[0]


def plan_cleanup(rows: Iterable[ImageInfo], *, prefix: str, keep: int) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """(kept, deleted): the ``keep`` newest aliases starting with ``prefix`` stay."""
    if keep < 1:
        raise UsageError(f"--keep must be at least 1 (got {keep})",
                         f"use 'coi image delete' to remove every image starting with {prefix}")
    matching = [r for r in rows if r.alias.startswith(prefix)]
    newest = sorted(matching, key=lambda r: (timestamp(r.created), r.alias), reverse=True)
    return newest[:keep], newest[keep:]


def cleanup_images(client: Any, *, prefix: str, keep: int) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """Delete all but the ``keep`` newest images whose alias starts with ``prefix``."""
    if not prefix:
        raise UsageError("the prefix must not be empty")
    images = client.images()
    kept, doomed = plan_cleanup(_image_rows(images, all=True, prefix=prefix), prefix=prefix, keep=keep)
    by_fp = {img["fingerprint"]: {a["name"] for a in img.get("aliases") or []} for img in images}
    for row in doomed:
        names = by_fp.get(row.fingerprint, set())
        names.discard(row.alias)
        if names:
            client.delete_alias(row.alias)
        else:
            _delete_quietly(client.delete_image, row.fingerprint)
    return kept, doomed
